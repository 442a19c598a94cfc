"""`@tether.agent`: an `invoke_agent` span, and the current run for the code inside it.

    @tether.agent("planner", run_id="job-7")    # the run: argument, $TETHER_RUN_ID, or new
    def plan() -> None: ...                      # @tether.tool calls inside belong to job-7

    with tether.agent("critic"):                 # or a block; `async with` in async code
        ...

The span follows the OpenTelemetry GenAI conventions (`gen_ai.operation.name` =
`invoke_agent`, `gen_ai.agent.name`, `gen_ai.conversation.id` = the run id); tool calls and
the sidecar's spans for calls made inside it are its descendants.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from opentelemetry.trace import Span, SpanKind

from tether import _instrument
from tether._async_client import AsyncClient
from tether._client import Client
from tether._runs import Scope, aclose_scope, close_scope, open_scope
from tether._tools import check_plain, error_type

F = TypeVar("F", bound=Callable[..., Any])
RunId = str | Callable[..., str | None] | None


class Agent:
    """What `tether.agent(...)` returns: a decorator, or a context manager for a block."""

    def __init__(
        self,
        name: str | None,
        run_id: RunId,
        client: Client | AsyncClient | None,
        description: str | None,
        agent_id: str | None,
    ) -> None:
        self.name = name
        self.run_id = run_id
        self.client = client
        self._extra: dict[str, Any] = {}
        if description:
            self._extra["gen_ai.agent.description"] = description
        if agent_id:
            self._extra["gen_ai.agent.id"] = agent_id
        self._entered: list[tuple[Scope, Any, Any, Span]] = []

    def _run_id(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        chosen = self.run_id
        if not callable(chosen):
            return chosen
        given = chosen(*args, **kwargs)
        return None if given is None else str(given)

    def _span(self, name: str, scope: Scope) -> Any:
        attributes = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": name,
                      "gen_ai.conversation.id": scope.run_id, **self._extra}  # fmt: skip
        return _instrument.tracer.start_as_current_span(
            f"invoke_agent {name}", kind=SpanKind.INTERNAL, attributes=attributes
        )

    def __call__(self, fn: F) -> F:
        check_plain(fn, "tether.agent")
        name = self.name or fn.__name__
        if inspect.iscoroutinefunction(fn):
            return self._async(name, fn)  # type: ignore[return-value]
        return self._sync(name, fn)  # type: ignore[return-value]

    def _sync(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            run_id = self._run_id(args, kwargs)
            scope, token = open_scope(self.client, run_id, asynchronous=False)
            try:
                with self._span(name, scope) as span:
                    try:
                        return fn(*args, **kwargs)
                    except Exception as exc:
                        span.set_attribute("error.type", error_type(exc))
                        raise
            finally:
                close_scope(scope, token)

        return call

    def _async(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            run_id = self._run_id(args, kwargs)
            scope, token = open_scope(self.client, run_id, asynchronous=True)
            try:
                with self._span(name, scope) as span:
                    try:
                        return await fn(*args, **kwargs)
                    except Exception as exc:
                        span.set_attribute("error.type", error_type(exc))
                        raise
            finally:
                await aclose_scope(scope, token)

        return call

    def _enter(self, asynchronous: bool) -> Any:
        if not self.name:
            raise TypeError("tether.agent(...) used as a context manager needs a name")
        scope, token = open_scope(self.client, self._run_id((), {}), asynchronous=asynchronous)
        manager = self._span(self.name, scope)
        span = manager.__enter__()
        self._entered.append((scope, token, manager, span))
        return scope.run

    def _leave(self, exc: BaseException | None) -> tuple[Scope, Any]:
        scope, token, manager, span = self._entered.pop()
        if isinstance(exc, Exception):
            span.set_attribute("error.type", error_type(exc))
        manager.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
        return scope, token

    def __enter__(self) -> Any:
        """Start the agent's span (and its run, unless one is current); returns the run."""
        return self._enter(asynchronous=False)

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        close_scope(*self._leave(exc))

    async def __aenter__(self) -> Any:
        return self._enter(asynchronous=True)

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        await aclose_scope(*self._leave(exc))


@overload
def agent(fn: F, /) -> F: ...
@overload
def agent(
    name: str | None = None,
    /,
    *,
    run_id: RunId = None,
    client: Client | AsyncClient | None = None,
    description: str | None = None,
    agent_id: str | None = None,
) -> Agent: ...


def agent(
    fn_or_name: Any = None,
    /,
    *,
    run_id: RunId = None,
    client: Client | AsyncClient | None = None,
    description: str | None = None,
    agent_id: str | None = None,
) -> Any:
    """An agent: an `invoke_agent {name}` span around a function (sync or async) or a
    `with` block, and the current run for the code inside it.

    Inside a run already current (an enclosing agent or `tether.run`), the agent joins it:
    sub-agents share the run's steps. Otherwise it starts one: `run_id` (a string, or a
    callable given the function's arguments), else $TETHER_RUN_ID, else a fresh uuid; on
    `client`, else the default client to $TETHER_ADDRESS (async code: an AsyncClient of its
    own, closed at the end). A `run_id` naming another run starts that run, nested.
    """
    if callable(fn_or_name):
        return Agent(None, run_id, client, description, agent_id)(fn_or_name)
    return Agent(fn_or_name, run_id, client, description, agent_id)
