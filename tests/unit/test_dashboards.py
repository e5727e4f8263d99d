"""Static checks of deploy/: the Grafana dashboard, its provisioning and the Prometheus config.

Grafana cannot run here, so these tests hold the dashboard to what Grafana and Prometheus need:
valid JSON, unique panel ids, the fixed uids, declared template variables used as regexes, and
only metric and label names that edgetrain/metric_names.py defines. The queries themselves are
run against a real Prometheus in tests/integration/test_prometheus_harness.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrain import metric_names as m

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "edgetrain.json"
GENERATOR = DEPLOY / "grafana" / "gen_dashboard.py"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "edgetrain.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCS = REPO / "docs" / "monitoring.md"

DASHBOARD_UID = "edgetrain-training"
# Grafana's own variables, always defined.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
# Labels a query may use besides metric_names' NODE/REASON/CORE: Prometheus' own (le of histogram
# buckets; job/instance from the scrape) and the keys of the agent's info metric.
AGENT_INFO_LABELS = {"cores", "device", "workers"}
OTHER_LABELS = {"le", "job", "instance", *AGENT_INFO_LABELS}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"), "info": ("_info",)}


# ---- helpers


def dashboard() -> dict[str, Any]:
    def no_nan(name: str) -> None:
        raise ValueError(f"{name} is not JSON (Grafana rejects it)")

    result: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"), parse_constant=no_nan)
    return result


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))  # collapsed rows nest their panels


def queries(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    for panel in walk_panels(d["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def variable_queries(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            definition = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            yield f"${var['name']}", definition


def yaml_scalar(path: Path, key: str) -> list[str]:
    """Every value of ``key: value`` in a simple YAML file (PyYAML is not a dependency)."""
    pattern = rf"^\s*(?:-\s+)?{re.escape(key)}:\s*[\"']?([^\"'#\s]+)[\"']?\s*(?:#.*)?$"
    return re.findall(pattern, path.read_text(encoding="utf-8"), flags=re.MULTILINE)


def provisioned_uid() -> str:
    uids = yaml_scalar(DATASOURCES, "uid")
    assert len(uids) == 1, f"expected one datasource uid in {DATASOURCES}, found {uids}"
    return uids[0]


def metric_kinds() -> dict[str, str]:
    """Metric name -> kind (gauge/counter/histogram/info), from metric_names.py's comments."""
    source = Path(m.__file__).read_text(encoding="utf-8")
    kinds = {}
    for const, kind in re.findall(r"^([A-Z][A-Z0-9_]*)\s*=.*#\s*([a-z]+)", source, flags=re.MULTILINE):
        value = getattr(m, const, None)
        if isinstance(value, str) and value.startswith(m.PREFIX + "_"):
            kinds[value] = kind
    # A name without a recognisable kind comment still counts, with every suffix allowed.
    for const in dir(m):
        value = getattr(m, const)
        if const.isupper() and isinstance(value, str) and value.startswith(m.PREFIX + "_"):
            kinds.setdefault(value, "unknown")
    return kinds


def exposed_names() -> set[str]:
    """The series names Prometheus stores for metric_names' metrics."""
    names = set()
    for name, kind in metric_kinds().items():
        if kind == "unknown":
            names |= {name} | {name + s for ss in SUFFIXES.values() for s in ss}
        elif kind == "info":
            names.add(name + "_info")
        else:
            names.add(name)
            names |= {name + s for s in SUFFIXES.get(kind, ())}
    return names


