"""The Lua scripts that keep shared rate limits and breakers atomic in Redis.

Each script is one read-modify-write that Redis runs alone, so no two sidecars ever interleave
inside one. Every script reads the time from the Redis server (`TIME`, microseconds), never
from a sidecar: replicas whose clocks disagree share one time line. Times stored in keys are
microseconds on that time line, written with `%.0f` (Lua's `tostring` keeps only 14 digits).

Keys of one upstream share a hash tag (`prefix:{upstream}:...`), so a script's keys live in
one slot of a Redis Cluster too.
"""

from __future__ import annotations

# Shared by every script: the server's time in microseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# Shared by the rate-limit scripts: a bucket's TAT written back (expiring a second after it
# is reached), or the key removed when the bucket is full again.
_STORE_TAT = """
local function store(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
"""

# GCRA over a requests bucket and a tokens bucket at once (`policies.ratelimit.Bucket`, on the
# server's clock). A bucket's key holds its theoretical arrival time (TAT); a missing key is a
# full bucket. Settlements of earlier calls (token usage minus estimates) ride along and are
# applied first, as RATE_ADJUST would. Nothing is taken when the call is denied, so a denial
# takes no request slot.
#   KEYS: requests TAT, tokens TAT
#   ARGV: requests interval us (0: no request limit), requests tolerance us,
#         tokens interval us per token (0: no token limit), tokens tolerance us,
#         tokens to take, longest acceptable wait us, tokens settled since (us, signed)
#   -> {admitted 0|1, wait us (admitted: to sleep; denied: until it would pass),
#       requests used us, tokens used us}  (used: TAT - now, for the gauges)
RATE_TAKE = (
    _NOW
    + _STORE_TAT
    + """
local max_wait = tonumber(ARGV[6])
local function tat_of(key, settle)
  local tat = tonumber(redis.call('GET', key))
  if settle ~= 0 then
    tat = math.max((tat or now) + settle, now)
    store(key, tat)
  end
  if tat == nil or tat < now then return now end
  return tat
end
local wait = 0
local req_interval, tok_interval = tonumber(ARGV[1]), tonumber(ARGV[3])
local cost = tonumber(ARGV[5])
local req_old, tok_old = tat_of(KEYS[1], 0), tat_of(KEYS[2], tonumber(ARGV[7]))
local req_tat, tok_tat = req_old, tok_old
if req_interval > 0 then
  req_tat = req_old + req_interval
  wait = math.max(wait, req_tat - tonumber(ARGV[2]) - now)
end
if tok_interval > 0 and cost > 0 then
  tok_tat = tok_old + cost * tok_interval
  wait = math.max(wait, tok_tat - tonumber(ARGV[4]) - now)
end
if wait > max_wait + 1 then
  return {0, math.ceil(wait), math.floor(req_old - now), math.floor(tok_old - now)}
end
if req_tat > req_old then store(KEYS[1], req_tat) end
if tok_tat > tok_old then store(KEYS[2], tok_tat) end
if wait <= 1 then wait = 0 end
return {1, math.floor(wait), math.floor(req_tat - now), math.floor(tok_tat - now)}
"""
)

# Give back (negative) or add (positive) time on buckets after the fact: a cancelled wait's
# refund, a token estimate settled with the real usage. Never below now: a bucket holds at
# most its burst (as `Bucket.adjust`; an expired key counts from now).
#   KEYS: TAT keys; ARGV: a delta in us per key
RATE_ADJUST = (
    _NOW
    + _STORE_TAT
    + """
for i, key in ipairs(KEYS) do
  local delta = tonumber(ARGV[i])
  store(key, math.max((tonumber(redis.call('GET', key)) or now) + delta, now))
end
return 1
"""
)

# A breaker's state: a hash (s state, f consecutive failures, o opened at us, e epoch,
# k half-open successes, g generation) and a sorted set of probe claims (claim id -> expiry
# us). The epoch grows at every transition: an outcome admitted in an earlier epoch counts
# neither way. The generation is the server time the hash was created at: a sidecar whose
# view comes from a hash that was lost (Redis restarted empty) takes the new one as it is.
# Transitions and changes of the failure count are published on the channel as
# "upstream state epoch failures open_left_us gen".
_BREAKER = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'o', 'e', 'k', 'g')
local exists = h[1] and true or false
local state = h[1] or 'closed'
local failures = tonumber(h[2]) or 0
local opened = tonumber(h[3]) or 0
local epoch = tonumber(h[4]) or 0
local successes = tonumber(h[5]) or 0
local gen = h[6] or string.format('%.0f', now)
local dirty, changed, failures0 = false, false, failures
local function become(new_state)
  state, epoch, successes, dirty, changed = new_state, epoch + 1, 0, true, true
  if new_state == 'open' then opened = now end
  if new_state == 'closed' then failures = 0 end
  redis.call('DEL', KEYS[2])
