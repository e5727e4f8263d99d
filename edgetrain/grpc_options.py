"""gRPC channel and server options both sides use, each with its reason."""

from __future__ import annotations

import ipaddress
import os

# Tensors travel in 128 KiB parts (edgetrain.serde.PART_BYTES), so 8 MiB leaves room for a part plus its header
# and still refuses a message far larger than any honest one.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def _shortened(name: str, default: int) -> int:
    """`default`, or the value of environment variable `name` where that is shorter (tests only ever shorten)."""
    given = os.environ.get(name)
    if not given:
        return default
    if not given.isdigit() or int(given) <= 0:
        raise ValueError(f"{name} must be a positive whole number of milliseconds, got {given!r}")
    return min(default, int(given))


# Clients ping every 60 s while a long-poll is idle so NATs and proxies on edge links keep the connection;
# the server accepts pings that often (its default minimum, 5 min, would answer GOAWAY "too_many_pings").
# Both sides also ping: a connection whose packets vanish without a reset (a half-open link) is closed about
# KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS (80 s) after it went silent, and its calls fail UNAVAILABLE.
# The EDGETRAIN_KEEPALIVE_*_MS variables can only shorten them: tests use them to see that bound in seconds.
KEEPALIVE_TIME_MS = _shortened("EDGETRAIN_KEEPALIVE_TIME_MS", 60_000)
KEEPALIVE_TIMEOUT_MS = _shortened("EDGETRAIN_KEEPALIVE_TIMEOUT_MS", 20_000)
MIN_PING_INTERVAL_MS = KEEPALIVE_TIME_MS // 2

SESSION_METADATA = "x-edgetrain-session"  # per-agent session token handed out by Join
TOKEN_METADATA = "authorization"  # "Bearer <operator token>", checked by the server interceptor

COMMON = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
CLIENT = [
    *COMMON,
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER = [
    *COMMON,
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would start and split the agents.
    ("grpc.so_reuseport", 0),
]


def address_host(address: str) -> str:
    """The host of "host:port", "[v6]:port", a bare host, or a gRPC peer ("ipv4:1.2.3.4:5", "ipv6:[::1]:5")."""
    address = address.removeprefix("ipv4:").removeprefix("ipv6:")
    if address.startswith("[") and "]" in address:
        return address[1 : address.index("]")]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address  # "::1" is a bare IPv6 host


def is_loopback(host: str) -> bool:
    """Whether a bare host ("localhost", "127.0.0.1", "::1", "[::1]") is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
