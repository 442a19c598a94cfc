"""The current run: which sidecar client, run id and step counter instrumented code uses.

`tether.run(client, "job-1")` and `@tether.agent(...)` set it for the code inside them (a
context variable, so each thread and asyncio task sees its own); `@tether.tool` and the
clients wrapped by `tether.wrap_openai` read it. Every call of the run takes the next step of
one counter, so its idempotency key is `run_id:step` and a restarted agent that makes the
same calls in the same order gets its earlier answers from the sidecar's journal.
"""

from __future__ import annotations

import os
import threading
import uuid
from contextvars import ContextVar, Token
from typing import Any, Final, Generic, TypeVar, cast, overload

from tether._async_client import AsyncClient, AsyncRun
from tether._client import Client, Run
from tether._messages import TOKEN_ENV, resolve_target

RUN_ID_ENV: Final = "TETHER_RUN_ID"
R = TypeVar("R", Run, AsyncRun)


class Scope:
    """One run as instrumented code sees it: its handle, keys, and a client of each kind."""

    __slots__ = ("_companion", "_lock", "_owned", "run", "run_id")

    def __init__(self, run: Run | AsyncRun, *, owned: bool = False) -> None:
        self.run = run
        self.run_id = run.run_id
        self._lock = threading.Lock()
        self._owned = owned  # the run's client was made for this scope: close it at the end
        self._companion: Client | None = None

    def next_key(self, given: str = "") -> str:
        """The key of the run's next call (`given`, else `run_id:step`); takes a step."""
        with self._lock:
            return self.run.next_key(given)

    def sync_client(self) -> Client:
        """The run's client, or (for a run on an AsyncClient) a blocking one to the same
        sidecar with the same token, made on first use: a sync tool in an async agent."""
        client = self.run.client
        if isinstance(client, Client):
            return client
        with self._lock:
            if self._companion is None:
                self._companion = Client(client.target, timeout_s=client.timeout_s)
                self._companion._metadata = client._metadata
            return self._companion

    def async_client(self) -> AsyncClient | None:
        client = self.run.client
        return client if isinstance(client, AsyncClient) else None

    def close(self) -> None:
        if self._companion is not None:
            self._companion.close()
        if self._owned and isinstance(self.run.client, Client):
            self.run.client.close()

    async def aclose(self) -> None:
        self.close()
        if self._owned and isinstance(self.run.client, AsyncClient):
            await self.run.client.close()


current: ContextVar[Scope | None] = ContextVar("tether_current_run", default=None)
_defaults: dict[tuple[str, str | None], Client] = {}
_defaults_lock = threading.Lock()


def current_run() -> Run | AsyncRun | None:
    """The run of the enclosing `tether.run(...)` or `@tether.agent`, or None."""
    scope = current.get()
    return scope.run if scope is not None else None


def default_client() -> Client:
    """The process's shared client to $TETHER_ADDRESS (made on first use, per address)."""
    key = (resolve_target(None), os.environ.get(TOKEN_ENV))
    client = _defaults.get(key)
    if client is None:
        with _defaults_lock:
            client = _defaults.get(key)
            if client is None:
                client = _defaults[key] = Client()
    return client


def new_run_id(given: str | None = None) -> str:
    """The argument, else $TETHER_RUN_ID, else a fresh uuid."""
    return given or os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex


def open_scope(
    client: Client | AsyncClient | None, run_id: str | None, *, asynchronous: bool
) -> tuple[Scope, Token[Scope | None] | None]:
    """Join the current run (no `run_id`, or the same one), else start one and make it
    current; returns the scope and the token to `close_scope` it with (None when joined).
    Without a client, a new run uses the shared default client, or in async code its own
    AsyncClient (closed with the scope)."""
    joined = current.get()
    if joined is not None and (run_id is None or run_id == joined.run_id):
        return joined, None
    rid = new_run_id(run_id)
    owned = client is None and asynchronous
    if client is None:
        client = AsyncClient() if asynchronous else default_client()
    scope = Scope(client.run(rid), owned=owned)
    return scope, current.set(scope)


def close_scope(scope: Scope, token: Token[Scope | None] | None) -> None:
    if token is not None:
        current.reset(token)
        scope.close()


async def aclose_scope(scope: Scope, token: Token[Scope | None] | None) -> None:
    if token is not None:
        current.reset(token)
        await scope.aclose()


class RunContext(Generic[R]):
    """`with tether.run(client, "job-1") as run:` (or `async with`): code inside, and the
    `@tether.tool` calls and wrapped clients it uses, belong to that run."""

    def __init__(self, client: Client | AsyncClient | None, run_id: str | None) -> None:
        self._client = client
        self._run_id = run_id
        self._opened: list[tuple[Scope, Token[Scope | None] | None]] = []

    def __enter__(self) -> R:
        scope, token = open_scope(self._client, self._run_id, asynchronous=False)
        self._opened.append((scope, token))
        return cast(R, scope.run)

    def __exit__(self, *exc_info: object) -> None:
        close_scope(*self._opened.pop())

    async def __aenter__(self) -> R:
        scope, token = open_scope(self._client, self._run_id, asynchronous=True)
        self._opened.append((scope, token))
        return cast(R, scope.run)

    async def __aexit__(self, *exc_info: object) -> None:
        await aclose_scope(*self._opened.pop())


@overload
def run(client: Client, run_id: str | None = None) -> RunContext[Run]: ...
@overload
def run(client: AsyncClient, run_id: str | None = None) -> RunContext[AsyncRun]: ...
@overload
def run(client: None = None, run_id: str | None = None) -> RunContext[Any]: ...


def run(client: Client | AsyncClient | None = None, run_id: str | None = None) -> RunContext[Any]:
    """Make `run_id` (else $TETHER_RUN_ID, else a fresh uuid) the current run, on `client`
    (else the default client to $TETHER_ADDRESS; in `async with`, an AsyncClient of its own).
    Inside a run already current, joins it unless `run_id` names another."""
    return RunContext(client, run_id)
