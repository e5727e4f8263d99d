"""The coordinator's service in plain code: who may join, poll for a round, hand in an update and leave.

The gRPC servicer (coordinator/servicer.py) reads the call (its metadata, peer and deadline), calls `ServiceState`
with plain values and writes the answer; every decision is made here, each refusal raised as a
`rounds.RefusedError` that the servicer maps to its status code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgetrain.cores import format_cores
from edgetrain.errors import NonFiniteError, WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.records import NodeStats
from edgetrain.samehost import SHM_ROOT
from edgetrain.spec import RunSpec

from . import rounds
from .admission import CallCounts, JoinRate, KnownNames, Limits, PollSlots, Watchdog, join_problem, metrics_address
from .config import UPLOAD_SLOTS
from .membership import Agent, FullError, Membership
from .metrics import CoordinatorMetrics
from .transfer import SEND_SLOTS, SEND_WAIT, Transfer

log = logging.getLogger("edgetrain.coordinator")

MAX_THROUGHPUT = 1e9  # samples/s: far above any real node, and small enough that sums of them stay finite


@dataclass(frozen=True)
class JoinAsk:
    """What a Join asks for, as plain values (the servicer reads them from pb.JoinRequest)."""

    name: str
    cores: tuple[int, ...]
    device: str
    workers: int
    throughput: float
    data_fingerprint: str
    metrics_address: str
    peer: str  # the caller's address as gRPC names it


def refusal_of(err: WireError) -> rounds.RefusedError:
    """The refusal for an update the codec could not take."""
    if isinstance(err, NonFiniteError):
        return rounds.NonFiniteError(str(err))
    return rounds.BadTensorError(str(err))


@dataclass
class ServiceState:
    """What the servicer needs: the engine, who is in, the spec, the metrics, the transfer and the limits."""

    engine: rounds.RoundEngine
    membership: Membership
    spec: RunSpec
    metrics: CoordinatorMetrics
    long_poll: float = 20.0
    # how tensors move (coordinator/transfer): slots, staging, same-host files
    upload_slots: int = UPLOAD_SLOTS
    send_slots: int = SEND_SLOTS
    send_wait: float | None = SEND_WAIT
    shm_root: Path | None = SHM_ROOT
    staging_dir: Path | None = None
    min_agents: int = 1  # the run's --min-agents: newcomers past the poll cap stay ready while fewer are
    limits: Limits = field(default_factory=Limits)  # what one client may hold (coordinator/admission.py)

    def __post_init__(self) -> None:
        self.transfer = Transfer(self.engine, upload_slots=self.upload_slots, send_slots=self.send_slots,
                                 send_wait=self.send_wait, shm_root=self.shm_root, staging_dir=self.staging_dir)
        self.calls = CallCounts(self.limits.calls_per_agent)
        self.upload_calls = CallCounts(1)  # one upload per agent at a time: two would hold two upload slots
        self.joins = JoinRate(self.limits.joins_per_second, self.limits.join_burst)
        self.polls = PollSlots(self.limits.held_polls, self.limits.newcomer_polls)
        self.known = KnownNames()  # names whose updates were taken: restarted under one, no newcomer
        self.watchdog = Watchdog()
        self._swept_at = 0.0

    def sweep(self, every: float = 1.0) -> None:
        """Evict agents that never polled or went quiet (Limits); at most once per `every` seconds."""
        now = time.monotonic()
        if now - self._swept_at < every:
            return
        self._swept_at = now
        lim = self.limits
        for agent in self.membership.sweep(first_poll=lim.first_poll_seconds, idle=lim.idle_seconds,
                                           busy=self.engine.busy(), open_calls=self.calls.open_calls, now=now):
            self.engine.forget(agent.agent_id)
            log.warning("agent %s evicted: %s", agent.name, "it never asked for a round" if not agent.polled
                        else f"no call for {lim.idle_seconds:g} s")

    def close(self) -> None:
        """Stop the watchdog; remove the same-host files and close the staging files (also at interpreter exit)."""
        self.watchdog.close()
        self.transfer.close()

    # ---- the calls
    def join(self, ask: JoinAsk) -> Agent:
        """Admit an agent (replacing one of the same name), or refuse it: rate, fields, data, room."""
        if not self.joins.allow(address_host(ask.peer)):
            raise rounds.RateLimitedError(f"more than {self.limits.joins_per_second:g} Joins a second from "
                                          "this address: try again shortly")
        problem = join_problem(ask.name, list(ask.cores), ask.device, ask.workers, ask.data_fingerprint)
        if problem is not None:  # every field becomes a label, a log line or a scrape target
            raise rounds.MalformedError(problem)
        if not (math.isfinite(ask.throughput) and 0 <= ask.throughput <= MAX_THROUGHPUT):
            raise rounds.MalformedError(f"throughput must be a number in 0..{MAX_THROUGHPUT:g} samples/s")
        address, problem = metrics_address(ask.metrics_address, ask.peer, self.limits.any_metrics_host)
        if problem is not None:
            raise rounds.MalformedError(problem)
        if ask.data_fingerprint and ask.data_fingerprint != self.spec.data_fingerprint:
            raise rounds.DataMismatchError(
                f"this agent's data has fingerprint {ask.data_fingerprint[:12]}, the run's is "
                f"{self.spec.data_fingerprint[:12] or '(none)'}: different files, version or preprocessing")
        self.sweep()
        try:
            agent, replaced = self.membership.admit(
                ask.name, cores=ask.cores, device=ask.device, workers=max(1, ask.workers),
                throughput=ask.throughput, metrics_address=address, local=is_loopback(address_host(ask.peer)))
        except FullError as err:
            raise rounds.TooManyAgentsError(str(err)) from err
        if replaced is not None:
            self.engine.forget(replaced.agent_id)
        if ask.name in self.known:
            self.engine.vouch(agent.agent_id)
        log.info("agent %s joined (%s, cores %s)", ask.name, agent.device, format_cores(sorted(agent.cores)))
        return agent

    @contextmanager
    def call(self, agent: Agent) -> Iterator[None]:
        """Count a call against its agent's limit (Limits.calls_per_agent): past it, refuse rather than wait."""
        with self.calls.hold(agent.agent_id) as ok:
            if not ok:
                raise rounds.TooManyCallsError(f"this agent has {self.calls.limit} calls open already")
            yield

    @contextmanager
    def taking(self, agent: Agent, round_: int, samples: int) -> Iterator[None]:
        """While an update of `agent` is taken: only one the open round lacks, one at a time per agent.

        (Two at a time would hold two upload slots.)
        """
        self.engine.precheck(agent.agent_id, round_, samples)
        with self.upload_calls.hold(agent.agent_id) as ok:
            if not ok:
                raise rounds.TooManyCallsError("an update from this agent is being taken already")
            yield

    def agent(self, agent_id: str, session_token: str) -> Agent:
        """The joined agent `agent_id`, if the call carries its session."""
        agent = self.membership.get(agent_id)
        if agent is None:
            raise rounds.UnknownAgentError(f"agent id {agent_id!r} is not registered: join first")
        if self.membership.check_session(agent_id, session_token) is None:
            raise rounds.UnauthenticatedError("missing or wrong session token for this agent")
        return agent

    def session(self, session_token: str) -> Agent:
        """The agent whose session a call carries, before anything blocks (a stream's header may never come)."""
        agent = self.membership.by_session(session_token)
        if agent is None:
            raise rounds.UnauthenticatedError("an update stream needs the session of a joined agent: join first")
        return agent

    def poll(self, agent: Agent, after_round: int, hold: float, gone: Callable[[], bool]) -> tuple[rounds.Work, bool]:
        """An agent's ask for the round after `after_round`: its work, and whether it held a long-poll slot.

        With a slot it waits up to `hold` s for work; without one it takes only work that is there now.
        """
        agent.polled = True
        engine = self.engine
        measured = engine.measured(agent.agent_id)
        with self.polls.hold(measured) as may_wait:
            # No long-poll slot: only work that is there now, else WAIT at once (poll_again_ms). Such a newcomer
            # sits out the rounds until it holds a poll (a ghost that never asks again is in none of them), unless
            # the run needs it to start or go on: before anyone is measured, or while fewer than --min-agents are
            # ready (it comes back within poll_again, well inside the fetch grace).
            agent.ready = (may_wait or measured or not engine.measured_any()
                           or self.membership.ready_count() < self.min_agents)
            work = engine.get_work(agent.agent_id, after_round, hold if may_wait else 0.0, gone=gone)
        if work.status not in ("WORK", "FINISHED", "FAILED") and not may_wait:  # a WAIT: come back (poll_again)
            self.metrics.polls_deferred.inc()
        return work, may_wait

    def went_away(self, agent: Agent) -> None:
        """An unanswered poll's caller went away (a ghost, or an agent leaving): out of rounds until it asks again."""
        agent.ready = False
        self.engine.wake()

    def accepted(self, agent: Agent, stats: NodeStats) -> None:
        """An update of `agent` was taken: its measured speed, its name known, its figures counted."""
        if math.isfinite(stats.samples_per_second) and 0 < stats.samples_per_second <= MAX_THROUGHPUT:
            agent.throughput = stats.samples_per_second
        self.known.add(agent.name)
        self.metrics.accepted_update(agent.name, stats)

    def leave(self, agent: Agent) -> None:
        self.membership.remove(agent.agent_id)
        self.engine.forget(agent.agent_id)
        log.info("agent %s left", agent.name)
