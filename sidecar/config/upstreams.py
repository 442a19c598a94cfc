"""The upstream types: `openai`, `anthropic`, `http`, `mock`, `guarded` (`upstreams.<name>`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sidecar.config.base import CONTROL_CHARS, DEFAULT_TIMEOUT_S, HEADER_NAME, StrictModel
from sidecar.config.policies import Policies


class _UpstreamBase(StrictModel):
    kind: Literal["model", "tool"]
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    policies: Policies = Field(default_factory=Policies)
    # Whether re-sending the same request is harmless; model upstreams default to yes.
    idempotent: bool | None = None
    # The model name this upstream's provider knows: every request it serves is sent with
    # `model` set to it (null: the caller's model, as sent). Model upstreams only.
    model: str | None = Field(None, min_length=1)
    # how this upstream may take over a stream cut after chunks reached the caller
    # (`sidecar.recovery`): prefill (then replay), replay, or not at all
    continuation: Literal["prefill", "replay", "none"] = "replay"
    # merged into the body of a prefill request (e.g. vLLM's continue_final_message: true,
    # add_generation_prompt: false)
    prefill_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _model_for_models(self) -> _UpstreamBase:
        if self.model is not None and self.kind != "model":
            raise ValueError("model is for model upstreams (kind: model), not tools")
        return self

    @property
    def is_idempotent(self) -> bool:
        return self.kind == "model" if self.idempotent is None else self.idempotent

    @property
    def attempt_timeout_s(self) -> float:
        """The per-attempt timeout: `policies.timeout_s`, else `timeout_s`."""
        return self.policies.timeout_s or self.timeout_s


def _check_header_names(names: list[str]) -> None:
    for name in names:
        if not HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid HTTP header name")


class HttpUpstreamBase(_UpstreamBase):
    """What the HTTP adapters share: a key, static and secret headers, a connection pool."""

    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # header name -> the environment variable holding its (secret) value
    headers_env: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict)
    max_connections: int = Field(100, gt=0)

    @field_validator("headers")
    @classmethod
    def _header_values(cls, value: dict[str, str]) -> dict[str, str]:
        _check_header_names(list(value))
        for name, text in value.items():
            if CONTROL_CHARS.search(text):
                raise ValueError(f"the value of {name!r} contains control characters (CR, LF...)")
        return value

    @field_validator("headers_env")
    @classmethod
    def _secret_headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        _check_header_names(list(value))
        plain = {name.lower() for name in info.data.get("headers") or {}}
        for name in value:
            if name.lower() in plain:
                raise ValueError(f"header {name!r} is also set in headers")
        return value


class OpenAIUpstreamConfig(HttpUpstreamBase):
    """An OpenAI-compatible API (`/chat/completions`, `/embeddings`)."""

    type: Literal["openai"]
    kind: Literal["model", "tool"] = "model"
    base_url: str = Field(pattern=r"^https?://")


class AnthropicUpstreamConfig(HttpUpstreamBase):
    """Anthropic's Messages API (`/v1/messages`); `base_url` is the API root."""

    type: Literal["anthropic"]
    kind: Literal["model"] = "model"
    base_url: str = Field(pattern=r"^https?://")
    anthropic_version: str = Field("2023-06-01", min_length=1)  # the anthropic-version header


class HttpUpstreamConfig(HttpUpstreamBase):
    """A generic JSON tool endpoint: the payload is POSTed, the JSON body returned."""

    type: Literal["http"]
    kind: Literal["model", "tool"] = "tool"
    url: str = Field(pattern=r"^https?://")


class MockOutage(StrictModel):
    """A phase where every call fails: from hit `after_hits` + 1, for `duration_s` seconds."""

    after_hits: int = Field(ge=0)
    duration_s: float = Field(gt=0)


class MockUpstreamConfig(_UpstreamBase):
    """The built-in deterministic upstream: no network, configurable faults."""

    type: Literal["mock"]
    latency_ms: float = Field(0.0, ge=0)
    failure_rate: float = Field(0.0, ge=0, le=1)
    fail_first: int = Field(0, ge=0)
    outage: MockOutage | None = None
    failure_kind: Literal["status", "hang", "reset", "garbage"] = "status"
    failure_status: int = Field(503, ge=400, le=599)
    seed: int = 0
    stream_chunks: int = Field(4, ge=1)


class GuardedUpstreamConfig(_UpstreamBase):
    """A dependency the agent calls itself; the sidecar only guards it (BeginCall/EndCall)."""

    type: Literal["guarded"]


UpstreamConfig = Annotated[
    OpenAIUpstreamConfig
    | AnthropicUpstreamConfig
    | HttpUpstreamConfig
    | MockUpstreamConfig
    | GuardedUpstreamConfig,
    Field(discriminator="type"),
]
