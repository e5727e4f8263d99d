"""Generate deploy/grafana/dashboards/edgetrain.json, the edgetrain Grafana dashboard.

The JSON is the artefact Grafana loads; this script is its source. Metric names come from
edgetrain/metric_names.py so a rename there shows up here (and in tests/unit/test_dashboards.py,
which also fails when the JSON and this script disagree).

    python deploy/grafana/gen_dashboard.py          # rewrite the JSON and its Kubernetes ConfigMap
    python deploy/grafana/gen_dashboard.py --check  # exit 1 if either is stale

Conventions kept by every panel (checked by the unit test):
- every panel and every query names the datasource by the fixed uid ``edgetrain-prometheus``;
- the ``node`` template variable is only used as ``node=~"$node"`` (a regex), so "All" (``.*``)
  and multi-value selections both work, and tests can substitute ``.*``;
- rates use ``$__rate_interval`` (Grafana picks >= 4 scrape intervals from the datasource's
  timeInterval), histogram quantiles aggregate ``_bucket`` rates ``by (le, ...)``.

Why plain dicts and not Grafana's own SDK (evaluated 2026-12-07: ``grafana-foundation-sdk`` 10.1.0 on a stat and
a time-series panel): its builders lay out the grid, but left ``refId`` empty, wrote ``options: null`` and gave no
panel ``id`` unless set by hand, so its output needed the same fix-ups as ours. The panel definitions (PromQL and
descriptions, most of this file) would stay as long; only the ~150 lines of helpers would shrink. What checks the
output is kept either way: the schema and layout tests, and every panel's query run against a real Prometheus
(tests/integration/test_prometheus_harness.py). grafanalib is no longer maintained for current Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from edgetrain import metric_names as m  # noqa: E402

OUTPUT = REPO / "deploy" / "grafana" / "dashboards" / "edgetrain.json"
# The same dashboard for Kubernetes: a ConfigMap that Grafana's dashboard sidecar picks up by its label.
CONFIGMAP = REPO / "deploy" / "k8s" / "base" / "grafana-dashboard.yaml"

DATASOURCE_UID = "edgetrain-prometheus"  # = uid in provisioning/datasources/prometheus.yml
DASHBOARD_UID = "edgetrain-training"
DS: dict[str, str] = {"type": "prometheus", "uid": DATASOURCE_UID}

NODE = f'{m.NODE}=~"$node"'  # the only way panels use the template variable
NODE_OR_UNKNOWN = f'{m.NODE}=~"$node|{m.UNKNOWN_NODE}"'  # refusals before the caller is known, whatever is selected
RATE = "$__rate_interval"

Panel = dict[str, Any]


class Layout:
    """Place panels left to right on Grafana's 24-column grid, wrapping to a new line."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.line_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.line_h = max(self.line_h, h)
        return pos

    def newline(self) -> None:
        self.y += self.line_h
        self.x = 0
        self.line_h = 0

    def pid(self) -> int:
        self.next_id += 1
        return self.next_id - 1


L = Layout()


def target(expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    return t


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def row(title: str) -> Panel:
    L.newline()
    p = {
        "type": "row",
        "id": L.pid(),
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": L.place(24, 1),
    }
    L.newline()
    return p


def stat(title: str, expr: str, unit: str, description: str, decimals: int | None = None, w: int = 3) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "id": L.pid(),
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": L.place(w, 4),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
        "targets": [target(expr, legend=title)],
    }


def timeseries(
    title: str,
    tgts: list[dict[str, Any]],
    unit: str,
    description: str,
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    **extra: Any,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineInterpolation": "linear",
            "lineWidth": 1,
            "fillOpacity": 60 if stack else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if lo is not None:
        defaults["min"] = lo
    if hi is not None:
        defaults["max"] = hi
    return {
        "type": "timeseries",
        "id": L.pid(),
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": L.place(w, h),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": tgts,
        **extra,
    }


def quantiles(metric: str, by: str = "", sel: str = "") -> list[dict[str, Any]]:
    """p50/p90/p99 of a histogram, over rate(_bucket) summed by le (and `by`)."""
    group = f"le, {by}" if by else "le"
    matchers = f"{{{sel}}}" if sel else ""
    out = []
    for i, q in enumerate(("0.5", "0.9", "0.99")):
        pct = f"p{round(float(q) * 100)}"
        legend = f"{{{{{by}}}}} {pct}" if by else pct
        expr = f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{matchers}[{RATE}])))"
        out.append(target(expr, legend, ref=chr(ord("A") + i)))
    return out


