"""Configuration parsing and validation."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config import (
    ConfigError,
    MockUpstreamConfig,
    OpenAIUpstreamConfig,
    RouteTarget,
    default_config,
    load_config_text,
    parse_config,
    resolve_secret,
)
from sidecar.upstreams.registry import build_upstreams

GOOD = """
listen:
  grpc: unix:tether.sock
  metrics: 127.0.0.1:9464
upstreams:
  llm:    {kind: model, type: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY, timeout_s: 60}
  search: {kind: tool,  type: http,   url: "http://127.0.0.1:8080/search", timeout_s: 10}
  mock:   {kind: model, type: mock,   latency_ms: 20, failure_rate: 0.0}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "test.yaml")
    return info.value.problems


def test_issue_example_parses() -> None:
    """The example configuration of the issue is valid as written."""
    config = load_config_text(GOOD)
    assert config.listen.grpc == ["unix:tether.sock"]
    assert set(config.upstreams) == {"llm", "search", "mock"}
    assert isinstance(config.upstreams["mock"], MockUpstreamConfig)
    assert config.upstreams["search"].timeout_s == 10


def test_unknown_upstream_type_names_field() -> None:
    """An unknown upstream type is reported at upstreams.<name>.type."""
    problems = problems_of("upstreams:\n  x: {kind: tool, type: ftp}\n")
    assert len(problems) == 1
    assert problems[0].startswith("upstreams.x.type:")
    assert "'ftp'" in problems[0]


def test_missing_url_names_field() -> None:
    """A missing url is reported with its path, without the discriminator tag."""
    assert problems_of("upstreams:\n  s: {kind: tool, type: http}\n") == [
        "upstreams.s.url: Field required"
    ]


def test_negative_timeout_names_field() -> None:
    """A negative timeout is reported at its field path."""
    problems = problems_of("upstreams:\n  m: {kind: model, type: mock, timeout_s: -1}\n")
    assert problems == ["upstreams.m.timeout_s: Input should be greater than 0"]


def test_unknown_key_is_an_error() -> None:
    """A typo in a key is an error naming the key, not silently ignored."""
    assert problems_of("listen:\n  grcp: unix:x.sock\n") == ["listen.grcp: unknown key"]


def test_every_problem_is_listed() -> None:
    """Several problems in one file are all reported, one per line."""
    text = "upstreams:\n  a: {kind: tool, type: http}\n  b: {kind: mock, type: mock}\nextra: 1\n"
    problems = problems_of(text)
    assert "upstreams.a.url: Field required" in problems
    assert any(p.startswith("upstreams.b.kind:") for p in problems)
    assert "extra: unknown key" in problems


def test_yaml_syntax_error_has_line() -> None:
    """Broken YAML is reported with its line and column."""
    problems = problems_of("upstreams:\n  a: {kind: tool\n")
    assert problems[0].startswith("(yaml) line ")


def test_remote_listen_requires_opt_in() -> None:
    """TCP binds beyond loopback only with listen.allow_remote."""
    problems = problems_of("listen:\n  grpc: 0.0.0.0:7700\n")
    assert "not a loopback address" in problems[0]
    config = load_config_text("listen:\n  grpc: 0.0.0.0:7700\n  allow_remote: true\n")
    assert config.listen.grpc == ["0.0.0.0:7700"]


def test_malformed_address_rejected() -> None:
    """An address that is neither host:port nor unix:PATH names listen.grpc."""
    problems = problems_of("listen:\n  grpc: [localhost]\n")
    assert problems[0].startswith("listen.grpc:")


def test_top_level_must_be_mapping() -> None:
    """A file that is a list, not a mapping, is a clear error."""
    assert "expected a mapping" in problems_of("- a\n- b\n")[0]


def test_defaults_are_valid_and_offline() -> None:
    """The embedded defaults parse and use only built-in mock upstreams."""
    config = default_config()
    assert config.upstreams
    assert all(u.type == "mock" for u in config.upstreams.values())


def test_idempotent_defaults_by_kind() -> None:
    """Model upstreams are idempotent by default, tools are not, unless configured."""
    config = load_config_text(GOOD)
    assert config.upstreams["llm"].is_idempotent
    assert not config.upstreams["search"].is_idempotent


def test_missing_secret_names_variable_not_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing secret names the variable; a present one is returned."""
    monkeypatch.delenv("TT_SECRET", raising=False)
    with pytest.raises(ConfigError) as info:
        resolve_secret("TT_SECRET", what="upstreams.llm.api_key_env")
    assert "TT_SECRET" in str(info.value)
    monkeypatch.setenv("TT_SECRET", "sk-very-secret")
    assert resolve_secret("TT_SECRET", what="x") == "sk-very-secret"


def test_secret_surrounding_whitespace_is_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret's surrounding whitespace (a secret file's trailing newline) is dropped."""
    monkeypatch.setenv("TT_SECRET", " sk-very-secret\n")
    assert resolve_secret("TT_SECRET", what="x") == "sk-very-secret"
    monkeypatch.setenv("TT_SECRET", " \n")
    with pytest.raises(ConfigError, match="TT_SECRET is not set or empty"):
        resolve_secret("TT_SECRET", what="x")


