"""What the coordinator lets a client hold: limits with their reasons, Join validation, and the stream watchdog.

Plain code without a gRPC server (the servicer applies it): every limit here bounds a resource that anyone who
can connect, or one joined agent, could otherwise take from the agents that train (threads, upload slots,
memory, metric series, a round's wait). docs/security.md, "Limits", lists them with their defaults.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from edgetrain.errors import ConfigError
from edgetrain.grpc_options import address_host
from edgetrain.metric_names import agent_name_problem, device_problem

_A = TypeVar("_A")

# The gRPC sync server's handler threads: every open call holds one. Each agent holds one in its long-poll and
# one while uploading, so 64 serve ~30 agents at once, and more agents only wait a little longer for a thread.
HANDLER_THREADS = 64
# Join, GetRound, Leave and SubmitFile carry a few fields (the largest valid Join, 4,096 cores and every text
# field at its limit, is ~13 KB): past this size they are refused before they are parsed (too_large, counted),
# so a client cannot make the coordinator decode megabytes of repeated fields. Update parts may reach
# grpc_options.MAX_MESSAGE_BYTES.
CONTROL_MESSAGE_BYTES = 64 << 10


@dataclass(frozen=True)
class Limits:
    """Per-run limits; each default fits a fleet of a few thousand agents and says what it stops."""

    # An update stream must bring its first message this soon after it opens: a stream that never sends would
    # hold one of the server's handler threads (a gRPC sync server gives each open call one) for good.
    first_message_seconds: float = 10.0
    # ... and each next part this soon after the last (once it holds an upload slot). A 128 KiB part takes ~1 s
    # on the slowest link the agents' deadlines allow for (1 Mbit/s): 30 s is slack for a link that stalls, not
    # a rate, so an uploader that trickles holds its slot 30 s at most per part, and never past its round.
    part_gap_seconds: float = 30.0
    # Calls one agent's session may have open at once: a long-poll, the end of the last round's stream and an
    # upload are 3; the fourth and later are refused RESOURCE_EXHAUSTED instead of each holding a thread.
    calls_per_agent: int = 4
    # Agents admitted at once (per operator token: a run has one). A replacement under a known name does not
    # count twice. Each costs a record and its metric series (~26), so this bounds memory and /metrics.
    max_agents: int = 2048
    # Joins per second from one peer address, and the burst it may use at once: a fleet of 1,000 agents behind
    # one NAT rejoins within ~10 s of a coordinator restart; a flood of new names from one host is cut to this.
    joins_per_second: float = 100.0
    join_burst: int = 500
    # An agent that joined but never asked for a round this long after is evicted (it loads its data and starts
    # its workers in between: minutes on a slow board that downloads the data set first).
    first_poll_seconds: float = 300.0
    # An agent that is not in the open round and has no call open is evicted when unseen this long: an idle one
    # long-polls every 20 s (agent.client.LONG_POLL_S), so three missed polls mean it is gone.
    idle_seconds: float = 60.0
    # A round does not wait for a participant that has not fetched its weights this soon after the round opened
    # (one that polls fetches within milliseconds) ...
    fetch_grace_seconds: float = 3.0
    # ... nor, once every participant with a measured round time is in, for one that missed its last round
    # (an update measured it before) longer than this fraction of the round so far (and at least `min_grace`):
    # its next update that arrives, even late, measures it again, and rounds wait for it from then on.
    # The floor keeps very short rounds (15 ms on loopback) from giving up on an honest agent that only missed
    # its last round: without it, such an agent under load lost the next round too (test_netns).
    probation_grace_ratio: float = 0.25
    min_grace_seconds: float = 0.2
    # A newcomer (no update has measured it yet, fetched or not; an agent back under a name whose updates were
    # taken is none: KnownNames) is waited for this fraction of the round so far once the measured are in, with
    # no floor, unless the round needs its update (--min-agents; then as long as the slowest measured agent):
    # its first round is a trial, whose update, late or not, measures it.
    # Agents that join and never send (ghosts) then cost a round nothing but their download. With the 0.2 s
    # floor and the fetch grace they had, 8 ghosts a round held the real agent of bench/hostile to 2.2-2.6
    # rounds/s (34 %); an honest newcomer slower than the measured agents now loses its first round's work.
    newcomer_grace_ratio: float = 0.0
    # Unmeasured agents that join one round: at most this many, or as many as its measured ones if more. A fleet
    # that starts together is in within a few rounds (8, 16, 32, ...); agents that join and never send (ghosts
    # that do fetch) cost each round one grace and one download each, not one per ghost that joined.
    newcomers_per_round: int = 8
    # Long-polls held at once (each holds a handler thread until its round opens or 20 s pass): at most
    # `held_polls` in all, so half the threads stay free for uploads, Joins and answers; of them at most
    # `newcomer_polls` by agents no update has measured yet, so agents that join and only poll (ghosts) cannot
    # take the threads the agents that train need. Past either, GetRound answers WAIT at once with
    # `poll_again_seconds`, and the agent asks again after that long.
    held_polls: int = HANDLER_THREADS // 2
    newcomer_polls: int = 8
    poll_again_seconds: float = 1.0
    # A measured participant is waited for up to `slack` times its measured round time (at least `min_wait`).
    slack: float = 3.0
    min_wait_seconds: float = 2.0
    # Serve /sd targets only on the address an agent's calls come from (False), or any host it names (True).
    any_metrics_host: bool = False

    def __post_init__(self) -> None:
        for name in ("first_message_seconds", "part_gap_seconds", "joins_per_second", "first_poll_seconds",
                     "idle_seconds", "fetch_grace_seconds", "slack", "min_wait_seconds", "poll_again_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("probation_grace_ratio", "min_grace_seconds", "newcomer_grace_ratio"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be 0 or more")
        if self.max_agents < 1:
            raise ConfigError(f"--max-agents must be at least 1, got {self.max_agents}")
        if min(self.calls_per_agent, self.join_burst, self.newcomers_per_round, self.newcomer_polls) < 1:
            raise ConfigError("calls_per_agent, join_burst, newcomers_per_round and newcomer_polls must be at least 1")
        if not self.newcomer_polls <= self.held_polls < HANDLER_THREADS:
            raise ConfigError(f"held_polls must be in newcomer_polls..{HANDLER_THREADS - 1}")


def with_newcomers_capped(agents: list[_A], measured: Callable[[_A], bool], cap: int) -> list[_A]:
    """`agents` (in admission order) with at most max(cap, number measured) unmeasured ones, the earliest first."""
    known = sum(1 for a in agents if measured(a))
    room = max(cap, known)
    kept = []
    for a in agents:
        if measured(a):
            kept.append(a)
        elif room > 0:
            kept.append(a)
            room -= 1
    return kept


# ---- Join fields: everything a client sends is input, bounded before it is stored, logged or exported.
MAX_CORES = 4096  # cores one agent may declare (the largest machines have a few hundred)
MAX_CORE_ID = 1 << 16
MAX_ADDRESS_CHARS = 262  # "[" + 253-character host + "]:" + 5-digit port
MAX_FINGERPRINT_CHARS = 128


def join_problem(name: str, cores: list[int], device: str, workers: int, data_fingerprint: str) -> str | None:
    """Why a JoinRequest's own fields are unusable (the metrics address is `metrics_address` below), or None."""
    problem = agent_name_problem(name)
    if problem is not None:
        return f"agent_name: {problem}"
    if len(cores) > MAX_CORES:
        return f"cores: at most {MAX_CORES}"
    if any(not 0 <= c < MAX_CORE_ID for c in cores) or len(set(cores)) != len(cores):
        return f"cores: distinct core numbers in 0..{MAX_CORE_ID - 1}"
    problem = device_problem(device)
    if problem is not None:
        return f"device: {problem}"
    if not 0 <= workers <= max(1, len(cores)):
        # workers scale the most samples an update may claim: more than its cores would let one agent
        # outweigh everyone in the average
        return "workers must be between 1 and the number of cores the agent declares"
    if len(data_fingerprint) > MAX_FINGERPRINT_CHARS or not data_fingerprint.isascii() or (
            data_fingerprint and not data_fingerprint.isalnum()):
        return f"data_fingerprint: at most {MAX_FINGERPRINT_CHARS} letters and digits"
    return None