def node_variable() -> dict[str, Any]:
    # Every series that names a node: the coordinator's per-node figures and (labelled through
    # /sd) every agent's own series, so an agent shows up as soon as it is scraped.
    # Not the refusals' "unknown", which is no node (the refusals panel always shows it).
    definition = f'label_values({{__name__=~"{m.PREFIX}_.*", {m.NODE}!="", {m.NODE}!="{m.UNKNOWN_NODE}"}}, {m.NODE})'
    return {
        "name": "node",
        "label": "Node",
        "type": "query",
        "datasource": DS,
        "definition": definition,
        "query": definition,
        "refresh": 2,  # on time-range change: agents come and go during a run
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "skipUrlSync": False,
    }


def panels() -> list[Panel]:
    ps: list[Panel] = []

    ps.append(row("Overview"))
    ps += [
        stat("Round", f"max({m.ROUND})", "none", "Last completed round.", decimals=0),
        stat("Agents connected", f"max({m.AGENTS_CONNECTED})", "none", "Agents registered now.", decimals=0),
        stat(
            "Global accuracy",
            f"max({m.GLOBAL_ACCURACY})",
            "percentunit",
            "Test accuracy of the global model.",
        ),
        stat(
            "Global macro-F1",
            f"max({m.GLOBAL_MACRO_F1})",
            "percentunit",
            "Test macro-F1 of the global model.",
        ),
        stat(
            "Global loss",
            f"max({m.GLOBAL_LOSS})",
            "none",
            "Test cross-entropy of the global model.",
            decimals=4,
        ),
        stat("Training time", f"max({m.TRAINING_SECONDS})", "s", "Wall time since the first round opened."),
        stat("Training share", f"max({m.TRAINING_SHARE})", "percentunit",
             "The agents' time in training steps (mean over the nodes) over the wall time since the first round "
             "opened; the rest is waiting: transfer, aggregation, stragglers."),
        stat("Start-up", f"max({m.STARTUP_SECONDS})", "s",
             "From the coordinator's start (the command) to its first round: imports, data, agents joining."),
        stat(
            "Rounds closed short",
            f"sum({m.ROUNDS_SHORT}) or vector(0)",
            "none",
            "Rounds closed at their deadline without every agent's update.",
            decimals=0,
        ),
        stat(
            "Refused updates",
            f"sum({m.UPDATES_REFUSED}) or vector(0)",
            "none",
            "Updates and requests the coordinator refused since it started, all reasons, of the nodes that are in "
            "and of callers never admitted (node \"unknown\"); a node that leaves takes its series with it.",
            decimals=0,
        ),
    ]

    ps.append(row("Global model"))
    ps.append(
        timeseries(
            "Global accuracy and macro-F1",
            targets((f"max({m.GLOBAL_ACCURACY})", "accuracy"), (f"max({m.GLOBAL_MACRO_F1})", "macro-F1"),
                    (f"max({m.GLOBAL_METRIC})", "the run's --metric")),
            "percentunit",
            "Test metrics of the global model, evaluated by the coordinator after each round; the run's "
            "--metric (accuracy, macro-F1, macro-recall or one class's F1) is the one that decides it.",
            lo=0,
            hi=1,
        )
    )
    ps.append(
        timeseries(
            "Global test loss",
            targets((f"max({m.GLOBAL_LOSS})", "loss")),
            "none",
            "Test cross-entropy of the global model after each round.",
        )
    )
    # Grafana cannot plot against a metric's value on the x axis without an XY panel and joins;
    # a table of (round, accuracy, loss) sampled at the panel's step is robust and readable.
    by_round = timeseries(
        "Global accuracy by round",
        targets(
            (f"max({m.ROUND})", "round"),
            (f"max({m.GLOBAL_ACCURACY})", "accuracy"),
            (f"max({m.GLOBAL_LOSS})", "loss"),
        ),
        "none",
        "Accuracy and loss of the global model at each round (last value seen while that round was "
        "the latest). Sampled at the panel's step: zoom in if short rounds are missing.",
        maxDataPoints=2000,
    )
    by_round["type"] = "table"
    by_round["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    by_round["fieldConfig"] = {
        "defaults": {"custom": {"align": "auto"}},
        "overrides": [
            {
                "matcher": {"id": "byName", "options": "accuracy"},
                "properties": [{"id": "unit", "value": "percentunit"}],
            },
            {"matcher": {"id": "byName", "options": "loss"}, "properties": [{"id": "decimals", "value": 4}]},
            {"matcher": {"id": "byName", "options": "round"}, "properties": [{"id": "decimals", "value": 0}]},
        ],
    }
    by_round["transformations"] = [
        {"id": "joinByField", "options": {"byField": "Time", "mode": "outer"}},
        {
            "id": "groupBy",
            "options": {
                "fields": {
                    "round": {"aggregations": [], "operation": "groupby"},
                    "accuracy": {"aggregations": ["last"], "operation": "aggregate"},
                    "loss": {"aggregations": ["last"], "operation": "aggregate"},
                }
            },
        },
        {
            "id": "organize",
            "options": {"renameByName": {"accuracy (last)": "accuracy", "loss (last)": "loss"}},
        },
        {"id": "sortBy", "options": {"sort": [{"field": "round", "desc": True}]}},
    ]
    ps.append(by_round)
    ps.append(
        timeseries(
            "Round duration quantiles",
            quantiles(m.ROUND_DURATION),
            "s",
            "From the round-duration histogram: open -> aggregated, over the rate interval.",
        )
    )
    ps.append(
        timeseries(
            "Agents connected",
            targets((f"max({m.AGENTS_CONNECTED})", "connected")),
            "none",
            "Agents registered with the coordinator.",
            lo=0,
        )
    )
    ps[-1]["fieldConfig"]["defaults"]["decimals"] = 0
    ps.append(
        timeseries(
            "Rounds closed short",
            targets((f"sum(increase({m.ROUNDS_SHORT}[{RATE}]))", "closed short")),
            "none",
            "Rounds closed at the deadline without every participant, per rate interval.",
        )
    )

    ps.append(row("Per node (coordinator's view)"))
    ps.append(
        timeseries(
            "Round time on $node: compute + communication",
            targets(
                (f"{m.NODE_COMPUTE}{{{NODE}}}", "compute"),
                (f"{m.NODE_COMMUNICATION}{{{NODE}}}", "communication"),
            ),
            "s",
            "Last round's time on this node as the node measured it, stacked: local compute, then "
            "communication (this round's download + the node's previous upload: an update cannot carry its own "
            "upload time, so that part lags one round). One panel per selected node.",
            w=8,
            stack=True,
            repeat="node",
            repeatDirection="h",
            maxPerRow=3,
        )
    )
    L.newline()
    ps.append(
        timeseries(
            "Compute time per round by node (p50/p90)",
            quantiles(m.NODE_COMPUTE_HIST, by=m.NODE, sel=NODE)[:2],
            "s",
            "From the per-node compute-time histogram over the rate interval.",
        )
    )
    ps.append(
        timeseries(
            "Local accuracy per node",
            targets((f"{m.NODE_ACCURACY}{{{NODE}}}", "{{node}}")),
            "percentunit",
            "Training accuracy each node reported with its last update (on its own shard).",
            lo=0,
            hi=1,
        )
    )
    ps.append(
        timeseries(
            "Local training loss per node",
            targets((f"{m.NODE_LOSS}{{{NODE}}}", "{{node}}")),
            "none",
            "Training loss each node reported with its last update.",
        )
    )
    ps.append(
        timeseries(
            "Throughput per node and total",
            targets(
                (f"{m.NODE_THROUGHPUT}{{{NODE}}}", "{{node}}"),
                (f"sum({m.NODE_THROUGHPUT}{{{NODE}}})", "total"),
            ),
            "suffix: samples/s",
            "Samples per second of local compute, as each node reported for its last round, and their sum.",
        )
    )
    ps.append(
        timeseries(
            "Accepted samples per second",
            targets(
                (f"sum by ({m.NODE}) (rate({m.NODE_SAMPLES}{{{NODE}}}[{RATE}]))", "{{node}}"),
                (f"sum(rate({m.NODE_SAMPLES}{{{NODE}}}[{RATE}]))", "total"),
            ),
            "suffix: samples/s",
            "Effective wall-clock throughput: samples in accepted updates per second, waiting included.",
        )
    )
    ps.append(
        timeseries(
            "Refused updates by reason",
            targets((f"sum by ({m.REASON}) (rate({m.UPDATES_REFUSED}{{{NODE_OR_UNKNOWN}}}[{RATE}]))", "{{reason}}")),
            "suffix: updates/s",
            "Updates refused per second, by reason (see REFUSAL_REASONS in edgetrain/metric_names.py). Refusals "
            f"before the caller is known (no valid session: unauthenticated, unknown agent) count as node "
            f"\"{m.UNKNOWN_NODE}\" and are always shown here.",
        )
    )
    ps.append(
        timeseries(
            "Accepted updates per node",
            targets((f"sum by ({m.NODE}) (rate({m.UPDATES_ACCEPTED}{{{NODE}}}[{RATE}]))", "{{node}}")),
            "suffix: updates/s",
            "Updates accepted per second.",
        )
    )
    ps.append(
        timeseries(
            "Network per node",
            targets(
                (
                    f"sum by ({m.NODE}) (rate({m.NODE_RECEIVED_BYTES}{{{NODE}}}[{RATE}]))",
                    "{{node}} -> coordinator",
                ),
                (
                    f"sum by ({m.NODE}) (rate({m.NODE_SENT_BYTES}{{{NODE}}}[{RATE}]))",
                    "coordinator -> {{node}}",
                ),
            ),
            "Bps",
            "Tensor bytes per second between the coordinator and each node: weights down, accepted updates up "
            "(refused uploads are not counted; a local agent's go through same-host files).",
        )
    )

    ps.append(row("Edge machines (agents' own metrics)"))
    ps.append(
        timeseries(
            "CPU use per pinned core",
            targets((f"{m.CORE_CPU}{{{NODE}}}", "{{node}} core {{core}}")),
            "percentunit",
            "Busy fraction of each core an agent is pinned to.",
            lo=0,
            hi=1,
        )
    )
    ps.append(
        timeseries(
            "Optimizer step time by node (p50/p90)",
            quantiles(m.STEP_SECONDS, by=m.NODE, sel=NODE)[:2],
            "s",
            "From the agents' step-time histograms: one optimizer step, over the rate interval.",
        )
    )
    ps.append(
        timeseries(
            "Samples trained per second (agent side)",
            targets((f"sum by ({m.NODE}) (rate({m.AGENT_SAMPLES}{{{NODE}}}[{RATE}]))", "{{node}}")),
            "suffix: samples/s",
            "Samples each agent trained per second of wall time, measured by the agent.",
        )
    )
    ps.append(
        timeseries(
            "Agent memory (RSS)",
            targets((f"{m.AGENT_MEMORY}{{{NODE}}}", "{{node}}")),
            "bytes",
            "Resident memory of each agent and its workers.",
        )
    )
    info = timeseries(
        "Agents",
        [
            target(f"{m.AGENT_INFO}_info{{{NODE}}}", ref="A", instant=True),
            target(f"sum by ({m.NODE}) ({m.AGENT_ROUNDS}{{{NODE}}})", ref="B", instant=True),
        ],
        "none",
        "Each agent's pinned cores, device and worker count, and the rounds it has trained.",
        w=24,
        h=6,
    )
    for t in info["targets"]:
        t["format"] = "table"
    info["type"] = "table"
    info["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    info["fieldConfig"] = {"defaults": {"custom": {"align": "auto"}}, "overrides": []}
    info["transformations"] = [
        # Both instant tables share (Time, node): merge puts each node's info and rounds on one row.
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {
                    "Time": True,
                    "Value #A": True,  # the info metric's constant 1
                    "__name__": True,
                    "instance": True,
                    "job": True,
                },
                "renameByName": {"Value #B": "rounds trained"},
            },
        },
    ]
    ps.append(info)
    return ps