@pytest.mark.parametrize("value", ["sk-a\nb", "sk-a\r\nb", "sk-a\tb", "sk-a\x1bb", "sk-a\x7fb"])
def test_secret_with_control_characters_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A secret holding control characters is a ConfigError naming the variable, not the value."""
    monkeypatch.setenv("TT_SECRET", value)
    with pytest.raises(ConfigError) as info:
        resolve_secret("TT_SECRET", what="upstreams.llm.api_key_env")
    text = str(info.value)
    assert "TT_SECRET" in text and "control characters" in text
    assert "sk-" not in text


def http_upstreams(**fields: Any) -> dict[str, Any]:
    """Config data with one openai and one http upstream carrying `fields`."""
    return {
        "upstreams": {
            "llm": {"type": "openai", "base_url": "https://example.test/v1", **fields},
            "tool": {"type": "http", "url": "https://example.test/tool", **fields},
        }
    }


def problems_of_data(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\x00b", "a\x1bb", "a\x7f"])
def test_header_values_with_control_characters_are_refused(value: str) -> None:
    """A configured header value with CR, LF, NUL or another control character names its field."""
    problems = problems_of_data(http_upstreams(headers={"X-Org": value}))
    assert [p.split(":")[0] for p in problems] == [
        "upstreams.llm.headers",
        "upstreams.tool.headers",
    ]
    assert all("'X-Org'" in p and "control characters" in p for p in problems)


def test_headers_env_maps_header_names_to_variables() -> None:
    """headers_env maps header names to environment variables, next to plain headers."""
    data = http_upstreams(headers={"X-Org": "acme"}, headers_env={"X-Api-Key": "TT_HDR"})
    spec = parse_config(data).upstreams["llm"]
    assert isinstance(spec, OpenAIUpstreamConfig)
    assert (spec.headers, spec.headers_env) == ({"X-Org": "acme"}, {"X-Api-Key": "TT_HDR"})


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"headers_env": {"X Key": "TT_HDR"}}, "headers_env", "not a valid HTTP header name"),
        ({"headers_env": {"X-Key": ""}}, "headers_env.X-Key", "at least 1 character"),
        ({"headers": {"Bad:Name": "v"}}, "headers", "not a valid HTTP header name"),
        (
            {"headers": {"x-key": "v"}, "headers_env": {"X-Key": "TT_HDR"}},
            "headers_env",
            "also set in headers",
        ),
    ],
)
def test_bad_headers_env_names_field(fields: dict[str, Any], field: str, reason: str) -> None:
    """Bad header names, empty variable names and clashes with headers name their field."""
    problems = problems_of_data(http_upstreams(**fields))
    assert len(problems) == 2
    for name, problem in zip(("llm", "tool"), problems, strict=True):
        assert problem.startswith(f"upstreams.{name}.{field}:") and reason in problem


def test_headers_env_secrets_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the upstreams reads each headers_env variable; a missing one names its field."""
    data = http_upstreams(headers_env={"X-Api-Key": "TT_HDR"})
    monkeypatch.delenv("TT_HDR", raising=False)
    with pytest.raises(ConfigError) as info:
        build_upstreams(parse_config(data))
    assert info.value.source == "upstreams.llm.headers_env.X-Api-Key"
    assert "TT_HDR" in info.value.problems[0]
    monkeypatch.setenv("TT_HDR", "hdr-secret\n")
    upstreams = build_upstreams(parse_config(data))
    for upstream in upstreams.values():
        assert upstream._headers["X-Api-Key"] == "hdr-secret"  # type: ignore[attr-defined]


def test_config_is_frozen() -> None:
    """Configuration objects cannot be mutated after validation."""
    config = load_config_text(GOOD)
    with pytest.raises(ValueError):
        config.limits.max_payload_bytes = 1  # type: ignore[misc]


def test_http_front_listens_on_loopback_only() -> None:
    """listen.http must be loopback unless listen.allow_remote, and host:port."""
    assert parse_config({"listen": {"http": "127.0.0.1:7701"}}).listen.http == "127.0.0.1:7701"
    assert "not a loopback address" in problems_of_data({"listen": {"http": "0.0.0.0:7701"}})[0]
    assert "expected host:port" in problems_of_data({"listen": {"http": "7701"}})[0]