_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def metrics_address(claimed: str, peer: str, any_host: bool = False) -> tuple[str, str | None]:
    """(address to scrape, problem): where an agent's /metrics is, as /sd will list it.

    `peer` is gRPC's form ("ipv4:10.0.0.7:51234", "ipv6:[fd00::7]:51234"). An agent bound to a wildcard is
    scraped at the address its calls come from. Any other host must be that address too unless `any_host`:
    else any agent could aim Prometheus at any host and port.
    """
    if not claimed:
        return "", None
    if len(claimed) > MAX_ADDRESS_CHARS or not claimed.isascii() or not claimed.isprintable():
        return "", f"metrics_address: host:port, at most {MAX_ADDRESS_CHARS} printable ASCII characters"
    host, sep, port = claimed.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return "", "metrics_address: host:port with a port in 1..65535"
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    kind = peer.partition(":")[0]
    peer_host = address_host(peer) if kind in ("ipv4", "ipv6") else ""
    if host in _WILDCARDS:
        if not peer_host:
            return "", "metrics_address: a wildcard host needs a peer address to stand for it"
        bare = peer_host
    elif not any_host and not _same_host(bare, peer_host):
        return "", (f"metrics_address: host {bare} is not the address this agent calls from; the coordinator "
                    "operator can allow other hosts (--sd-any-host)")
    elif any_host and not _host_shape(bare):
        return "", "metrics_address: the host is neither an IP address nor a DNS name"
    host_out = f"[{bare}]" if ":" in bare else bare
    return f"{host_out}:{int(port)}", None