def dashboard() -> dict[str, Any]:
    global L
    L = Layout()  # ids and positions start afresh on every render
    return {
        "uid": DASHBOARD_UID,
        "title": "edgetrain — training",
        "description": "Generated by deploy/grafana/gen_dashboard.py; edit that and regenerate.",
        "tags": ["edgetrain"],
        "id": None,
        "version": 1,
        "schemaVersion": 39,
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: line up a node's round time with global accuracy
        "timezone": "browser",
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "5s",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [node_variable()]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def render_configmap(text: str) -> str:
    """The dashboard JSON as a ConfigMap (a YAML block scalar keeps it byte for byte, its final newline included)."""
    body = "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())
    return ("# GENERATED by deploy/grafana/gen_dashboard.py (as grafana/dashboards/edgetrain.json); do not edit.\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: edgetrain-grafana-dashboard\n  labels:\n"
            "    grafana_dashboard: \"1\"  # the label Grafana's dashboard sidecar (kube-prometheus-stack) looks for\n"
            f"data:\n  edgetrain.json: |\n{body}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the JSON or the ConfigMap on disk is stale")
    args = ap.parse_args()
    text = render()
    outputs = {OUTPUT: text, CONFIGMAP: render_configmap(text)}
    if args.check:
        stale = [path for path, want in outputs.items()
                 if (path.read_text(encoding="utf-8") if path.exists() else "") != want]
        for path in stale:
            print(f"{path} is stale: run python {Path(__file__).relative_to(REPO)}", file=sys.stderr)
        return 1 if stale else 0
    for path, want in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(want, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