def route_upstreams() -> dict[str, Any]:
    """Two openai model upstreams, an anthropic one, a mock and an http tool."""
    data = http_upstreams()
    data["upstreams"]["llm-big"] = {"type": "openai", "base_url": "https://big.test/v1"}
    data["upstreams"]["claude"] = {"type": "anthropic", "base_url": "https://claude.test"}
    data["upstreams"]["mock"] = {"type": "mock", "kind": "model"}
    return data


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ({"upstream": "nope"}, "upstream: no upstream named 'nope'"),
        ({"upstream": "tool"}, "upstream: 'tool' is a tool, not a model"),
        ({"upstream": "llm", "fallback": ["llm"]}, "fallback: 'llm' is listed twice or is the"),
        ({"upstream": "llm", "fallback": ["gone"]}, "fallback: no upstream named 'gone'"),
        ({"upstream": "llm", "fallback": ["claude"]}, "takes anthropic requests, not openai"),
        ({"upstream": "llm", "context_fallback": "tool"}, "context_fallback: 'tool' is a tool"),
        ({"upstream": "claude", "context_fallback": "llm"}, "takes openai requests, not anthr"),
        ({"upstream": "llm", "fallbacks": []}, "routes.gpt-4o.fallbacks: unknown key"),
        (
            {"upstream": "llm", "model": "m", "fallback": [{"upstream": "llm", "model": "m"}]},
            "fallback: 'llm' (model 'm') is listed twice or is the primary itself",
        ),
        (
            {"upstream": "llm", "fallback": [{"upstream": "mock", "modl": "x"}]},
            "routes.gpt-4o.fallback.0.modl: unknown key",
        ),
        (
            {"upstream": "llm", "fallback": [{"model": "x"}]},
            "routes.gpt-4o.fallback.0.upstream: Field required",
        ),
        ({"upstream": "llm", "model": ""}, "routes.gpt-4o.model: String should have at least 1"),
    ],
)
def test_routes_must_name_model_upstreams(route: dict[str, Any], reason: str) -> None:
    """A route, its fallbacks and its context fallback name model upstreams of one shape."""
    problems = problems_of_data({**route_upstreams(), "routes": {"gpt-4o": route}})
    assert any(reason in problem for problem in problems), problems


def test_route_fallbacks_parse() -> None:
    """Per-route fallbacks and a context fallback; the mock takes any model shape."""
    routes = {"gpt-4o": {"upstream": "llm", "fallback": ["mock"], "context_fallback": "llm-big"}}
    config = parse_config({**route_upstreams(), "routes": routes})
    assert config.routes["gpt-4o"].fallback == [RouteTarget(upstream="mock")]
    assert config.routes["gpt-4o"].context_fallback == RouteTarget(upstream="llm-big")
    assert parse_config(route_upstreams()).upstreams["claude"].type == "anthropic"


def test_route_targets_name_models() -> None:
    """A route asks its upstream for a model; a fallback may be another model on the same
    upstream, written as a mapping; an upstream's `model` is the default of its targets."""
    data = route_upstreams()
    data["upstreams"]["llm"]["model"] = "gpt-4o"
    routes = {"fast": {"upstream": "llm", "model": "gpt-4o-mini",
                       "fallback": ["llm", {"upstream": "mock", "model": "m2"}],
                       "context_fallback": {"upstream": "llm-big", "model": "gpt-4.1"}}}  # fmt: skip
    route = parse_config({**data, "routes": routes}).routes["fast"]
    assert route.primary == RouteTarget(upstream="llm", model="gpt-4o-mini")
    assert route.fallback == [RouteTarget(upstream="llm"), RouteTarget(upstream="mock", model="m2")]
    assert route.context_fallback == RouteTarget(upstream="llm-big", model="gpt-4.1")


def test_only_model_upstreams_name_a_model() -> None:
    """`model` on a tool upstream is an error that names the field."""
    data = http_upstreams()
    data["upstreams"]["tool"]["model"] = "gpt-4o"
    assert problems_of_data(data) == [
        "upstreams.tool: model is for model upstreams (kind: model), not tools"
    ]


def test_fallbacks_take_the_same_request_shape() -> None:
    """An upstream's fallback must take its request shape (openai vs anthropic)."""
    data = route_upstreams()
    data["upstreams"]["claude"]["policies"] = {"fallback": ["llm"]}
    problems = problems_of_data(data)
    assert problems == [
        "upstreams.claude.policies.fallback: 'llm' takes openai requests, not anthropic"
    ]


