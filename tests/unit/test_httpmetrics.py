"""The /metrics server on real loopback sockets: IPv4, IPv6 and the IPv6 wildcard, and its advertised address."""

from __future__ import annotations

import gzip
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from edgetrain.coordinator.admission import metrics_address
from prometheus_client import CollectorRegistry, Counter

from edgetrain.errors import ConfigError
from edgetrain.httpmetrics import MetricsServer


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("edgetrain_test_scrapes", "a series to find in the scrape", registry=reg).inc(3)
    return reg


@pytest.fixture
def servers() -> Iterator[list[MetricsServer]]:
    started: list[MetricsServer] = []
    yield started
    for server in started:
        server.close()


def _scrape(authority: str) -> str:
    with urllib.request.urlopen(f"http://{authority}/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        assert resp.status == 200
        return str(resp.read().decode())


def test_ipv4_host_is_served_and_advertised_as_host_port(registry: CollectorRegistry,
                                                          servers: list[MetricsServer]) -> None:
    servers.append(server := MetricsServer(registry, "127.0.0.1", 0))
    assert server.address == f"127.0.0.1:{server.port}"
    assert "edgetrain_test_scrapes_total 3.0" in _scrape(server.address)


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_loopback_is_served_over_ipv6_and_advertised_in_brackets(
        registry: CollectorRegistry, servers: list[MetricsServer], host: str) -> None:
    servers.append(server := MetricsServer(registry, host, 0))
    assert server.address == f"[::1]:{server.port}"  # a Prometheus target; "::1:9101" is not one
    assert "edgetrain_test_scrapes_total 3.0" in _scrape(server.address)
    with socket.create_connection(("::1", server.port), timeout=5) as conn:
        assert conn.family == socket.AF_INET6


@needs_ipv6
def test_ipv6_wildcard_serves_both_families_and_the_coordinator_advertises_the_callers_address(
        registry: CollectorRegistry, servers: list[MetricsServer]) -> None:
    servers.append(server := MetricsServer(registry, "::", 0))
    port = server.port
    assert server.address == f"[::]:{port}"
    assert "edgetrain_test_scrapes_total 3.0" in _scrape(f"[::1]:{port}")
    assert "edgetrain_test_scrapes_total 3.0" in _scrape(f"127.0.0.1:{port}")
    # What the agent sends in JoinRequest.metrics_address is replaced by the address its calls come from
    assert metrics_address(server.address, "ipv6:[fd00::7]:51234") == (f"[fd00::7]:{port}", None)
    assert metrics_address(server.address, "ipv4:10.0.0.7:51234") == (f"10.0.0.7:{port}", None)


@needs_ipv6
def test_an_ipv6_port_in_use_is_one_config_error_line_with_the_address_in_brackets(
        registry: CollectorRegistry, servers: list[MetricsServer]) -> None:
    servers.append(server := MetricsServer(registry, "::1", 0))
    with pytest.raises(ConfigError) as err:
        servers.append(MetricsServer(registry, "::1", server.port))
    message = str(err.value)
    assert message.startswith(f"cannot serve /metrics on [::1]:{server.port}: ")
    assert "\n" not in message


def test_a_host_name_that_cannot_be_one_is_a_config_error_not_a_traceback(registry: CollectorRegistry) -> None:
    host = "x" * 70  # a DNS label is at most 63 characters: refused before any lookup
    with pytest.raises(ConfigError, match=rf"^cannot serve /metrics on {host}:9101: not a valid host name$"):
        MetricsServer(registry, host, 9101)


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - loopback
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def test_a_scraper_that_asks_for_openmetrics_gets_openmetrics(registry: CollectorRegistry,
                                                               servers: list[MetricsServer]) -> None:
    servers.append(server := MetricsServer(registry, "127.0.0.1", 0))
    status, headers, body = _get(f"http://{server.address}/metrics",
                                 Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert "edgetrain_test_scrapes_total 3.0\n" in text
    assert "# TYPE edgetrain_test_scrapes counter\n" in text  # OpenMetrics names the family without _total
    assert text.endswith("# EOF\n")  # OpenMetrics' terminator; the text format has none
    status, headers, body = _get(f"http://{server.address}/metrics")  # no Accept: the classic text format
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# EOF" not in body.decode() and "edgetrain_test_scrapes_total 3.0\n" in body.decode()


def test_metrics_are_gzipped_for_a_scraper_that_accepts_gzip(registry: CollectorRegistry,
                                                             servers: list[MetricsServer]) -> None:
    servers.append(server := MetricsServer(registry, "127.0.0.1", 0))
    status, headers, body = _get(f"http://{server.address}/metrics?name[]=edgetrain_test_scrapes_total",
                                 **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).decode().splitlines()[-1] == "edgetrain_test_scrapes_total 3.0"
    assert "Content-Encoding" not in _get(f"http://{server.address}/metrics")[1]


def test_json_routes_beside_metrics_and_404_elsewhere(registry: CollectorRegistry,
                                                      servers: list[MetricsServer]) -> None:
    targets = [{"targets": ["127.0.0.1:9101"], "labels": {"node": "a"}}]
    servers.append(server := MetricsServer(registry, "127.0.0.1", 0, json_routes={"/sd": lambda: targets}))
    status, headers, body = _get(f"http://{server.address}/sd?x=1")
    assert (status, headers["Content-Type"], json.loads(body)) == (200, "application/json", targets)
    assert _get(f"http://{server.address}/metricsx")[0] == 404  # the library's handler alone serves every path
    assert _get(f"http://{server.address}/")[0] == 404
