"""A real Prometheus on loopback for integration tests, and the dashboard's queries to run through it.

Usage from a test module (tests/ is a package)::

    from tests.integration.prom import Prometheus, dashboard_queries

    def test_metrics_reach_prometheus(coordinator):          # your fixture: a real run on loopback
        # The exact deploy/prometheus/prometheus.yml, pointed at the coordinator's metrics port:
        # job "coordinator" scrapes it, job "edge-agents" finds the agents through its /sd.
        with Prometheus.for_deploy(coordinator=f"127.0.0.1:{coordinator.metrics_port}") as prom:
            prom.wait_for_targets(1 + n_agents)               # all scraped and "up"
            prom.wait_for('edgetrain_round >= 2', timeout=60)
            missing = [q for q in dashboard_queries() if not prom.wait_for(q.expr, timeout=10, fail=False)]
            assert not missing

Or with explicit targets: ``Prometheus.for_targets(["127.0.0.1:9101"], http_sd_url=...)``.

The process is always terminated (``with`` block, or the ``prometheus_factory`` fixture). Query
while the scraped processes are still running: once a target disappears Prometheus marks its
series stale and instant queries return nothing (use ``query_range`` over the run instead).

Without the binary (``apt-get install prometheus``, or set PROMETHEUS_BIN / PROMTOOL_BIN) tests
skip; under ``CI=true`` they fail instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "edgetrain.json"
DEPLOY_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
# How deploy/prometheus/prometheus.yml names the coordinator's metrics endpoint (compose service).
DEPLOY_COORDINATOR = "coordinator:9100"
# Job names of deploy/prometheus/prometheus.yml, which for_targets() reuses.
COORDINATOR_JOB = "coordinator"
AGENTS_JOB = "edge-agents"

Result = dict[str, Any]  # one element of the API's "result": {"metric": {...}, "value": [t, "v"]}


class PromQLError(RuntimeError):
    """Prometheus refused a query (bad syntax, unknown function, ...)."""


def find_binary(name: str, env_var: str) -> str:
    """Path of ``name`` (prometheus/promtool); skip the test if absent, fail it under CI=true.

    ``env_var`` (PROMETHEUS_BIN / PROMTOOL_BIN) overrides the PATH lookup; if set, it must work.
    """
    explicit = os.environ.get(env_var)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            pytest.fail(f"{env_var}={explicit} is not an executable file", pytrace=False)
        return explicit
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} not found on PATH (apt-get install prometheus, or set {env_var})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def promtool(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run promtool (e.g. ``promtool("check", "metrics", stdin=text)``); the caller checks returncode."""
    return subprocess.run(
        [find_binary("promtool", "PROMTOOL_BIN"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def render_config(
    static_targets: Sequence[str] = (),
    http_sd_url: str | None = None,
    scrape_interval: str = "1s",
    static_job: str = COORDINATOR_JOB,
) -> str:
    """A Prometheus config (JSON, which is valid YAML) with the deploy config's job names.

    Static targets go to job ``static_job`` (default ``coordinator``), http_sd-discovered ones to
    ``edge-agents`` (with honor_labels, as in deploy/). ``/sd`` is re-read every scrape interval.
    """
    jobs: list[dict[str, Any]] = []
    if static_targets:
        jobs.append({"job_name": static_job, "static_configs": [{"targets": list(static_targets)}]})
    if http_sd_url:
        jobs.append(
            {
                "job_name": AGENTS_JOB,
                "honor_labels": True,
                "http_sd_configs": [{"url": http_sd_url, "refresh_interval": scrape_interval}],
            }
        )
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2) + "\n"


def render_deploy_config(coordinator: str, scrape_interval: str = "1s") -> str:
    """deploy/prometheus/prometheus.yml aimed at ``coordinator`` (host:port), with fast intervals."""
    text = DEPLOY_CONFIG.read_text(encoding="utf-8")
    if DEPLOY_COORDINATOR not in text:
        raise ValueError(f"{DEPLOY_CONFIG} no longer names {DEPLOY_COORDINATOR!r}; update prom.py")
    text = text.replace(DEPLOY_COORDINATOR, coordinator)
    return re.sub(
        r"^(\s*(?:scrape_interval|evaluation_interval|refresh_interval):)\s*\S+",
        rf"\g<1> {scrape_interval}",
        text,
        flags=re.MULTILINE,
    )


class Prometheus:
    """One Prometheus process on 127.0.0.1 with its own config and TSDB in a temporary directory."""

    def __init__(self, config_text: str, startup_timeout: float = 30.0) -> None:
        self.config_text = config_text
        self.startup_timeout = startup_timeout
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None

    @classmethod
    def for_targets(
        cls,
        static_targets: Sequence[str] = (),
        http_sd_url: str | None = None,
        scrape_interval: str = "1s",
        static_job: str = COORDINATOR_JOB,
    ) -> Prometheus:
        """Scrape ``static_targets`` (host:port) and whatever ``http_sd_url`` lists."""
        return cls(render_config(static_targets, http_sd_url, scrape_interval, static_job))

    @classmethod
    def for_deploy(cls, coordinator: str, scrape_interval: str = "1s") -> Prometheus:
        """The deploy/ config itself, aimed at a coordinator's metrics ``host:port``."""
        return cls(render_deploy_config(coordinator, scrape_interval))

    # ---- lifecycle

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Prometheus:
        binary = find_binary("prometheus", "PROMETHEUS_BIN")
        self._tmp = tempfile.TemporaryDirectory(prefix="edgetrain-prom-")
        tmp = Path(self._tmp.name)
        config = tmp / "prometheus.yml"
        config.write_text(self.config_text, encoding="utf-8")
        self._log_path = tmp / "prometheus.log"
        try:
            for _attempt in range(3):  # a port taken between free_port() and bind: try another
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                with open(self._log_path, "wb") as log:
                    self.process = subprocess.Popen(
                        [
                            binary,
                            f"--config.file={config}",
                            f"--storage.tsdb.path={tmp / 'data'}",
                            f"--web.listen-address=127.0.0.1:{self.port}",
                            "--storage.tsdb.retention.time=1h",
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                if self._wait_ready():
                    return self
                if "address already in use" not in self.log_tail():
                    break
            raise RuntimeError(f"Prometheus did not become ready; its log:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process.wait()
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self._terminate()
        return False

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Terminate (then kill) the process and delete its directory. Safe to call twice."""
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_tail(self, chars: int = 4000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    # ---- HTTP API

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns ``data``; raises PromQLError when Prometheus says "error"."""
        params = {k: v for k, v in params.items() if v is not None}
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: bad query; the body says why
            with e:
                detail = e.read().decode("utf-8", "replace")
            raise PromQLError(f"{path} {params}: HTTP {e.code}: {detail}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[Result]:
        """Instant query. Vector results as they come; a scalar becomes one result with no labels."""
        data = self.api("query", query=promql, time=at)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Result] = data["result"]
        return result

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[Result]:
        """Range query: each result has ``values`` = [[t, "v"], ...]."""
        data = self.api("query_range", query=promql, start=start, end=end, step=step)
        result: list[Result] = data["result"]
        return result

    def value(self, promql: str) -> float:
        """The value of a query that must return exactly one series."""
        results = self.query(promql)
        if len(results) != 1:
            raise AssertionError(f"{promql!r}: expected one series, got {results!r}")
        return float(results[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets (``labels``, ``health``, ``lastError``, ``scrapeUrl``, ...)."""
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def wait_for(
        self,
        promql: str,
        timeout: float = 30.0,
        predicate: Callable[[list[Result]], bool] | None = None,
        fail: bool = True,
    ) -> list[Result]:
        """Poll until the query returns data (and ``predicate`` holds); return the results.

        On timeout: AssertionError with the last results and the targets' health, or ``[]``
        when ``fail=False``. A query Prometheus rejects raises PromQLError at once.
        """
        deadline = time.monotonic() + timeout
        while True:
            results = self.query(promql)
            if results and (predicate is None or predicate(results)):
                return results
            if time.monotonic() >= deadline:
                if not fail:
                    return []
                raise AssertionError(
                    f"{promql!r} after {timeout}s returned {results!r}\ntargets: {self._targets_summary()}"
                )
            time.sleep(0.25)

    def wait_for_targets(self, count: int, timeout: float = 30.0, job: str | None = None) -> list[dict[str, Any]]:
        """Wait until at least ``count`` targets (of ``job``) have been scraped successfully."""
        deadline = time.monotonic() + timeout
        while True:
            up = [t for t in self.targets() if t["health"] == "up" and job in (None, t["labels"].get("job"))]
            if len(up) >= count:
                return up
            if time.monotonic() >= deadline:
                raise AssertionError(f"expected {count} healthy targets; have {self._targets_summary()}")
            time.sleep(0.25)

    def _targets_summary(self) -> str:
        try:
            targets = self.targets()
        except (PromQLError, OSError) as e:
            return f"(could not list targets: {e})"
        return (
            "; ".join(
                f"{t['labels'].get('job')} {t['scrapeUrl']} {t['health']} {t.get('lastError') or ''}".rstrip()
                for t in targets
            )
            or "none"
        )


@pytest.fixture
def prometheus_factory() -> Iterator[Callable[..., Prometheus]]:
    """Start Prometheus servers inside a test; all are stopped at teardown.

    ``from tests.integration.prom import prometheus_factory  # noqa: F401`` in a test module makes it available;
    call it as ``prometheus_factory(static_targets=[...], http_sd_url=...)`` or
    ``prometheus_factory(coordinator="127.0.0.1:9100")`` for the deploy config.
    """
    started: list[Prometheus] = []

    def make(coordinator: str | None = None, **kwargs: Any) -> Prometheus:
        if coordinator is not None:
            prom = Prometheus.for_deploy(coordinator, **kwargs)
        else:
            prom = Prometheus.for_targets(**kwargs)
        started.append(prom)
        return prom.start()

    yield make
    for prom in started:
        prom.stop()


# ---- the dashboard's queries


class PanelQuery(NamedTuple):
    title: str  # panel title (``variable $node`` for the template variable's own query)
    expr: str  # PromQL with template variables replaced by .* and $__rate_interval by a duration


def _walk_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries(
    path: Path = DASHBOARD, rate_interval: str = "30s", include_variables: bool = True
) -> Iterator[PanelQuery]:
    """Every (panel title, PromQL) of the dashboard, runnable as is against Prometheus.

    ``$var``/``${var}``/``[[var]]`` of every template variable become ``.*`` (panels only use them
    as ``label=~"$var"``, which the unit test enforces), ``$__rate_interval``/``$__interval``
    become ``rate_interval`` (it must cover at least 2 scrapes). A template variable defined as
    ``label_values(selector, label)`` is yielded as ``count by (label) (selector)``.
    """
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    variables: list[dict[str, Any]] = list(dashboard.get("templating", {}).get("list", []))
    names = sorted((v["name"] for v in variables), key=len, reverse=True)

    def substitute(expr: str) -> str:
        expr = re.sub(r"\$\{?__(?:rate_)?interval\}?", rate_interval, expr)
        for name in names:
            expr = re.sub(rf"\$\{{{name}(?::\w+)?\}}|\${name}\b|\[\[{name}\]\]", ".*", expr)
        if "$" in expr:
            raise ValueError(f"unsubstituted variable in {expr!r}")
        return expr

    if include_variables:
        for var in variables:
            definition = var.get("definition") or var.get("query")
            if not isinstance(definition, str):
                definition = (definition or {}).get("query", "")
            match = re.fullmatch(r"\s*label_values\(\s*(?:(.*),\s*)?(\w+)\s*\)\s*", definition)
            if var.get("type") == "query" and match:
                label = match.group(2)
                selector = match.group(1) or f'{{{label}!=""}}'
                yield PanelQuery(f"variable ${var['name']}", f"count by ({label}) ({substitute(selector)})")

    for panel in _walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("hide") or not target.get("expr"):
                continue
            yield PanelQuery(panel.get("title", ""), substitute(target["expr"]))
