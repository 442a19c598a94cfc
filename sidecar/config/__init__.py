"""The sidecar's configuration: one YAML file, validated by pydantic.

Models are frozen and forbid unknown keys, so a typo is an error that names its field. Secrets
are never in the file: a field ending in `_env` names the environment variable that holds it.
Defaults live in this package and only here (`base`: addresses and limits, `policies`,
`upstreams`; this module: the file as a whole, its loading and its cross-checks).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, overload

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from sidecar.config.base import (
    CONTROL_CHARS,
    DEFAULT_GRACE_S,
    DEFAULT_GRPC_ADDRESS,
    DEFAULT_JOURNAL_PATH,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TOTAL_TIMEOUT_S,
    StrictModel,
    is_loopback_host,
    split_host_port,
)
from sidecar.config.policies import (
    DEFAULT_RETRY_ON,
    BreakerPolicy,
    BulkheadPolicy,
    Policies,
    RateLimitPolicy,
    RetryCondition,
    RetryPolicy,
    StreamPolicy,
)
from sidecar.config.upstreams import (
    AnthropicUpstreamConfig,
    GuardedUpstreamConfig,
    HttpUpstreamBase,
    HttpUpstreamConfig,
    MockOutage,
    MockUpstreamConfig,
    OpenAIUpstreamConfig,
    UpstreamConfig,
)

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_JOURNAL_PATH",
    "DEFAULT_MAX_ENTRY_BYTES",
    "DEFAULT_RETRY_ON",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TOTAL_TIMEOUT_S",
    "AnthropicUpstreamConfig",
    "AuthConfig",
    "BreakerPolicy",
    "BulkheadPolicy",
    "Config",
    "ConfigError",
    "GuardedUpstreamConfig",
    "HttpUpstreamBase",
    "HttpUpstreamConfig",
    "JournalConfig",
    "LimitsConfig",
    "ListenConfig",
    "MockOutage",
    "MockUpstreamConfig",
    "OpenAIUpstreamConfig",
    "Policies",
    "Price",
    "RateLimitPolicy",
    "RetentionConfig",
    "RetryCondition",
    "RetryPolicy",
    "RouteConfig",
    "RouteTarget",
    "ShutdownConfig",
    "StateConfig",
    "StreamPolicy",
    "TelemetryConfig",
    "UpstreamConfig",
    "default_config",
    "default_config_text",
    "load_config",
    "load_config_text",
    "parse_config",
    "resolve_secret",
    "secret_fields",
    "split_host_port",
    "target_model",
]


class ListenConfig(StrictModel):
    """Where the sidecar listens. TCP binds to loopback unless `allow_remote` says otherwise."""

    grpc: list[str] = Field(default_factory=lambda: [DEFAULT_GRPC_ADDRESS], min_length=1)
    metrics: str | None = DEFAULT_METRICS_ADDRESS
    http: str | None = None  # the OpenAI-compatible front (host:port); off when unset
    allow_remote: bool = False

    @field_validator("grpc", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("grpc")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if address.startswith("unix:"):
                if not address.removeprefix("unix:").removeprefix("//"):
                    raise ValueError(f"unix socket address {address!r} has no path")
            else:
                split_host_port(address)
        return value

    @field_validator("http")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @model_validator(mode="after")
    def _loopback_only(self) -> ListenConfig:
        if self.allow_remote:
            return self
        tcp = [address for address in (self.metrics, self.http) if address]
        for address in [*self.grpc, *tcp]:
            if address.startswith("unix:"):
                continue
            host, _ = split_host_port(address)
            if not is_loopback_host(host):
                raise ValueError(
                    f"{address!r} is not a loopback address; set listen.allow_remote: true "
                    "to listen beyond this machine"
                )
        return self


class LimitsConfig(StrictModel):
    """Bounds that protect the sidecar from oversized or too many requests."""

    max_payload_bytes: int = Field(DEFAULT_MAX_PAYLOAD_BYTES, gt=0)
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, gt=0)
    max_concurrent_rpcs: int = Field(DEFAULT_MAX_CONCURRENT_RPCS, gt=0)


class ShutdownConfig(StrictModel):
    """SIGTERM drain: in-flight calls get `grace_s` seconds to finish."""

    grace_s: float = Field(DEFAULT_GRACE_S, ge=0)


class AuthConfig(StrictModel):
    """Optional bearer token required on every RPC, read from an environment variable."""

    token_env: str = Field(min_length=1)


class RouteTarget(StrictModel):
    """An upstream, and the model to ask it for (null: the upstream's own `model`, else the
    caller's). Written as a mapping, or as the upstream's name alone."""

    upstream: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1)


def _target(value: Any) -> Any:
    return {"upstream": value} if isinstance(value, str) else value


class RouteConfig(StrictModel):
    """A model name of the HTTP front, the model upstream that serves it and the model it is
    asked for there (`model`; null: the upstream's own `model`, else the caller's).

    `fallback`: the targets that take the call, in order, when `upstream` cannot (an
    upstream's name, or `{upstream, model}`); unset, the upstream's own `policies.fallback`.
    `context_fallback`: a larger-context target that takes a call the others refused as too
    long for their context window.
    """

    upstream: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1)
    fallback: list[RouteTarget] | None = None
    context_fallback: RouteTarget | None = None
    # the call's whole budget (null: the upstream's `policies.total_timeout_s`)
    total_timeout_s: float | None = Field(None, gt=0)

    @field_validator("fallback", mode="before")
    @classmethod
    def _fallback_targets(cls, value: Any) -> Any:
        return [_target(item) for item in value] if isinstance(value, list) else value

    @field_validator("context_fallback", mode="before")
    @classmethod
    def _context_target(cls, value: Any) -> Any:
        return _target(value)

    @property
    def primary(self) -> RouteTarget:
        return RouteTarget(upstream=self.upstream, model=self.model)


class RetentionConfig(StrictModel):
    """How long journal entries and checkpoints are kept; enforced every `interval_s`."""

    max_age_s: float = Field(7 * 86400.0, gt=0)
    max_entries_per_run: int = Field(10_000, ge=1)
    max_checkpoints_per_run: int = Field(100, ge=1)
    interval_s: float = Field(60.0, gt=0)


class JournalConfig(StrictModel):
    """The durable call journal and checkpoints (`backend: none` turns replay off)."""

    backend: Literal["sqlite", "postgres", "none"] = "sqlite"
    path: str = DEFAULT_JOURNAL_PATH  # sqlite: the database file
    # full: a commit survives power loss (fsync per group commit); normal: process crashes only
    synchronous: Literal["full", "normal"] = "full"
    # sqlite: how long a commit waits for the outcomes of other journaled calls in flight
    # (group commit under load, as PostgreSQL's commit_delay; 0: never waits)
    commit_delay_s: float = Field(0.0005, ge=0, le=0.05)
    max_entry_bytes: int = Field(DEFAULT_MAX_ENTRY_BYTES, gt=0)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    # postgres: the libpq connection string, in the file or (with a password) in a variable
    dsn: str | None = None
    dsn_env: str | None = None
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(8, ge=1)
    store_timeout_s: float = Field(5.0, gt=0)  # each statement's bound

    @model_validator(mode="after")
    def _postgres_dsn(self) -> JournalConfig:
        if self.backend == "postgres" and (self.dsn is None) == (self.dsn_env is None):
            raise ValueError("backend postgres needs exactly one of dsn or dsn_env")
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min is larger than pool_max")
        return self

    @property
    def enabled(self) -> bool:
        return self.backend != "none"


class StateConfig(StrictModel):
    """Where rate-limit buckets and breaker states live: this process (`memory`), or a Redis
    server shared by every sidecar that names the same upstream under the same `key_prefix`."""

    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None  # redis://host:port/db, without a password
    url_env: str | None = None  # or a variable holding the URL (with a password)
    key_prefix: str = Field("tether", min_length=1)
    timeout_s: float = Field(0.25, gt=0)  # each store round trip's bound
    # how many sidecars share the store: a failed store leaves each 1/replicas of a limit
    replicas: int = Field(1, ge=1)
    retry_after_s: float = Field(1.0, gt=0)  # how soon a failed store is tried again

    @model_validator(mode="after")
    def _redis_url(self) -> StateConfig:
        if self.backend == "redis" and (self.url is None) == (self.url_env is None):
            raise ValueError("backend redis needs exactly one of url or url_env")
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return self


class Price(StrictModel):
    """What a model costs, in US dollars per million tokens."""

    input_per_1m_usd: float = Field(ge=0)
    output_per_1m_usd: float = Field(ge=0)


class TelemetryConfig(StrictModel):
    """Traces (OTLP, configured by the standard OTEL_* variables), logs and cost estimates."""

    # auto: on when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set
    traces: Literal["auto", "on", "off"] = "auto"
    # prompt and completion text in spans; null: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
    capture_content: bool | None = None
    log_format: Literal["json", "text"] = "json"
    log_calls: bool = False  # one info line per finished call
    # by request model name; "*" applies to models not listed
    prices: dict[str, Price] = Field(default_factory=dict)


class Config(StrictModel):
    """The whole configuration file."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    auth: AuthConfig | None = None
    journal: JournalConfig = Field(default_factory=JournalConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    # model name -> upstream for the HTTP front; empty: every model upstream under its name
    routes: dict[str, RouteConfig] = Field(default_factory=dict)

    @field_validator("upstreams")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"upstream name {name!r} may use letters, digits, '-', '_', '.'")
        return value

    def version(self) -> str:
        """A short hash of the effective configuration (secrets are not in it)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


class ConfigError(Exception):
    """A configuration file cannot be used; `problems` lists `field.path: reason` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


def _location(loc: tuple[int | str, ...], tags: set[str]) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        # pydantic puts the discriminator's tag after `upstreams.<name>`; drop it.
        if i == 2 and loc[0] == "upstreams" and part in tags:
            continue
        parts.append(str(part))
    return ".".join(parts) or "(top level)"


def _problems(exc: ValidationError) -> list[str]:
    tags = {"openai", "anthropic", "http", "mock", "guarded"}
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        message = err["msg"].removeprefix("Value error, ")
        where = _location(err["loc"], tags)
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            where += ".type"  # the discriminator is the field at fault
        problems.append(f"{where}: {message}")
    return problems


def _wire(spec: Any) -> str:
    """The request shape an upstream takes: a fallback must take the same one (the mock
    answers every model shape)."""
    return {"anthropic": "anthropic", "openai": "openai"}.get(spec.type, "any")


def _target_problem(config: Config, kind: str, wire: str, other: str) -> str | None:
    """Why upstream `other` cannot take calls meant for a `kind` upstream of `wire` shape."""
    target = config.upstreams.get(other)
    if target is None:
        return f"no upstream named {other!r}"
    if target.kind != kind:
        return f"{other!r} is a {target.kind}, not a {kind}"
    if isinstance(target, GuardedUpstreamConfig):
        return f"{other!r} is guarded; the sidecar cannot call it"
    if "any" not in (wire, _wire(target)) and wire != _wire(target):
        return f"{other!r} takes {_wire(target)} requests, not {wire}"
    return None


def target_model(config: Config, target: RouteTarget) -> str | None:
    """The model a target asks its upstream for (None: the caller's)."""
    return target.model or config.upstreams[target.upstream].model


def _list_problems(
    config: Config, where: str, primary: RouteTarget, others: list[RouteTarget]
) -> list[str]:
    """Each of `others` must be another target `primary`'s calls can go to."""
    problems = []
    spec = config.upstreams[primary.upstream]
    seen = [primary]
    for other in others:
        problem = _target_problem(config, spec.kind, _wire(spec), other.upstream)
        if problem:
            problems.append(f"{where}: {problem}")
        elif any(_same(config, other, earlier) for earlier in seen):
            model = target_model(config, other)
            named = f"{other.upstream!r}" + (f" (model {model!r})" if model else "")
            problems.append(f"{where}: {named} is listed twice or is the primary itself")
        seen.append(other)
    return problems


def _same(config: Config, one: RouteTarget, other: RouteTarget) -> bool:
    return one.upstream == other.upstream and target_model(config, one) == target_model(
        config, other
    )


def _cross_check(config: Config) -> list[str]:
    """Problems between fields (fallbacks must name other upstreams of the same kind)."""
    problems = []
    for name, spec in config.upstreams.items():
        where = f"upstreams.{name}.policies.fallback"
        others = [RouteTarget(upstream=other) for other in spec.policies.fallback]
        problems += _list_problems(config, where, RouteTarget(upstream=name), others)
    return problems + _route_problems(config)


def _route_problems(config: Config) -> list[str]:
    """Each route must name model upstreams the sidecar can call."""
    problems = []
    for model, route in config.routes.items():
        where = f"routes.{model}"
        problem = _target_problem(config, "model", "any", route.upstream)
        if problem:
            problems.append(f"{where}.upstream: {problem}")
            continue
        if route.fallback is not None:
            problems += _list_problems(config, f"{where}.fallback", route.primary, route.fallback)
        if route.context_fallback is not None:
            spec = config.upstreams[route.upstream]
            context = route.context_fallback.upstream
            problem = _target_problem(config, "model", _wire(spec), context)
            if problem:
                problems.append(f"{where}.context_fallback: {problem}")
    return problems


_UPSTREAM: TypeAdapter[UpstreamConfig] = TypeAdapter(UpstreamConfig)


def _partial_cross_check(data: dict[str, Any]) -> list[str]:
    """The cross-field problems among the upstreams and routes that are valid on their own,
    when other fields are not: one pass reports both kinds. A reference to an upstream that
    is present but invalid is not reported again."""
    upstreams, broken = {}, set()
    raw_upstreams = data.get("upstreams")
    for name, spec in raw_upstreams.items() if isinstance(raw_upstreams, dict) else ():
        try:
            upstreams[name] = _UPSTREAM.validate_python(spec)
        except ValidationError:
            broken.add(name)
    routes = {}
    raw_routes = data.get("routes")
    for model, spec in raw_routes.items() if isinstance(raw_routes, dict) else ():
        with contextlib.suppress(ValidationError):
            routes[model] = RouteConfig.model_validate(spec)
    partial = Config.model_construct(upstreams=upstreams, routes=routes)
    try:
        problems = _cross_check(partial)
    except Exception:  # a partial config the checks cannot read: the field errors stand alone
        return []
    return [p for p in problems if not any(f"no upstream named {b!r}" in p for b in broken)]


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate already-loaded YAML data; ConfigError names each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc) + _partial_cross_check(data)) from None
    problems = _cross_check(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config_text(text: str, source: str = "<config>") -> Config:
    """Parse and validate YAML text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"(yaml) {where}{problem}"]) from None
    return parse_config(data, source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a YAML configuration file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"(file) cannot read: {exc.strerror}"]) from None
    return load_config_text(text, str(path))


def default_config_text() -> str:
    """The embedded default configuration: built-in mock upstreams, no network, no keys."""
    return resources.files("sidecar").joinpath("defaults.yaml").read_text(encoding="utf-8")


def default_config() -> Config:
    return load_config_text(default_config_text(), "<embedded defaults>")


@overload
def resolve_secret(env_name: str, *, what: str) -> str: ...


@overload
def resolve_secret(env_name: None, *, what: str) -> None: ...


def resolve_secret(env_name: str | None, *, what: str) -> str | None:
    """The value of a secret's environment variable without surrounding whitespace (a secret
    file's trailing newline); ConfigError, naming only the variable, when it is unset, empty
    or holds control characters."""
    if env_name is None:
        return None
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise ConfigError(what, [f"environment variable {env_name} is not set or empty"])
    if CONTROL_CHARS.search(value):
        raise ConfigError(what, [f"environment variable {env_name} contains control characters"])
    return value


def secret_fields(config: Config) -> list[tuple[str, str]]:
    """Every field that names a secret: (its path, the environment variable it names)."""
    fields = []
    for name, spec in config.upstreams.items():
        env = getattr(spec, "api_key_env", None)
        if env:
            fields.append((f"upstreams.{name}.api_key_env", env))
        for header, var in (getattr(spec, "headers_env", None) or {}).items():
            fields.append((f"upstreams.{name}.headers_env.{header}", var))
    if config.auth:
        fields.append(("auth.token_env", config.auth.token_env))
    if config.journal.dsn_env:
        fields.append(("journal.dsn_env", config.journal.dsn_env))
    if config.state.url_env:
        fields.append(("state.url_env", config.state.url_env))
    return fields