@pytest.mark.parametrize(
    ("section", "data", "reason"),
    [
        ("journal", {"backend": "postgres"}, "needs exactly one of dsn or dsn_env"),
        ("journal", {"backend": "postgres", "dsn": "x", "dsn_env": "Y"}, "exactly one of dsn"),
        ("journal", {"pool_min": 9, "pool_max": 2}, "pool_min is larger than pool_max"),
        ("journal", {"commit_delay_s": -1}, "journal.commit_delay_s: Input should be greater"),
        ("journal", {"commit_delay_s": 1}, "journal.commit_delay_s: Input should be less"),
        ("state", {"backend": "redis"}, "needs exactly one of url or url_env"),
        ("state", {"backend": "redis", "url": "http://x"}, "url must start with redis://"),
        ("state", {"replicas": 0}, "state.replicas: Input should be greater than or equal to 1"),
    ],
)
def test_shared_backends_are_checked(section: str, data: dict[str, Any], reason: str) -> None:
    """journal.backend postgres needs a DSN; state.backend redis needs a redis URL."""
    problems = problems_of_data({section: data})
    assert any(reason in problem for problem in problems), problems


def test_shared_backends_parse() -> None:
    config = parse_config(
        {
            "journal": {"backend": "postgres", "dsn": "postgresql://127.0.0.1/test"},
            "state": {"backend": "redis", "url": "redis://127.0.0.1:6379/0", "replicas": 3},
        }
    )
    assert config.journal.dsn == "postgresql://127.0.0.1/test"
    assert (config.state.backend, config.state.replicas) == ("redis", 3)


def test_routes_parse() -> None:
    """A valid route maps a model name to its upstream."""
    config = parse_config({**http_upstreams(), "routes": {"gpt-4o": {"upstream": "llm"}}})
    assert config.routes["gpt-4o"].upstream == "llm"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"upstreams": {"m": {"kind": "model", "type": "mock",
                              "policies": {"total_timeout_s": 0}}}},
         "upstreams.m.policies.total_timeout_s: Input should be greater than 0"),
        ({"upstreams": {"m": {"kind": "model", "type": "mock",
                              "policies": {"retry": {"timeout_retries": -1}}}}},
         "upstreams.m.policies.retry.timeout_retries: Input should be greater than or equal"),
        ({"upstreams": {"m": {"kind": "model", "type": "mock"}},
          "routes": {"x": {"upstream": "m", "total_timeout_s": -5}}},
         "routes.x.total_timeout_s: Input should be greater than 0"),
    ],
)  # fmt: skip
def test_time_budgets_are_checked(data: dict[str, Any], reason: str) -> None:
    """A call's budget and the retries of timeouts name their field when wrong."""
    problems = problems_of_data(data)
    assert any(problem.startswith(reason) for problem in problems), problems


def test_a_routes_budget_overrides_its_upstreams() -> None:
    """`routes.<model>.total_timeout_s` replaces the primary upstream's budget; `null` on
    the upstream turns the budget off."""
    from sidecar.pipeline import Pipeline
    from sidecar.upstreams.registry import build_upstreams

    config = parse_config({
        "upstreams": {"m": {"kind": "model", "type": "mock", "policies": {"total_timeout_s": 30}},
                      "n": {"kind": "model", "type": "mock", "policies": {"total_timeout_s": None}}},
        "routes": {"fast": {"upstream": "m", "total_timeout_s": 5}, "slow": {"upstream": "m"},
                   "free": {"upstream": "n"}},
    })  # fmt: skip
    plans = Pipeline(config, build_upstreams(config)).model_plans
    assert {name: plan.budget_s for name, plan in plans.items()} == {
        "fast": 5, "slow": 30, "free": None}  # fmt: skip


def test_field_and_cross_reference_errors_in_one_pass() -> None:
    """A file with a bad field and a route to a missing upstream reports both at once; a
    reference to an upstream that is present but invalid is reported once, at the upstream."""
    data = {
        "listen": {"http": "7701"},
        "upstreams": {"a": {"kind": "model", "type": "mock"},
                      "bad": {"kind": "model", "type": "mock", "latency_ms": -1}},
        "routes": {"x": {"upstream": "nope"}, "y": {"upstream": "bad"},
                   "z": {"upstream": "a", "fallback": ["gone"]}},
    }  # fmt: skip
    assert problems_of_data(data) == [
        "listen.http: expected host:port or unix:PATH, got '7701'",
        "upstreams.bad.latency_ms: Input should be greater than or equal to 0",
        "routes.x.upstream: no upstream named 'nope'",
        "routes.z.fallback: no upstream named 'gone'",
    ]


@pytest.mark.parametrize("upstreams", [["a"], "a", 3])
def test_upstreams_of_the_wrong_shape_are_one_clear_error(upstreams: Any) -> None:
    """`upstreams` that is not a mapping: one problem naming it, never a traceback."""
    problems = problems_of_data({"upstreams": upstreams, "listen": {"http": "x"}})
    assert any(p.startswith("upstreams: Input should be a valid dictionary") for p in problems)
