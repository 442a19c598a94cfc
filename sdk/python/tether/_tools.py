"""`@tether.tool`: a function run as a guarded, journaled tool call, in an `execute_tool` span.

    @tether.tool("lookup", upstream="kb")          # a guarded upstream in the sidecar's config
    def lookup(topic: str) -> dict: ...

    @tether.agent("planner", run_id="job-7")        # the run: argument, $TETHER_RUN_ID, or new
    def plan() -> None:
        lookup("tides")                             # BeginCall / run / EndCall, span and all

A tool call takes the next step of the current run (see `tether._runs`), and its key is
`run_id:step`. Before the function runs, `BeginCall` asks the sidecar: a step the run already
completed is answered from the journal *without running the function* (its recorded result,
or its recorded failure as `ReplayedToolError`); otherwise the upstream's rate limit, bulkhead
and breaker admit the call or refuse it with the SDK's typed errors (`RateLimitedError`,
`OverloadedError`, `CircuitOpenError`), again without running it. After it, `EndCall` reports
the result or the exception (transient ones, connection errors and timeouts, count against
the breaker). A tool called outside any run is guarded but not journaled.

Arguments identify the call for the journal: their JSON form is hashed, so a resumed run that
calls a step with other arguments gets `NonDeterministicReplayError` (values JSON cannot
express count by their type name only). Results are journaled as JSON: a result orjson cannot
serialise raises a TypeError naming the tool and the type, and nothing is recorded as a
success. Callers always get the result as the journal will replay it (JSON data: a tuple
becomes a list, a dataclass a dict), so a first run and a resumed one see the same values.

`idempotent=True` says running the function twice is harmless. The sidecar re-executes
an unfinished call of an upstream configured `idempotent: true` by itself; for the others
(tools are not idempotent by default) a call begun before a crash is *in doubt* and refused
with `OutcomeUnknownError`. An idempotent tool then settles that for itself: the SDK resolves
the step for a retry (ResolveCall) and runs it again. Tools sharing a non-idempotent upstream
can so differ per tool. (`idempotent=False` cannot make an upstream configured idempotent
keep in-doubt marks: that upstream writes none.)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any, Final, TypeVar, overload

import orjson
from opentelemetry.trace import Span, SpanKind

from tether import _instrument
from tether._async_client import AsyncClient, AsyncGuard
from tether._client import Client, Guard
from tether._errors import OutcomeUnknownError, ReplayedToolError
from tether._messages import GuardState
from tether._runs import Scope, current, default_client

F = TypeVar("F", bound=Callable[..., Any])
_ARGS_JSON: Final = orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS


class ResultNotJournaled(BaseException):
    """Reported to the sidecar for a tool whose result cannot be journaled: neutral for its
    breaker (the dependency did not fail), and in doubt for a non-idempotent upstream (the
    function ran, but the journal does not know its result)."""


def error_type(exc: BaseException) -> str:
    return type(exc).__qualname__


def _opaque(value: Any) -> str:
    return f"<{type(value).__qualname__}>"


def arguments_payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The call's arguments as deterministic JSON (for the journal's request hash)."""
    if not args and not kwargs:
        return b""
    try:
        return orjson.dumps({"args": args, "kwargs": kwargs}, default=_opaque, option=_ARGS_JSON)
    except TypeError:  # e.g. an int beyond 64 bits, or a non-str key of mixed types
        opaque = {"args": [_opaque(a) for a in args],
                  "kwargs": {k: _opaque(v) for k, v in kwargs.items()}}  # fmt: skip
        return orjson.dumps(opaque, option=orjson.OPT_SORT_KEYS)


def encode_result(name: str, value: Any) -> tuple[Any, bytes]:
    """(the result as the journal replays it, its JSON); TypeError when it is not JSON."""
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise TypeError(
            f"tool {name!r} returned a {type(value).__qualname__} that is not JSON-serialisable"
            f" ({exc}); tool results are journaled as JSON, so return JSON data (dict, list,"
            " str, int, float, bool, None). The call was not recorded as a success."
        ) from None
    return orjson.loads(encoded), encoded


def check_plain(fn: Callable[..., Any], decorator: str) -> None:
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(f"{decorator} does not support generator functions ({fn.__qualname__})")


class ToolSpec:
    """A tool's fixed settings, and the span attributes every call of it shares."""

    __slots__ = ("attributes", "idempotent", "name", "span_name", "timeout_s", "upstream")

    def __init__(
        self,
        name: str,
        upstream: str | None,
        idempotent: bool,
        timeout_s: float | None,
        description: str | None,
    ) -> None:
        self.name = name
        self.upstream = upstream or name
        self.idempotent = idempotent
        self.timeout_s = timeout_s
        self.span_name = f"execute_tool {name}"
        self.attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function",
            "tether.upstream": self.upstream,
        }
        if description:
            self.attributes["gen_ai.tool.description"] = description

    def replayed(self, state: GuardState, span: Span) -> Any:
        """The journaled outcome: the result, or the failure raised as ReplayedToolError."""
        span.set_attribute("tether.replayed", True)
        if state.error is None:
            return state.result
        kind = state.error.partition(":")[0]
        raise ReplayedToolError(
            f"tool {self.name!r} failed in an earlier execution of this run (replayed from "
            f"the journal, not run again): {state.error}",
            metadata={"replayed": "true", "error_type": kind, "upstream": self.upstream,
                      "tool": self.name},
        )  # fmt: skip


def _start(spec: ToolSpec, span: Span, scope: Scope | None) -> tuple[str, str]:
    """(run_id, key) of this call; the key takes the run's next step."""
    if scope is None:
        return "", ""
    key = scope.next_key()
    if span.is_recording():
        span.set_attribute("gen_ai.tool.call.id", key)
        span.set_attribute("gen_ai.conversation.id", scope.run_id)
    return scope.run_id, key


