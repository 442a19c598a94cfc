"""Build upstream adapters from configuration."""

from __future__ import annotations

from sidecar.config import (
    AnthropicUpstreamConfig,
    Config,
    GuardedUpstreamConfig,
    HttpUpstreamBase,
    HttpUpstreamConfig,
    MockUpstreamConfig,
    OpenAIUpstreamConfig,
    resolve_secret,
)
from sidecar.upstreams.base import Upstream


def build_upstream(name: str, config: Config) -> Upstream:
    """One adapter for `config.upstreams[name]`; ConfigError when its secret is missing."""
    spec = config.upstreams[name]
    limit = config.limits.max_response_bytes
    if isinstance(spec, MockUpstreamConfig):
        from sidecar.upstreams.mock import MockUpstream

        return MockUpstream(name, spec)
    if isinstance(spec, GuardedUpstreamConfig):
        from sidecar.upstreams.guarded import GuardedUpstream

        return GuardedUpstream(name, spec)
    api_key = resolve_secret(spec.api_key_env, what=f"upstreams.{name}.api_key_env")
    secret_headers = _secret_headers(name, spec)
    if isinstance(spec, OpenAIUpstreamConfig):
        from sidecar.upstreams.openai import OpenAIUpstream

        return OpenAIUpstream(
            name, spec, api_key=api_key, max_response_bytes=limit, secret_headers=secret_headers
        )
    if isinstance(spec, AnthropicUpstreamConfig):
        from sidecar.upstreams.anthropic import AnthropicUpstream

        return AnthropicUpstream(
            name, spec, api_key=api_key, max_response_bytes=limit, secret_headers=secret_headers
        )
    if isinstance(spec, HttpUpstreamConfig):
        from sidecar.upstreams.http import HttpUpstream

        return HttpUpstream(
            name, spec, api_key=api_key, max_response_bytes=limit, secret_headers=secret_headers
        )
    raise AssertionError(f"no adapter for upstream type {spec.type!r}")


def _secret_headers(name: str, spec: HttpUpstreamBase) -> dict[str, str]:
    """The values of `headers_env`, each read like `api_key_env` (ConfigError when missing)."""
    return {
        header: resolve_secret(env_name, what=f"upstreams.{name}.headers_env.{header}")
        for header, env_name in spec.headers_env.items()
    }


def build_upstreams(config: Config) -> dict[str, Upstream]:
    """Adapters for every configured upstream, by name."""
    return {name: build_upstream(name, config) for name in config.upstreams}
