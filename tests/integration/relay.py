"""A real slow link for tests: a TCP relay that delays bytes (with jitter) and passes them back at a set rate.

This machine's kernel has no netem, so delay and jitter come from here: every chunk a relay reads waits a delay
drawn for it (`delay_s` + U(0, `jitter_s`)), never overtaking the chunk before it, and then goes on unchanged.
"""

from __future__ import annotations

import random
import selectors
import socket
import threading
import time
from collections import deque
from types import TracebackType

BUFFER = 64 * 1024  # bytes a direction holds between its two sockets: a full one stops reading its source
QUANTUM = 4 * 1024  # a throttled direction sends at least this much at once (or what it holds), not byte by byte
# A delaying direction holds what is "in flight" on the link it plays: 4 MiB covers 100 Mbit/s x 0.3 s (a 64 KiB
# buffer would cap a 20 ms link at 3.2 MB/s, far below the rates it is meant to pass).
DELAY_BUFFER = 4 * 1024 * 1024


class _Flow:
    """One direction of one connection: what `src` sent, waiting for `dst`."""

    def __init__(self, src: socket.socket, dst: socket.socket, rate: float | None, delay: Delay | None) -> None:
        self.src, self.dst, self.rate, self.delay = src, dst, rate, delay
        self.buf = bytearray()  # bytes that may go on now
        self.later: deque[tuple[float, bytes]] = deque()  # (when, chunk): delayed chunks, in order
        self.held = 0  # bytes in buf and later
        self.limit = DELAY_BUFFER if delay is not None else BUFFER
        self.eof = False  # src has no more; dst's write side is shut once buf is empty
        self.shut = False
        self.tokens = 0.0  # bytes it may send now (throttled): grows at `rate`, up to QUANTUM
        self.at = time.monotonic()
        self.sent = 0

    def allowance(self, now: float) -> float:
        if self.rate is None:
            return float("inf")
        self.tokens = min(float(QUANTUM), self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens

    def take(self, data: bytes, now: float) -> None:
        """Hold what src sent: at once in buf, or as a chunk due after its delay."""
        if not data:
            return
        self.held += len(data)
        if self.delay is None:
            self.buf += data
        else:
            due = now + self.delay.draw()
            self.later.append((max(due, self.later[-1][0]) if self.later else due, data))

    def release(self, now: float) -> float | None:
        """Move the chunks that are due into buf; seconds until the next one is (None: none waits)."""
        while self.later and self.later[0][0] <= now:
            self.buf += self.later.popleft()[1]
        return self.later[0][0] - now if self.later else None

    def wait(self, now: float) -> float | None:
        """Seconds until it may send what it holds (None: nothing to send, or no limit)."""
        if self.rate is None or not self.buf:
            return None
        need = min(len(self.buf), QUANTUM)
        return max(0.0, (need - self.allowance(now)) / self.rate)


class Delay:
    """A link's one-way delay: `delay_s` plus U(0, `jitter_s`) drawn per chunk, from a seeded generator."""

    def __init__(self, delay_s: float, jitter_s: float, seed: int) -> None:
        if delay_s < 0 or jitter_s < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {delay_s} and {jitter_s}")
        self.delay_s, self.jitter_s = delay_s, jitter_s
        self._rng = random.Random(seed)

    def draw(self) -> float:
        return self.delay_s + self._rng.uniform(0.0, self.jitter_s)


class Relay:
    """Forwards connections on `host`:`port` to `target_host`:`target_port`, over a link it plays.

    - `down_bytes_per_s`: bytes from the target reach the client no faster than this (each connection on its
      own), and no more than BUFFER of them wait in the relay: the rest stay in the target's socket, so its sender
      is held back as on a slow link. Bytes from the client go on at once.
    - `delay_s`, `jitter_s`: every chunk, both ways, goes on only after its delay (see Delay), in order.
    One thread runs it, in the network namespace of the thread that made it (tests/integration/netns.py makes
    one inside an emulated host); `close` (or leaving the `with`) stops it and closes every socket it made.
    """

    def __init__(self, target_port: int, down_bytes_per_s: float | None = None, *, delay_s: float = 0.0,
                 jitter_s: float = 0.0, seed: int = 0, host: str = "127.0.0.1", target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.rate = down_bytes_per_s
        self._delays = (Delay(delay_s, jitter_s, seed), Delay(delay_s, jitter_s, seed + 1)) if delay_s or jitter_s \
            else None
        self._lock = threading.Lock()
        self._down_bytes = 0
        self._flows: list[_Flow] = []
        self._sel = selectors.DefaultSelector()
        self._listener = socket.create_server((host, 0))
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._listener, self._wake_r):
            s.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()  # here: a thread starts in the network namespace of the thread that starts it

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def down_bytes(self) -> int:
        """Bytes passed on to clients so far."""
        with self._lock:
            return self._down_bytes

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()

    def _cleanup(self) -> None:
        for flow in self._flows:
            flow.src.close()  # each socket is the src of one flow
        self._flows.clear()
        self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def _run(self) -> None:
        try:
            while not self._stop:
                timeout = self._arm()
                for key, _ in self._sel.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                for flow in list(self._flows):
                    if any(f is flow for f in self._flows):  # not dropped with its pair just now
                        self._move(flow)
        finally:
            self._cleanup()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up, down = self._delays or (None, None)
        self._flows += [_Flow(client, server, None, up), _Flow(server, client, self.rate, down)]

    def _arm(self) -> float | None:
        """Register each socket for what its flows can do now; the time until a throttled one may send."""
        wanted: dict[socket.socket, int] = {self._listener: selectors.EVENT_READ, self._wake_r: selectors.EVENT_READ}
        timeout: float | None = None
        now = time.monotonic()
        for flow in self._flows:
            if not flow.eof and flow.held < flow.limit:
                wanted[flow.src] = wanted.get(flow.src, 0) | selectors.EVENT_READ
            due = flow.release(now)
            wait = flow.wait(now)
            if flow.buf and (wait is None or wait == 0.0):
                wanted[flow.dst] = wanted.get(flow.dst, 0) | selectors.EVENT_WRITE
            for t in (wait, due):
                if t:
                    timeout = t if timeout is None else min(timeout, t)
        for key in list(self._sel.get_map().values()):
            if key.fileobj not in wanted:
                self._sel.unregister(key.fileobj)
        for s, events in wanted.items():
            try:
                key = self._sel.get_key(s)
            except KeyError:
                self._sel.register(s, events)
            else:
                if key.events != events:
                    self._sel.modify(s, events)
        return timeout

    def _move(self, flow: _Flow) -> None:
        """Read what `src` has and send what `dst` may take now; a connection that failed or ended is closed."""
        try:
            now = time.monotonic()
            if not flow.eof and flow.held < flow.limit:
                try:
                    data = flow.src.recv(min(BUFFER, flow.limit - flow.held))
                except BlockingIOError:
                    pass
                else:
                    flow.take(data, now)
                    flow.eof = not data
            flow.release(now)
            if flow.buf:
                n = min(len(flow.buf), int(min(flow.allowance(now), BUFFER)))
                if n >= min(len(flow.buf), QUANTUM):
                    try:
                        sent = flow.dst.send(flow.buf[:n])
                    except BlockingIOError:
                        sent = 0
                    del flow.buf[:sent]
                    flow.held -= sent
                    flow.sent += sent
                    if flow.rate is not None:
                        flow.tokens -= sent
                        with self._lock:
                            self._down_bytes += sent
            if flow.eof and not flow.held and not flow.shut:
                flow.shut = True
                flow.dst.shutdown(socket.SHUT_WR)
        except OSError:  # reset, broken pipe: the link is gone both ways
            self._drop(flow)
            return
        if all(f.shut for f in self._pair(flow)):
            self._drop(flow)

    def _pair(self, flow: _Flow) -> list[_Flow]:
        return [f for f in self._flows if f.src in (flow.src, flow.dst)]

    def _drop(self, flow: _Flow) -> None:
        pair = self._pair(flow)
        for f in pair:
            if f.src in self._sel.get_map():
                self._sel.unregister(f.src)
            f.src.close()
        self._flows = [f for f in self._flows if all(f is not p for p in pair)]