def _begin(guard: Guard, client: Client, spec: ToolSpec, run_id: str, key: str) -> GuardState:
    try:
        return guard.__enter__()
    except OutcomeUnknownError:
        if not (spec.idempotent and key):
            raise
    client.resolve(run_id, key, retry=True)  # harmless to run again: settle the doubt
    return guard.__enter__()


async def _abegin(
    guard: AsyncGuard, client: AsyncClient, spec: ToolSpec, run_id: str, key: str
) -> GuardState:
    try:
        return await guard.__aenter__()
    except OutcomeUnknownError:
        if not (spec.idempotent and key):
            raise
    await client.resolve(run_id, key, retry=True)
    return await guard.__aenter__()


def _sync_tool(spec: ToolSpec, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        scope = current.get()
        payload = arguments_payload(args, kwargs)
        with _instrument.tracer.start_as_current_span(
            spec.span_name, kind=SpanKind.INTERNAL, attributes=spec.attributes
        ) as span:
            try:
                run_id, key = _start(spec, span, scope)
                client = scope.sync_client() if scope is not None else default_client()
                guard = client.guard(spec.upstream, payload, name=spec.name, run_id=run_id,
                                     idempotency_key=key, timeout_s=spec.timeout_s)  # fmt: skip
                state = _begin(guard, client, spec, run_id, key)
                if state.replayed:
                    return spec.replayed(state, span)
                span.set_attribute("tether.replayed", False)
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:
                    guard.__exit__(type(exc), exc, exc.__traceback__)
                    raise
                try:
                    result, encoded = encode_result(spec.name, value)
                except TypeError as exc:
                    guard.__exit__(ResultNotJournaled, ResultNotJournaled(str(exc)), None)
                    raise
                state.set_result(encoded)
                guard.__exit__(None, None, None)
                return result
            except Exception as exc:
                span.set_attribute("error.type", error_type(exc))
                raise

    return call


class _AsyncGuarded:
    """A guarded call from async code: on the run's AsyncClient, else on a blocking client
    in a worker thread (a run on a blocking Client, or no run at all)."""

    __slots__ = ("_aguard", "_guard", "scope", "spec")

    def __init__(self, spec: ToolSpec, scope: Scope | None) -> None:
        self.spec = spec
        self.scope = scope
        self._aguard: AsyncGuard | None = None
        self._guard: Guard | None = None

    async def begin(self, payload: bytes, run_id: str, key: str) -> GuardState:
        spec, scope = self.spec, self.scope
        options: dict[str, Any] = {"name": spec.name, "run_id": run_id, "idempotency_key": key,
                                   "timeout_s": spec.timeout_s}  # fmt: skip
        aclient = scope.async_client() if scope is not None else None
        if aclient is not None:
            self._aguard = aclient.guard(spec.upstream, payload, **options)
            return await _abegin(self._aguard, aclient, spec, run_id, key)
        client = scope.sync_client() if scope is not None else default_client()
        self._guard = guard = client.guard(spec.upstream, payload, **options)
        return await asyncio.to_thread(_begin, guard, client, spec, run_id, key)

    async def end(self, exc: BaseException | None) -> None:
        kind = type(exc) if exc is not None else None
        if self._aguard is not None:
            await self._aguard.__aexit__(kind, exc, None)
        elif self._guard is not None:
            await asyncio.to_thread(self._guard.__exit__, kind, exc, None)


def _async_tool(spec: ToolSpec, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        scope = current.get()
        payload = arguments_payload(args, kwargs)
        with _instrument.tracer.start_as_current_span(
            spec.span_name, kind=SpanKind.INTERNAL, attributes=spec.attributes
        ) as span:
            try:
                run_id, key = _start(spec, span, scope)
                guarded = _AsyncGuarded(spec, scope)
                state = await guarded.begin(payload, run_id, key)
                if state.replayed:
                    return spec.replayed(state, span)
                span.set_attribute("tether.replayed", False)
                try:
                    value = await fn(*args, **kwargs)
                except BaseException as exc:
                    await guarded.end(exc)
                    raise
                try:
                    result, encoded = encode_result(spec.name, value)
                except TypeError as exc:
                    await guarded.end(ResultNotJournaled(str(exc)))
                    raise
                state.set_result(encoded)
                await guarded.end(None)
                return result
            except Exception as exc:
                span.set_attribute("error.type", error_type(exc))
                raise

    return call


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(
    name: str | None = None,
    /,
    *,
    upstream: str | None = None,
    idempotent: bool = False,
    timeout_s: float | None = None,
    description: str | None = None,
) -> Callable[[F], F]: ...


def tool(
    fn_or_name: Any = None,
    /,
    *,
    upstream: str | None = None,
    idempotent: bool = False,
    timeout_s: float | None = None,
    description: str | None = None,
) -> Any:
    """Run a function (sync or async) as a guarded, journaled tool call with an
    `execute_tool {name}` span. `name`: default the function's name; `upstream`: the
    sidecar upstream whose policies guard it (a `type: guarded` one, or any other), default
    `name`; `idempotent`: see the module docs; `timeout_s`: bounds the BeginCall wait (e.g.
    for a rate limit in `wait` mode)."""

    def decorate(fn: F) -> F:
        check_plain(fn, "tether.tool")
        name = fn_or_name if isinstance(fn_or_name, str) else fn.__name__
        spec = ToolSpec(name, upstream, idempotent, timeout_s, description)
        wrap = _async_tool if inspect.iscoroutinefunction(fn) else _sync_tool
        return wrap(spec, fn)  # type: ignore[return-value]

    return decorate(fn_or_name) if callable(fn_or_name) else decorate
