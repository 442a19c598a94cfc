"""State shared by many sidecars: rate-limit buckets and circuit breakers in Redis.

`state.backend: memory` (the default) keeps every limit and breaker in the process;
`redis` shares them among all sidecars that name the same upstream under the same
`key_prefix`. `store` is the client (scripts, bounds, breaker events), `scripts` the Lua
that makes each update atomic, `health` the incidents when the store fails. The shared
policies themselves live in `sidecar.policies` (`shared_ratelimit`, `shared_breaker`).
"""