end
local function open_left(reset)
  if state ~= 'open' then return 0 end
  return math.max(0, opened + reset - now)
end
local function finish(reset, channel, upstream, granted)
  if dirty then
    redis.call('HSET', KEYS[1], 's', state, 'f', failures, 'o', string.format('%.0f', opened),
               'e', epoch, 'k', successes, 'g', gen)
    redis.call('PEXPIRE', KEYS[1], 86400000)
  end
  local left = math.floor(open_left(reset))
  if changed or failures ~= failures0 then
    redis.call('PUBLISH', channel,
               table.concat({upstream, state, epoch, failures, left, gen}, ' '))
  end
  return {state, epoch, failures, left, gen, granted}
end
"""
)

# An attempt's outcome. Counted only when admitted in the current epoch (and generation).
#   KEYS: state hash, probe claims
#   ARGV: generation seen at admission ('' before any), epoch, verdict s|f|n, claim id ('':
#         not a probe), fail_max, reset timeout us, success threshold, channel, upstream
#   -> {state, epoch, failures, open left us, generation, 0}
BREAKER_REPORT = (
    _BREAKER
    + """
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
local same = tonumber(ARGV[2]) == epoch and (ARGV[1] == gen or (ARGV[1] == '' and epoch == 0))
local verdict = ARGV[3]
if same and verdict ~= 'n' then
  if state == 'closed' then
    if verdict == 'f' then
      failures, dirty = failures + 1, true
      if failures >= tonumber(ARGV[5]) then become('open') end
    elseif failures > 0 then
      failures, dirty = 0, true
    end
  elseif state == 'half_open' and ARGV[4] ~= '' then
    if verdict == 'f' then
      become('open')
    else
      successes, dirty = successes + 1, true
      if successes >= tonumber(ARGV[7]) then become('closed') end
    end
  end
end
if not exists and not dirty then return {state, epoch, failures, 0, '', 0} end
return finish(tonumber(ARGV[6]), ARGV[8], ARGV[9], 0)
"""
)

# Ask for a probe slot: an open breaker whose reset timeout has passed turns half-open, and a
# half-open one grants a slot while fewer than `probes` claims are live. A claim lives `lease`
# us unless reported first (an unused or crashed replica's slot frees itself).
#   KEYS: state hash, probe claims
#   ARGV: reset timeout us, probes, claim id, lease us, channel, upstream
#   -> {state, epoch, failures, open left us, generation, granted 0|1}
BREAKER_CLAIM = (
    _BREAKER
    + """
local reset = tonumber(ARGV[1])
if state == 'open' and now >= opened + reset then become('half_open') end
local granted = 0
if state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
    local lease = tonumber(ARGV[4])
    redis.call('ZADD', KEYS[2], string.format('%.0f', now + lease), ARGV[3])
    redis.call('PEXPIRE', KEYS[2], math.floor(lease / 1000) + 1000)
    granted = 1
  end
end
if not exists and not dirty then return {state, epoch, failures, 0, '', granted} end
return finish(reset, ARGV[5], ARGV[6], granted)
"""
)

# Read a breaker's state without changing it.
#   KEYS: state hash, probe claims; ARGV: reset timeout us
#   -> {state, epoch, failures, open left us, generation ('' when none), 0}
BREAKER_READ = (
    _BREAKER
    + """
if not exists then return {state, epoch, failures, 0, '', 0} end
return {state, epoch, failures, math.floor(open_left(tonumber(ARGV[1]))), gen, 0}
"""
)

SCRIPTS = {
    "rate_take": RATE_TAKE,
    "rate_adjust": RATE_ADJUST,
    "breaker_report": BREAKER_REPORT,
    "breaker_claim": BREAKER_CLAIM,
    "breaker_read": BREAKER_READ,
}
