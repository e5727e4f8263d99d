"""The test relay's delay and jitter (tests/integration/relay.py): bytes arrive unchanged, in order, and late."""

from __future__ import annotations

import os
import socket
import threading
import time

from tests.integration.relay import Relay


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_jittered_chunks_arrive_unchanged_in_order_and_no_sooner_than_their_delay() -> None:
    server, thread = _echo_server()
    delay, jitter = 0.02, 0.03
    sent = os.urandom(300_000)
    with server, Relay(server.getsockname()[1], delay_s=delay, jitter_s=jitter, seed=4) as relay, \
            socket.create_connection(("127.0.0.1", relay.port)) as client:
        start = time.monotonic()
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        rtt = time.monotonic() - start
        assert rtt >= 2 * delay  # one delay each way, whatever the load
        writer = threading.Thread(target=lambda: [client.sendall(sent[i:i + 1000]) for i in range(0, len(sent), 1000)])
        writer.start()  # many small chunks, each with its own drawn delay: a later one may draw a shorter one
        got = bytearray()
        while len(got) < len(sent):
            got += client.recv(65536)
        writer.join()
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""  # the end of the stream comes through too, after the bytes
    thread.join(5)
    assert bytes(got) == sent
