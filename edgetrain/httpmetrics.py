"""A small threaded HTTP server for /metrics (and extra JSON routes such as Prometheus http_sd).

/metrics is prometheus_client's own handler (`MetricsHandler`): content negotiation (OpenMetrics for a scraper
that asks for `application/openmetrics-text`, text format 0.0.4 otherwise), gzip when the scraper accepts it,
and `name[]` filters. What stays hand-written here is what the library does not do: the routes beside /metrics
(`/sd` for Prometheus http_sd), a 404 for any other path (the library's handler serves every path), binding an
IPv6 host with "::" serving IPv4 too, advertising the bound address in brackets, and one ConfigError line for
an address that cannot be served.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, MetricsHandler

from edgetrain.errors import ConfigError


def host_port(host: str, port: int) -> str:
    """`host` and `port` as "host:port", an IPv6 host in brackets ("[::1]:9101"): as Prometheus and URLs take it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family to bind `host` with: IPv6 for an IPv6 address, or a name that has only IPv6 ones."""
    if not host:  # "" is http.server's IPv4 wildcard
        return socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a label too long to be a host name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a valid host name"
        raise ConfigError(f"cannot serve /metrics on {host_port(host, port)}: {reason}") from exc
    families = {info[0] for info in infos}
    # A name with both kinds binds IPv4, as it always did (and as "localhost" is mostly meant)
    return socket.AF_INET if socket.AF_INET in families or not families else socket.AF_INET6


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # "::" serves IPv4 clients too (as `python -m http.server` does), whatever the OS's default: the
        # coordinator advertises a wildcard bind at the address the agent's calls come from, IPv4 or IPv6.
        with contextlib.suppress(AttributeError, OSError):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class MetricsServer:
    """Serves `registry` at /metrics and each `json_routes[path]()` as JSON, on a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0,
                 json_routes: dict[str, Callable[[], Any]] | None = None) -> None:
        routes = dict(json_routes or {})

        class Handler(MetricsHandler):  # quiet: it logs nothing per scrape
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = urlsplit(self.path).path
                if path == "/metrics":
                    super().do_GET()  # the library's exposition: negotiation, OpenMetrics, gzip
                    return
                if path not in routes:
                    self.send_error(404, "try /metrics")
                    return
                body = json.dumps(routes[path]()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        Handler.registry = registry

        if host.startswith("[") and host.endswith("]"):  # "[::1]", as in a URL
            host = host[1:-1]
        server_class = _HTTPServer6 if _family(host, port) == socket.AF_INET6 else _HTTPServer
        try:
            self._httpd = server_class((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve /metrics on {host_port(host, port)}: {exc.strerror}") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def address(self) -> str:
        """The bound "host:port" ("[::1]:9101" for IPv6): a Prometheus target, or the authority of a URL."""
        return host_port(str(self._httpd.server_address[0]), self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