def _same_host(a: str, b: str) -> bool:
    try:
        return bool(b) and ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _host_shape(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.rstrip(".").split(".")
        return len(host) <= 253 and all(0 < len(x) <= 63 and x.replace("-", "").isalnum() and x.isascii()
                                         for x in labels)


# ---- rates and counts
class JoinRate:
    """A token bucket per peer host: `allow(host)` spends one Join, False when the host's bucket is empty.

    Holds at most `max_hosts` buckets (the least recently used goes first), so spoofed or many hosts cannot
    grow it without bound.
    """

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_hosts: int = 65536) -> None:
        self.per_second, self.burst, self._clock, self._max = per_second, burst, clock, max_hosts
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # host -> (tokens, at)

    def allow(self, host: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(host, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
            ok = tokens >= 1.0
            self._buckets[host] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return ok


class CallCounts:
    """Calls open per key (an agent's id): `hold` refuses past `limit` instead of letting one more wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        with self._lock:
            n = self._open.get(key, 0)
            ok = n < self.limit
            if ok:
                self._open[key] = n + 1
        try:
            yield ok
        finally:
            if ok:
                with self._lock:
                    left = self._open[key] - 1
                    if left:
                        self._open[key] = left
                    else:
                        del self._open[key]

    def open_calls(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)


class KnownNames:
    """Names of agents whose updates were taken, the latest `cap` (a fleet's, many times over).

    An agent restarted under such a name, after a crash or a clean Leave, is no newcomer: rounds give it the
    grace of one that missed a round (RoundEngine.vouch), not a trial. Only an update the coordinator took puts a
    name here, and a name costs ~100 bytes.
    """

    def __init__(self, cap: int = 10_000) -> None:
        self._cap = cap
        self._names: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._names[name] = None
            self._names.move_to_end(name)
            while len(self._names) > self._cap:
                self._names.popitem(last=False)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._names


class PollSlots:
    """Long-polls held at once (Limits.held_polls, of them Limits.newcomer_polls by unmeasured agents)."""

    def __init__(self, total: int, newcomers: int) -> None:
        self.total, self.newcomers = total, newcomers
        self._lock = threading.Lock()
        self._held = [0, 0]  # by measured agents, by newcomers

    @contextmanager
    def hold(self, measured: bool) -> Iterator[bool]:
        """True: the call may wait for its round; False: answer at once (and ask to be polled again later)."""
        kind = 0 if measured else 1
        with self._lock:
            ok = sum(self._held) < self.total and (measured or self._held[1] < self.newcomers)
            if ok:
                self._held[kind] += 1
        try:
            yield ok
        finally:
            if ok:
                with self._lock:
                    self._held[kind] -= 1

    def held(self) -> tuple[int, int]:
        """Long-polls held now: (by measured agents, by newcomers)."""
        with self._lock:
            return self._held[0], self._held[1]


class Watchdog:
    """Runs a callback when a timer runs out, unless it was reset or cancelled first; one thread for all timers.

    Update streams arm one each: the callback ends the stream, which a handler thread blocked on reading it
    cannot do itself (a gRPC sync server has no read timeout). The heap holds one entry per armed timer and none
    for a cancelled one: an entry holds its timer, the timer its callback, the callback the call's context (gRPC's
    call state, native memory). Before, each part's reset pushed an entry, and each stayed until its time came,
    up to `part_gap_seconds` after the stream ended: the soak measured ~1,400 calls held that way per 60 rounds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Timer]] = []
        self._ids = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self, callback)
        timer.reset(seconds)
        return timer

    def pending(self) -> int:
        """Entries in the heap: the timers armed now."""
        with self._cv:
            return len(self._heap)

    def _set(self, timer: Timer, end: float | None) -> None:
        """Move `timer`'s end (None: cancel it). A later end keeps its entry: when that comes due, it moves on."""
        with self._cv:
            if self._closed or timer.fired or timer.callback is None:
                return
            timer.end = end
            if timer.queued is not None and (end is None or end < timer.queued):
                self._heap = [e for e in self._heap if e[2] is not timer]
                heapq.heapify(self._heap)
                timer.queued = None
            if end is not None and timer.queued is None:
                self._push(timer, end)

    def _push(self, timer: Timer, when: float) -> None:  # under self._cv
        heapq.heappush(self._heap, (when, next(self._ids), timer))
        timer.queued = when
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
            self._thread.start()
        if self._heap[0][2] is timer:  # due before what it sleeps for: wake it
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > self._clock()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - self._clock()))
                if self._closed:
                    return
                when, _, timer = heapq.heappop(self._heap)
                timer.queued = None
                if timer.end is None or timer.callback is None:
                    continue
                if timer.end > when:  # reset since it was queued
                    self._push(timer, timer.end)
                    continue
                timer.fired = True
                callback, timer.callback = timer.callback, None  # it fires once: keep nothing of it after
            try:
                callback()
            except Exception:  # noqa: BLE001 - a callback's failure must not stop every other timer
                pass

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()


class Timer:
    """One watchdog timer: `reset(seconds)` moves its end, `cancel()` stops it; it fires at most once.

    `close()` cancels it for good and lets go of its callback (which usually holds what owns the timer).
    """

    def __init__(self, dog: Watchdog, callback: Callable[[], None]) -> None:
        self._dog = dog
        self.callback: Callable[[], None] | None = callback  # these three are the watchdog's, under its lock
        self.end: float | None = None
        self.queued: float | None = None  # the time of its heap entry, if it has one (never after `end`)
        self.fired = False

    def reset(self, seconds: float) -> None:
        self._dog._set(self, self._dog._clock() + seconds)

    def cancel(self) -> None:
        self._dog._set(self, None)

    def close(self) -> None:
        self._dog._set(self, None)
        with self._dog._cv:
            self.callback = None
