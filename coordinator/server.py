"""The gRPC server: servicer, operator-token interceptor, health service, TLS or loopback-only insecure."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgetrain import grpc_options
from edgetrain import metric_names as m
from edgetrain.cli_util import read_file
from edgetrain.errors import ConfigError
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc

from .admission import CONTROL_MESSAGE_BYTES, HANDLER_THREADS
from .metrics import CoordinatorMetrics
from .service import ServiceState
from .servicer import CoordinatorServicer
from .streams import Oversize
from .transfer import serialize_round

SERVICE_NAME = "edgetrain.v1.Coordinator"
# Each update stream buffers what its flow-control window lets in, even while it waits for an upload slot
# (ServiceState.upload_slots). With BDP probing the window grows to megabytes, so 16 agents uploading together
# held ~5 MB each in gRPC's buffers: bench/core_perf.py measured the coordinator's peak RSS growth at 26x the
# model. A fixed 1 MiB stream window (then one tensor part; eight of today's 128 KiB parts) halved it (14.6x);
# 256 KiB went to 12x but slowed every upload by ~4 ms, 1 MiB costs uploads nothing measurable and downloads of
# 4.8 MB ~3 ms on loopback.
FLOW_CONTROL = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
]
# gRPC refuses a message over its receive limit before any handler sees it, so nothing could count it. The
# transport takes up to twice our limit; our deserializer refuses what is over MAX_MESSAGE_BYTES as too_large,
# counted. Past this cap gRPC still refuses on its own (RESOURCE_EXHAUSTED, uncounted: it offers no hook).
RECEIVE_CAP = 2 * grpc_options.MAX_MESSAGE_BYTES
# What each method's requests may weigh, past which they are refused unparsed (too_large): update parts and a
# same-host update's header (its layout names every tensor) up to the message limit, the rest
# admission.CONTROL_MESSAGE_BYTES.
REQUEST_CAPS = {"SubmitUpdate": grpc_options.MAX_MESSAGE_BYTES, "SubmitFile": grpc_options.MAX_MESSAGE_BYTES}
SERVER_OPTIONS = [
    *[(k, v) for k, v in grpc_options.SERVER if k != "grpc.max_receive_message_length"],
    ("grpc.max_receive_message_length", RECEIVE_CAP),
    *FLOW_CONTROL,
]


def _sized(deserialize: Callable[[bytes], Any], cap: int) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        return Oversize(len(data)) if len(data) > cap else deserialize(data)

    return read


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call to our service that lacks `authorization: Bearer <token>` (health checks pass)."""

    def __init__(self, token: str, metrics: CoordinatorMetrics) -> None:
        self._expected = f"Bearer {token}"
        self._metrics = metrics

        def deny(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong operator token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream_in = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_stream_out = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        if not method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        given = str(md.get(grpc_options.TOKEN_METADATA, ""))
        if secrets.compare_digest(given.encode(), self._expected.encode()):
            return continuation(handler_call_details)
        self._metrics.refused_update(m.UNKNOWN_NODE, "unauthenticated")
        if method.endswith("/SubmitUpdate"):
            return self._deny_stream_in
        if method.endswith("/GetRound"):
            return self._deny_stream_out
        return self._deny_unary


class _Handlers:
    """Stands in for a server to collect the generated code's method handlers."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, _service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def _add_servicer(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    """The generated registration, but GetRound's weight parts go out through `serialize_round`.

    gRPC's sync server keeps each stream's last response until the generator yields the next, and a stream
    waiting for a send slot would hold its last part's message that whole time: 16 agents' downloads held ~2 MB
    of them in the coordinator.
    """
    got = _Handlers()
    pb_grpc.add_CoordinatorServicer_to_server(servicer, got)  # type: ignore[no-untyped-call]
    handlers = {name: h._replace(request_deserializer=_sized(h.request_deserializer, REQUEST_CAPS.get(
                    name, CONTROL_MESSAGE_BYTES))) for name, h in got.handlers.items()}
    handlers["GetRound"] = handlers["GetRound"]._replace(response_serializer=serialize_round)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def start_server(
    state: ServiceState,
    host: str,
    port: int,
    *,
    token: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_client_ca: Path | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start serving; returns (server, bound port, health servicer). Port 0 picks a free port."""
    interceptors = [TokenInterceptor(token, state.metrics)] if token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="grpc"),
        options=SERVER_OPTIONS,
        interceptors=interceptors,
    )
    _add_servicer(CoordinatorServicer(state), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    creds = None
    if tls_cert is not None and tls_key is not None:
        key, cert = read_file(tls_key, "TLS key"), read_file(tls_cert, "TLS certificate")
        creds = grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=None if tls_client_ca is None else read_file(tls_client_ca, "client CA"),
            require_client_auth=tls_client_ca is not None,
        )
    try:
        bound = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises this when the port is taken or not ours to bind
        raise ConfigError(f"cannot listen on {address}: the port is in use or needs privileges (below 1024), or the "
                          "host is not an address of this machine") from exc
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
