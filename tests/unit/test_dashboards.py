"""The Grafana dashboards: generated output is fresh and valid for file provisioning."""

from __future__ import annotations

import json
import re
import runpy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

DASHBOARDS = ROOT / "dashboards"
FILES = ("tether-overview.json", "tether-runs.json")
PROVISIONING = DASHBOARDS / "provisioning"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def datasource_uids(node: Any) -> Iterator[str]:
    """The uid of every `datasource` reference anywhere in a dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value["uid"]
            else:
                yield from datasource_uids(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_uids(item)


def test_generated_json_is_fresh() -> None:
    """Running dashboards/generate.py gives the committed JSON byte for byte."""
    render = runpy.run_path(str(DASHBOARDS / "generate.py"))["render"]
    rendered = {path.name: text for path, text in render().items()}
    assert sorted(rendered) == sorted(FILES)
    for name, text in rendered.items():
        committed = (DASHBOARDS / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale: run python dashboards/generate.py"


@pytest.mark.parametrize("name", FILES)
def test_panel_ids_are_unique(name: str) -> None:
    """No two panels of a dashboard share an id."""
    ids = [panel["id"] for panel in panels(load(name))]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("name", FILES)
def test_datasources_are_provisioned_by_uid(name: str) -> None:
    """Every datasource uid a dashboard uses exists in the provisioned datasources file."""
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yaml").read_text())
    known = {source["uid"] for source in provisioned["datasources"]}
    assert known == {"prometheus", "tempo"}
    used = set(datasource_uids(load(name)))
    assert used and used <= known, used - known


@pytest.mark.parametrize("name", FILES)
def test_no_import_placeholders(name: str) -> None:
    """No `${DS_...}` inputs: provisioning from files cannot fill them in."""
    text = (DASHBOARDS / name).read_text(encoding="utf-8")
    assert "${DS_" not in text and "__inputs" not in text


@pytest.mark.parametrize("name", FILES)
def test_every_panel_says_what_it_answers(name: str) -> None:
    """Every panel has a title and a description; every query panel has targets with refIds."""
    for panel in panels(load(name)):
        assert panel.get("title") and panel.get("description"), panel.get("id")
        if panel["type"] != "row":
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]


def test_variables_are_present() -> None:
    """Both dashboards filter by upstream (multi, All = `.*`); the runs dashboard by run id."""
    for name in FILES:
        variables = {v["name"]: v for v in load(name)["templating"]["list"]}
        upstream = variables["upstream"]
        assert upstream["query"] == "label_values(tether_calls_total, upstream)"
        assert upstream["multi"] and upstream["includeAll"] and upstream["allValue"] == ".*"
        assert upstream["datasource"]["uid"] == "prometheus"
    assert load("tether-runs.json")["templating"]["list"][0]["type"] == "textbox"


def test_latency_panel_shows_exemplars() -> None:
    """The latency quantiles come from the GenAI duration histogram, with exemplars on."""
    (latency,) = [p for p in panels(load("tether-overview.json")) if "Latency" in p["title"]]
    exprs = [target["expr"] for target in latency["targets"]]
    assert all("gen_ai_client_operation_duration_seconds_bucket" in e for e in exprs)
    assert all(target.get("exemplar") is True for target in latency["targets"])


def test_runs_dashboard_searches_tempo_by_conversation_id() -> None:
    """The runs dashboard finds a run's traces with TraceQL on gen_ai.conversation.id."""
    queries = [
        t["query"]
        for p in panels(load("tether-runs.json"))
        for t in p.get("targets", [])
        if t["datasource"]["uid"] == "tempo"
    ]
    assert '{ span."gen_ai.conversation.id" = "$run_id" }' in queries


def test_dashboard_provider_reads_the_mounted_directory() -> None:
    """The file provider points at /var/lib/grafana/dashboards, where compose mounts the JSON."""
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yaml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"] == "/var/lib/grafana/dashboards"


def exposed_names() -> set[str]:
    """The sample names sidecar/telemetry/metrics.py exposes (`_total`, `_bucket`, ...)."""
    from sidecar.telemetry.metrics import Metrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "info": ("_info",),
                "histogram": ("_bucket", "_sum", "_count")}  # fmt: skip
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


@pytest.mark.parametrize("name", FILES)
def test_queries_use_metrics_the_sidecar_defines(name: str) -> None:
    """Every metric a Prometheus query names is one that sidecar/telemetry/metrics.py defines."""
    known = exposed_names()
    for panel in panels(load(name)):
        for target in panel.get("targets", []):
            if target["datasource"]["uid"] == "prometheus":
                used = set(re.findall(r"\b((?:tether|gen_ai)_\w+)(?=[{\[]|$)", target["expr"]))
                assert used and used <= known, f"{panel['title']}: {used - known}"