def known_labels() -> set[str]:
    return {m.NODE, m.REASON, m.CORE} | OTHER_LABELS


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_identifiers(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, keywords, labels or durations)."""
    s = strip_strings(expr)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries: [5m], [$__rate_interval], [1h:1m]
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\$\{?\w+(?::\w+)?\}?", " ", s)  # leftover variables
    found = re.findall(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", s)
    return {name for name in found if name.lower() not in PROMQL_WORDS}


def label_names(expr: str) -> set[str]:
    """Labels in matchers and in by/without/on/ignoring/group_* lists."""
    s = strip_strings(expr)
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", s):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    return labels - {"__name__"}


# ---- the dashboard


def test_dashboard_is_valid_json_with_fixed_uid_and_schema() -> None:
    d = dashboard()
    assert d["uid"] == DASHBOARD_UID
    assert 36 <= d["schemaVersion"] <= 41
    assert d["title"]
    assert d.get("id") is None  # provisioned dashboards must not carry a database id


def test_dashboard_json_matches_its_generator() -> None:
    spec = importlib.util.spec_from_file_location("gen_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render() == DASHBOARD.read_text(encoding="utf-8"), (
        f"{DASHBOARD.relative_to(REPO)} is stale: run python {GENERATOR.relative_to(REPO)}"
    )


def test_panel_ids_unique_and_layout_on_the_grid() -> None:
    panels = list(walk_panels(dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_panel_with_queries_has_them() -> None:
    for panel in walk_panels(dashboard()["panels"]):
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            for t in panel["targets"]:
                assert t.get("expr", "").strip(), f"empty query in {panel['title']!r}"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_datasource_reference_is_the_provisioned_uid() -> None:
    uid = provisioned_uid()
    d = dashboard()
    refs: list[tuple[str, Any]] = []

    def collect(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    refs.append((where, value))
                collect(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                collect(value, f"{where}[{i}]")

    collect(d, "")
    assert refs
    bad = [(w, r) for w, r in refs if r != {"type": "prometheus", "uid": uid}]
    assert not bad, f"datasource refs not {{prometheus, {uid}}}: {bad}"
    # ...and nobody relies on Grafana's default datasource: panel and query level both name it.
    for panel in walk_panels(d["panels"]):
        if panel.get("targets"):
            assert panel.get("datasource", {}).get("uid") == uid, panel["title"]
            for t in panel["targets"]:
                assert t.get("datasource", {}).get("uid") == uid, (panel["title"], t["refId"])


def test_template_variables_are_declared_and_used_as_regexes() -> None:
    d = dashboard()
    declared = {v["name"] for v in d["templating"]["list"]}
    assert "node" in declared
    var_pattern = r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]"
    used = set()
    for title, expr in [*queries(d), *variable_queries(d)]:
        for match in re.finditer(var_pattern, expr):
            name = next(g for g in match.groups() if g)
            assert name in declared | BUILTIN_VARIABLES, f"{title!r}: ${name} is not a template variable"
            if name in declared:
                used.add(name)
                # A multi-value/"All" variable expands to a regex: only =~ (or !~) matches it.
                before = expr[: match.start()]
                assert re.search(r'(=~|!~)\s*"$', before), f'{title!r}: use label=~"${name}" in {expr}'
    assert used == declared, f"declared but unused: {declared - used}"
    node = next(v for v in d["templating"]["list"] if v["name"] == "node")
    assert node["multi"] and node["includeAll"] and node["allValue"] == ".*"


def test_per_node_panels_filter_by_node() -> None:
    """A query over a metric that has a node label honours the $node selection."""
    per_node = {
        m.NODE_COMPUTE, m.NODE_COMMUNICATION, m.NODE_COMPUTE_HIST, m.NODE_THROUGHPUT, m.NODE_LOSS,
        m.NODE_ACCURACY, m.NODE_SAMPLES, m.UPDATES_ACCEPTED, m.UPDATES_REFUSED, m.NODE_RECEIVED_BYTES,
        m.NODE_SENT_BYTES, m.STEP_SECONDS, m.AGENT_SAMPLES, m.CORE_CPU, m.AGENT_MEMORY, m.AGENT_ROUNDS,
        m.AGENT_INFO,
    }  # fmt: skip
    for title, expr in queries(dashboard()):
        if title in {"Refused updates"}:  # overview total over everything
            continue
        names = {re.sub(r"_(bucket|sum|count|info)$", "", n) for n in metric_identifiers(expr)}
        if names & per_node:
            assert '=~"$node"' in expr or f'=~"$node|{m.UNKNOWN_NODE}"' in expr, f"{title!r} ignores $node: {expr}"


def test_unknown_is_no_node_but_its_refusals_are_always_shown() -> None:
    d = dashboard()
    (variable,) = [v for v in d["templating"]["list"] if v["name"] == "node"]
    assert f'{m.NODE}!="{m.UNKNOWN_NODE}"' in variable["query"]
    (expr,) = [e for t, e in queries(d) if t == "Refused updates by reason"]
    assert f'{m.NODE}=~"$node|{m.UNKNOWN_NODE}"' in expr


def test_every_metric_in_a_query_is_in_metric_names() -> None:
    known = exposed_names()
    d = dashboard()
    seen = set()
    for title, expr in queries(d):
        names = metric_identifiers(expr)
        assert names, f"{title!r}: no metric in {expr}"
        unknown = names - known
        assert not unknown, f"{title!r}: {sorted(unknown)} not defined in edgetrain/metric_names.py ({expr})"
        seen |= names
    # __name__ regexes (the $node variable) must match something real.
    for title, expr in variable_queries(d):
        for regex in re.findall(r'__name__\s*=~\s*"([^"]*)"', expr):
            assert any(re.fullmatch(regex, n) for n in known), f"{title}: {regex} matches no metric"
    assert seen, "no queries found"


def test_metric_identifier_parser() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, node) (rate(edgetrain_agent_step_seconds_bucket{node=~"$node",'
        ' job!="x"}[$__rate_interval]))) / on(node) group_left(cores) edgetrain_agent_info or vector(1e3)'
    )
    assert metric_identifiers(expr) == {"edgetrain_agent_step_seconds_bucket", "edgetrain_agent_info"}
    assert label_names(expr) == {"le", "node", "job", "cores"}
    assert metric_identifiers("sum(rate(foo_total[5m])) offset 1h > bool 0") == {"foo_total"}


def test_every_label_in_a_query_is_known() -> None:
    d = dashboard()
    for title, expr in [*queries(d), *variable_queries(d)]:
        unknown = label_names(expr) - known_labels()
        assert not unknown, f"{title!r}: unknown labels {sorted(unknown)} in {expr}"
    for panel in walk_panels(d["panels"]):
        for t in panel.get("targets", []):
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                assert label in known_labels(), f"{panel['title']!r}: legend uses {label}"


def test_histogram_quantiles_aggregate_bucket_rates_by_le() -> None:
    for title, expr in queries(dashboard()):
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \(le\b[^)]*\) \(rate\(\w+_bucket", expr), f"{title!r}: {expr}"


# ---- provisioning and Prometheus config


def test_datasource_provisioning() -> None:
    assert provisioned_uid() == "edgetrain-prometheus"
    assert yaml_scalar(DATASOURCES, "type") == ["prometheus"]
    # $__rate_interval assumes the datasource's scrape interval is Prometheus' own.
    assert yaml_scalar(DATASOURCES, "timeInterval") == yaml_scalar(PROMETHEUS_CONFIG, "scrape_interval")


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    (path,) = yaml_scalar(PROVIDERS, "path")
    assert f"./grafana/dashboards:{path}" in COMPOSE.read_text(encoding="utf-8")
    assert yaml_scalar(PROVIDERS, "type") == ["file"]


def test_prometheus_config_scrapes_coordinator_and_discovers_agents() -> None:
    text = PROMETHEUS_CONFIG.read_text(encoding="utf-8")
    assert yaml_scalar(PROMETHEUS_CONFIG, "job_name") == ["coordinator", "edge-agents"]
    assert yaml_scalar(PROMETHEUS_CONFIG, "url") == ["http://coordinator:9100/sd"]
    assert "http_sd_configs:" in text
    assert yaml_scalar(PROMETHEUS_CONFIG, "honor_labels") == ["true"]


def test_promtool_check_config() -> None:
    promtool = os.environ.get("PROMTOOL_BIN") or shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool not found and CI=true: apt-get install prometheus", pytrace=False)
        pytest.skip("promtool not found (apt-get install prometheus)")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- docs


def test_monitoring_docs_list_every_metric() -> None:
    text = DOCS.read_text(encoding="utf-8")
    missing = []
    for name, kind in metric_kinds().items():
        exposed = name + "_info" if kind == "info" else name
        if f"`{exposed}`" not in text:
            missing.append(exposed)
    assert not missing, f"docs/monitoring.md does not list {missing}"
