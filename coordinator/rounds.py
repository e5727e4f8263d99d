"""The synchronous round state machine: open a round, take updates, close it into a new global model.

Plain threaded Python with no gRPC: the servicer calls `get_work`, `precheck` and `submit`; the driver
calls `open_round`, `wait_for_updates` and `close_round`. The global model is replaced, never mutated,
so a snapshot handed to a sender stays valid while the next round is formed, and no refused update can
ever touch it.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from edgetrain import aggregation, serde
from edgetrain.errors import EdgetrainError
from edgetrain.memory import Recycler
from edgetrain.metric_names import REFUSAL_REASONS
from edgetrain.records import TIMED_MAX_STEPS, Assignment, NodeStats

from .admission import Limits

State = dict[str, torch.Tensor]


class RefusedError(EdgetrainError):
    """An update or request the coordinator will not take. `reason` labels the metric, `status` names the gRPC code."""

    reason = "malformed"
    status = "INVALID_ARGUMENT"

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Each refusal's reason is one of the metric's labels (a bounded label set, pre-created per node)."""
        super().__init_subclass__(**kwargs)
        if cls.reason not in REFUSAL_REASONS:
            raise TypeError(f"{cls.__name__}: reason {cls.reason!r} is not in edgetrain.metric_names.REFUSAL_REASONS")


class StaleRoundError(RefusedError):
    reason, status = "stale_round", "FAILED_PRECONDITION"


class NotParticipantError(RefusedError):
    reason, status = "not_participant", "FAILED_PRECONDITION"


class DuplicateUpdateError(RefusedError):
    reason, status = "duplicate", "ALREADY_EXISTS"


class LateUpdateError(RefusedError):
    reason, status = "late", "DEADLINE_EXCEEDED"


class BadSampleCountError(RefusedError):
    reason, status = "bad_sample_count", "INVALID_ARGUMENT"


class MalformedError(RefusedError):
    reason, status = "malformed", "INVALID_ARGUMENT"


class BadTensorError(RefusedError):
    reason, status = "bad_tensor", "INVALID_ARGUMENT"


class NonFiniteError(RefusedError):
    reason, status = "non_finite", "INVALID_ARGUMENT"


class UnknownAgentError(RefusedError):
    reason, status = "unknown_agent", "NOT_FOUND"


class UnauthenticatedError(RefusedError):
    reason, status = "unauthenticated", "UNAUTHENTICATED"


class TooLargeError(RefusedError):
    reason, status = "too_large", "RESOURCE_EXHAUSTED"


class TooManyCallsError(RefusedError):
    reason, status = "too_many_calls", "RESOURCE_EXHAUSTED"


class StreamTimeoutError(RefusedError):
    reason, status = "stream_timeout", "DEADLINE_EXCEEDED"


class RateLimitedError(RefusedError):
    reason, status = "rate_limited", "RESOURCE_EXHAUSTED"


class TooManyAgentsError(RefusedError):
    reason, status = "too_many_agents", "RESOURCE_EXHAUSTED"


class DataMismatchError(RefusedError):
    """A Join that names data other than the run's: the agent would train on other tensors than everyone else."""

    reason, status = "data_mismatch", "FAILED_PRECONDITION"


class StagingError(RefusedError):
    """The coordinator could not write or read back a streamed update (its staging directory: full, failing)."""

    reason, status = "staging", "UNAVAILABLE"


@dataclass(frozen=True)
class Work:
    """What get_work hands an agent: status WORK with weights, WAIT, FINISHED, or FAILED (with `detail`)."""

    status: str
    round: int = -1
    assignment: Assignment | None = None
    state: Mapping[str, torch.Tensor] | None = None
    deadline: float = 0.0
    detail: str = ""


@dataclass
class Contribution:
    """An accepted update's bookkeeping (its tensors are already in the accumulator)."""

    agent_id: str
    stats: NodeStats  # its `samples`: the update's weight, as the engine took it
    received_at: float

    @property
    def samples(self) -> int:
        return self.stats.samples


@dataclass
class Outcome:
    """A closed round."""

    round: int
    applied: bool  # False: too few updates, the global model is unchanged and the round is run again
    contributions: dict[str, Contribution]
    missing: list[str]  # participants that sent nothing in time
    opened_at: float
    closed_at: float
    assignments: dict[str, Assignment] = field(default_factory=dict)
    overflow: bool = False  # not applied because the aggregate overflowed (finite updates, infinite sum)
    spoiled: bool = False  # not applied because reading an update back failed while it was being added

    @property
    def samples(self) -> int:
        return sum(c.samples for c in self.contributions.values())


def balanced_steps(throughputs: list[float], local_steps: int) -> list[int]:
    """Split `local_steps * len(throughputs)` steps in proportion to each node's samples/s (at least 1 each).

    Unknown throughputs (0) count as the mean of the known ones; all unknown gives equal work.
    """
    known = [t for t in throughputs if math.isfinite(t) and t > 0]
    if not known:
        return [local_steps] * len(throughputs)
    peak = max(known)  # work in fractions of the fastest: no overflow whatever agents claim
    mean = sum(t / peak for t in known) / len(known)
    speeds = [t / peak if math.isfinite(t) and t > 0 else mean for t in throughputs]
    total = local_steps * len(speeds)
    return [max(1, round(total * (s / sum(speeds)))) for s in speeds]


SPEED_WINDOW = 5  # a participant's speed in timed rounds: the median of its last updates' seconds per sample


def timed_budget(k_step_seconds: list[float]) -> float:
    """A timed round's budget: the median participant's seconds for K steps, as its recent updates measured them.

    Every participant then trains for about that long: one slower than the median trains fewer steps, a faster one
    more (up to `TIMED_MAX_STEPS` x K), and the round's updates all arrive about together instead of the faster
    ones waiting for the slowest. Measured on README command 1 (2 local agents on 2 cores), that wait was 4-9% of
    the run, and a round's slower agent changed from round to round (noise, not one slow node), so only stopping
    on time removes it. The median: one participant that misstates its speed moves the budget less than a mean
    would (with two, to no less than half of the other's K steps). 0 (steps, not time) with no one measured.
    """
    times = [t for t in k_step_seconds if math.isfinite(t) and t > 0]
    return statistics.median(times) if times else 0.0


def quorum_of(k: int, participants: int) -> int:
    """Updates a round must hold before it gives up on slow participants (`--quorum` k of n, at most n, at least 1).

    Past its measured deadline a participant is waived only once the round holds this many updates; until then
    the round waits for everyone who fetched, up to `--round-timeout`, the hard bound (ghosts that never fetched
    are given up on regardless: they cannot count towards it).
    """
    return max(1, min(k, participants))


class RoundEngine:
    """Thread-safe synchronous rounds over a replaceable global model."""

    def __init__(
        self,
        global_state: State,
        *,
        batch_size: int,
        local_steps: int,
        round_timeout: float,
        aggregator: str = aggregation.MEAN,
        trim: float = 0.2,
        balance: bool = False,
        timed: bool = False,
        completed_rounds: int = 0,
        cursors: dict[str, int] | None = None,
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
        quorum: int = 1,
    ) -> None:
        if aggregator not in aggregation.AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}")
        self._cv = threading.Condition()
        self._global: State = dict(global_state)
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.update_dtype = ""  # the uploads' dtype asked for in each assignment ("": the run's; coordinator/adapt.py)
        self.round_timeout = round_timeout
        self.aggregator = aggregator
        self.trim = trim
        self.balance = balance
        self.timed = timed and not balance  # rounds of K >= 2 are timed (`timed_budget`); --balance sizes them by speed
        self.completed_rounds = completed_rounds  # also the number of the next round to run
        self.cursors: dict[str, int] = dict(cursors or {})  # "world/rank" -> samples consumed
        self._clock = clock
        self.limits = limits or Limits()
        self.quorum = quorum  # see `quorum_of`
        self._open = False
        self._finished = False
        self._failure = ""  # why the run stopped, when it failed: agents hear FAILED with it instead of FINISHED
        self._assignments: dict[str, Assignment] = {}
        self._max_samples: dict[str, int] = {}  # local_steps * batch_size * workers: more than this is a lie
        self._expected: set[str] = set()
        self._received: dict[str, Contribution] = {}
        self._recycler = Recycler()  # the sums' memory, used again once older global models are dropped
        self._acc = self._new_mean()
        self._kept: list[tuple[Mapping[str, torch.Tensor], int]] = []  # robust aggregators only
        self._deadline = 0.0
        self._opened_at = 0.0
        # A round closed short is run again under the same number: each opening gets a serial, and an agent
        # that was handed an earlier opening of that number is handed the re-run (its after_round equals it).
        self._opening = 0
        self._handed: dict[str, int] = {}  # agent_id -> opening it was last handed work in
        # Participants that sent nothing before a round closed: their update for it, if it comes, is "late"
        # (until they are handed new work), not just "stale".
        self._missed: dict[str, int] = {}  # agent_id -> round it missed
        self.told_finished: set[str] = set()  # agents that heard FINISHED (the driver waits a little for the rest)
        # Who the open round still waits for (see `_waived`): when each participant fetched its weights, and each
        # agent's measured round time per local step (fetch to update, its link included), kept across rounds.
        self._fetched_at: dict[str, float] = {}
        self._per_step: dict[str, float] = {}
        self._per_sample: dict[str, deque[float]] = {}  # the agents' own compute seconds per sample (timed rounds)
        self._late_fetch: dict[str, tuple[float, int]] = {}  # missed rounds' fetches: (fetched at, its steps)
        self._contributed: set[str] = set()  # agents an update (on time or late) ever measured: not newcomers
        self._min_updates = 1  # the open round's: see open_round
        self._measured: dict[str, float] = {}  # the open round's participants measured when it opened
        self.on_close: list[Callable[[int], None]] = []  # called with a round's number once it closed

    # ---- read side
    @property
    def global_state(self) -> State:
        with self._cv:
            return self._global

    @property
    def current_round(self) -> int:
        return self.completed_rounds

    def seconds_left(self) -> float:
        """Seconds until the open round's deadline (0 when none is open or it has passed)."""
        with self._cv:
            return max(0.0, self._deadline - self._clock()) if self._open else 0.0

    @property
    def finished(self) -> bool:
        return self._finished

    # ---- driver side
    def open_round(self, agents: list[tuple[str, float, int]], min_updates: int = 1) -> dict[str, Assignment]:
        """Open round `completed_rounds` for (agent_id, throughput, workers) in rank order.

        `min_updates`: what the round needs to be applied (the driver's `close_round`): until it has that many,
        unmeasured participants are waited for as long as the slowest measured one would be (`_waived`), since a
        round short of them runs again anyway.
        """
        if not agents:
            raise ValueError("cannot open a round without agents")
        world = len(agents)
        if self.balance:
            steps = balanced_steps([tp for _, tp, _ in agents], self.local_steps)
        else:
            steps = [self.local_steps] * world
        with self._cv:
            budget = self._budget(agents)
            self._assignments, self._max_samples = {}, {}
            for rank, ((agent_id, _, workers), k) in enumerate(zip(agents, steps, strict=True)):
                most = TIMED_MAX_STEPS * k if budget else k
                self._assignments[agent_id] = Assignment(
                    round=self.completed_rounds,
                    rank=rank,
                    world=world,
                    local_steps=k,
                    batch_size=self.batch_size,
                    sample_offset=self.cursors.get(f"{world}/{rank}", 0),
                    update_dtype=self.update_dtype,
                    budget_seconds=budget,
                    max_steps=most if budget else 0,
                )
                self._max_samples[agent_id] = most * self.batch_size * max(1, workers)
            self._expected = set(self._assignments)
            self._fetched_at = {}
            # measured before the round opened: an update taken in this round measures its agent for the next
            self._measured = {a: self._per_step[a] for a in self._expected if a in self._per_step}
            self._received = {}
            self._acc = self._new_mean()
            self._kept = []
            self._min_updates = max(1, min_updates)
            self._opened_at = self._clock()
            self._deadline = self._opened_at + self.round_timeout
            self._opening += 1
            self._open = True
            self._cv.notify_all()
            return dict(self._assignments)

    def _budget(self, agents: list[tuple[str, float, int]]) -> float:
        """The seconds a round for `agents` is timed to (0: K steps each); see `timed_budget`. Under the lock."""
        if not self.timed or self.local_steps < 2:
            return 0.0
        k_batch = self.local_steps * self.batch_size
        return timed_budget([k_batch * max(1, workers) * statistics.median(self._per_sample[agent_id])
                             for agent_id, _, workers in agents if self._per_sample.get(agent_id)])

    def vouch(self, agent_id: str) -> None:
        """No newcomer: an agent restarted under a name whose updates were taken before (admission.KnownNames)."""
        with self._cv:
            self._contributed.add(agent_id)

    def forget(self, agent_id: str) -> None:
        """Stop waiting for an agent that left or was replaced (its sent update, if any, stays)."""
        with self._cv:
            self._expected.discard(agent_id)
            self._handed.pop(agent_id, None)
            self._missed.pop(agent_id, None)
            self._per_step.pop(agent_id, None)
            self._per_sample.pop(agent_id, None)
            self._late_fetch.pop(agent_id, None)
            self._contributed.discard(agent_id)
            self._cv.notify_all()

    def wait_for_updates(self, stop: threading.Event | None = None) -> bool:
        """Block until every participant the round still waits for has sent, or the deadline passes.

        True if every participant sent. The round stops waiting for some by itself (`_waived`): ghosts that never
        fetch, measured agents far past their usual time, and unmeasured ones once the measured are in.
        """
        with self._cv:
            while True:
                now = self._clock()
                waived, wake = self._waived(now)
                pending = self._expected - set(self._received) - waived
                if not pending:
                    return not (self._expected - set(self._received))
                if self._acc.spoiled:  # the round runs again whatever comes now
                    return False
                remaining = self._deadline - now
                if remaining <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._cv.wait(timeout=max(0.001, min(remaining, 0.5, wake - now)))

    def _waived(self, now: float) -> tuple[set[str], float]:
        """Participants the open round no longer waits for at `now`, and when that set next changes.

        - Not fetched `fetch_grace_seconds` after the round opened: a ghost (an agent that polls fetches at once).
        - Measured (an earlier update gave its time per step): past max(min_wait, slack x that time x its steps).
        - Unmeasured, once every measured participant is in or waived: one that missed its last round (an update
          measured it before) after a grace of `probation_grace_ratio` of the round so far, at least
          `min_grace_seconds`; a newcomer (no update ever measured it, fetched or not) after
          `newcomer_grace_ratio` of it, no floor: its first round is a trial, so agents that join, fetch and never
          send (ghosts) cost the rounds nothing. While the round has fewer than `min_updates` (it would close short
          and run again), either kind is waited for as long as the slowest measured participant would be, from its
          fetch. With no measured participant (a run's first round) the round waits for them until its deadline,
          as it always did.
        Their updates are still taken while the round is open; their first one, even late, measures them.
        Until the round has one update, only ghosts are given up on: a round closed empty would run again, and an
        honest agent slowed past its allowance (a loaded machine) would miss it and every re-run. `--quorum` k
        raises that one to k (`quorum_of`).
        """
        lim = self.limits
        waived: set[str] = set()
        wake = float("inf")
        measured_done = self._opened_at
        unmeasured = []
        measured_pending = False
        need = quorum_of(self.quorum, len(self._fetched_at.keys() & self._expected))  # ghosts never count
        has_measured = bool(self._measured)
        for agent_id in self._expected - set(self._received):
            fetched = self._fetched_at.get(agent_id)
            if fetched is None:
                end = self._opened_at + lim.fetch_grace_seconds
                if has_measured and agent_id not in self._contributed:
                    unmeasured.append(agent_id)  # a newcomer that has not even fetched: let go with the others
            elif len(self._received) < need:  # an empty round helps nobody: who fetched is waited for until k are in
                continue
            elif agent_id in self._measured:
                a = self._assignments[agent_id]
                # a timed round lasts its budget whatever the agent took last time (the budget may have grown)
                end = fetched + max(lim.min_wait_seconds, lim.slack * self._measured[agent_id] * a.local_steps,
                                    lim.slack * a.budget_seconds)
            else:
                unmeasured.append(agent_id)
                continue
            if now >= end:
                waived.add(agent_id)
                measured_done = max(measured_done, end)
            else:
                wake = min(wake, end)
                measured_pending = measured_pending or fetched is not None
        for agent_id in self._received:
            if agent_id in self._measured:
                measured_done = max(measured_done, self._received[agent_id].received_at)
        if unmeasured and has_measured and not measured_pending and len(self._received) >= need:
            so_far = measured_done - self._opened_at
            short = len(self._received) < self._min_updates  # the round is applied only with some of them
            slowest = max(self._measured.values())
            for agent_id in unmeasured:
                if short:  # as long as the slowest measured agent would be waited for, from its own fetch
                    start = self._fetched_at.get(agent_id, self._opened_at)
                    a = self._assignments[agent_id]
                    end = start + max(lim.min_wait_seconds, lim.slack * slowest * a.local_steps,
                                      lim.slack * a.budget_seconds)
                elif agent_id in self._contributed:
                    end = measured_done + max(lim.min_grace_seconds, lim.probation_grace_ratio * so_far)
                else:
                    end = measured_done + lim.newcomer_grace_ratio * so_far
                if now >= end:
                    waived.add(agent_id)
                else:
                    wake = min(wake, end)
        return waived, wake

    def close_round(self, min_updates: int = 1) -> Outcome:
        """Close the open round: aggregate if at least `min_updates` arrived, else keep the model."""
        with self._cv:
            if not self._open:
                raise RuntimeError("no round is open")
            self._open = False
            contributions = dict(self._received)
            missing = sorted(set(self._assignments) - set(contributions))
            spoiled = self._acc.spoiled  # only the mean reads staged updates while it adds them
            if not spoiled:  # a spoiled round closes early and runs again at once: updates on their way count there
                self._missed.update(dict.fromkeys(missing, self.completed_rounds))
            applied = len(contributions) >= max(1, min_updates) and not spoiled
            overflow = False
            if applied:
                if not aggregation.keeps_updates(self.aggregator):
                    new_state = self._acc.result(self._global)
                else:
                    new_state = aggregation.aggregate(
                        self.aggregator, [s for s, _ in self._kept], [w for _, w in self._kept], self.trim
                    )
                # Finite updates can still sum past float32's range (huge values times sample counts):
                # such a round is not applied, so the global model is finite whatever agents send.
                overflow = not serde.finite(new_state)
                applied = not overflow
            if applied:
                self._global = new_state
                for agent_id, c in contributions.items():
                    a = self._assignments[agent_id]
                    key = f"{a.world}/{a.rank}"
                    self.cursors[key] = self.cursors.get(key, a.sample_offset) + c.samples
                self.completed_rounds += 1
            outcome = Outcome(
                round=self.completed_rounds - 1 if applied else self.completed_rounds,
                applied=applied,
                contributions=contributions,
                missing=missing,
                opened_at=self._opened_at,
                closed_at=self._clock(),
                assignments=dict(self._assignments),
                overflow=overflow,
                spoiled=spoiled,
            )
            self._acc = self._new_mean()  # drop the accumulator's memory now
            self._kept = []
            for agent_id in missing:  # measured again by its next update: until then it is on probation
                self._per_step.pop(agent_id, None)
            # Kept until the late update comes (it may come rounds later: a slow newcomer let go at once sits out
            # the next round, which may close first), the agent is handed work again, or its hard deadline passed.
            now = self._clock()
            self._late_fetch = {a: v for a, v in self._late_fetch.items() if now - v[0] < self.round_timeout}
            self._late_fetch.update({a: (self._fetched_at[a], self._assignments[a].local_steps)
                                     for a in missing if a in self._fetched_at})
            self._cv.notify_all()
        for listener in self.on_close:
            listener(outcome.round)
        return outcome

    def finish(self, failure: str = "") -> None:
        """Tell every waiting agent that training is over: FINISHED, or FAILED with `failure` when it is given."""
        with self._cv:
            self._failure = self._failure or failure
            self._finished = True
            self._open = False
            self._cv.notify_all()

    # ---- agent side
    def get_work(self, agent_id: str, after_round: int, timeout: float,
                 gone: Callable[[], bool] | None = None) -> Work:
        """Long-poll: WORK once a round after `after_round` is open for this agent; WAIT on timeout.

        `gone()` true: the caller went away (WAIT at once; work handed to nobody would look fetched).
        """
        end = time.monotonic() + max(0.0, timeout)
        with self._cv:
            while True:
                if gone is not None and gone():
                    return Work("WAIT", round=self.completed_rounds)
                if self._finished:
                    self.told_finished.add(agent_id)
                    return Work("FAILED", detail=self._failure) if self._failure else Work("FINISHED")
                if (
                    self._open
                    and not self._acc.spoiled  # about to close and run again
                    and (after_round < self.completed_rounds or self._rerun_for(agent_id))
                    and agent_id in self._assignments
                    and agent_id not in self._received
                ):
                    self._handed[agent_id] = self._opening
                    self._fetched_at[agent_id] = self._clock()
                    self._missed.pop(agent_id, None)
                    self._late_fetch.pop(agent_id, None)  # its late update, if it still comes, is of no use now
                    return Work(
                        "WORK",
                        round=self.completed_rounds,
                        assignment=self._assignments[agent_id],
                        state=self._global,
                        deadline=self._deadline,
                    )
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return Work("WAIT", round=self.completed_rounds)
                self._cv.wait(timeout=remaining)

    def measured(self, agent_id: str) -> bool:
        """Whether an earlier update measured the agent's round time (see `_waived`)."""
        with self._cv:
            return agent_id in self._per_step

    def measured_any(self) -> bool:
        """Whether any agent's round time has been measured yet (none before a run's, or a resume's, first update)."""
        with self._cv:
            return bool(self._per_step)

    def busy(self) -> set[str]:
        """Agents that may be training now: never evicted as idle.

        Participants of the open round whose update is not in yet, and those that fetched the last round and
        missed it, until its hard deadline would have passed (a slow one is still at work, and its late update
        is what measures it).
        """
        with self._cv:
            busy = (self._expected - set(self._received)) if self._open else set()
            now = self._clock()
            return busy | {a for a, (at, _) in self._late_fetch.items() if now - at < self.round_timeout}

    def wake(self) -> None:
        """Wake every long-poll to look again (one of them may have lost its caller)."""
        with self._cv:
            self._cv.notify_all()

    def _new_mean(self) -> aggregation.RunningWeightedMean:
        return aggregation.RunningWeightedMean(self._recycler.empty)

    def _rerun_for(self, agent_id: str) -> bool:
        """The open round re-runs one this agent was handed before (it closed short and was not applied)."""
        return self._handed.get(agent_id, self._opening) < self._opening

    def precheck(self, agent_id: str, round_: int, num_samples: int) -> Assignment:
        """Refuse early (before any tensor is read) what `submit` would refuse anyway."""
        with self._cv:
            try:
                return self._check(agent_id, round_, num_samples)
            except LateUpdateError:
                self._measure_late(agent_id)
                raise

    def awaiting(self, agent_id: str) -> None:
        """Refuse an update stream before its first message when nothing from this agent could be taken now.

        A stream that waits for its header holds a server thread: only a participant whose update the open round
        still lacks may hold one.
        """
        with self._cv:
            if self._owes(agent_id):
                return
            if agent_id in self._missed:
                self._measure_late(agent_id)
                missed = self._missed[agent_id]
                raise LateUpdateError(f"round {missed} closed at its deadline before this update arrived")
            if not self._open:
                raise StaleRoundError("no round is open")
            if agent_id in self._received:
                raise DuplicateUpdateError(f"an update for round {self.completed_rounds} from this agent was "
                                           "already taken")
            raise NotParticipantError(f"agent takes part from the next round, not round {self.completed_rounds}")

    def owes(self, agent_id: str) -> bool:
        """Whether the open round still lacks this participant's update."""
        with self._cv:
            return self._owes(agent_id)

    def _owes(self, agent_id: str) -> bool:
        return self._open and agent_id in self._assignments and agent_id not in self._received

    def _measure_late(self, agent_id: str) -> None:
        """A late update still tells how long its agent takes: rounds wait for it from then on (not past slack)."""
        fetched = self._late_fetch.pop(agent_id, None)
        if fetched is not None:
            at, steps = fetched
            self._per_step[agent_id] = max(self._clock() - at, 1e-6) / max(1, steps)
            self._contributed.add(agent_id)

    def _check(self, agent_id: str, round_: int, num_samples: int) -> Assignment:
        if not self._open or round_ != self.completed_rounds:
            if self._missed.get(agent_id) == round_:
                raise LateUpdateError(f"round {round_} closed at its deadline before this update arrived")
            raise StaleRoundError(f"round {round_} is not open (open: {self._open_round_text()})")
        assignment = self._assignments.get(agent_id)
        if assignment is None and self._missed.get(agent_id) == round_:
            raise LateUpdateError(f"round {round_} closed at its deadline before this update arrived (re-run now)")
        if assignment is None:
            raise NotParticipantError(f"agent takes part from the next round, not round {round_}")
        if agent_id in self._received:
            raise DuplicateUpdateError(f"an update for round {round_} from this agent was already taken")
        if self._clock() > self._deadline:
            raise LateUpdateError(f"round {round_} closed for updates at its deadline")
        most = self._max_samples[agent_id]
        if not 0 < num_samples <= most:
            raise BadSampleCountError(f"sample count {num_samples} outside 1..{most} for this round")
        return assignment

    def _open_round_text(self) -> str:
        return str(self.completed_rounds) if self._open else "none"

    def submit(
        self, agent_id: str, round_: int, num_samples: int,
        tensors: Mapping[str, torch.Tensor | serde.Sliced],
        stats: NodeStats | None = None, *, checked_finite: bool = False,
    ) -> None:
        """Take a decoded, validated update into the round's aggregate (all checks repeated under the lock).

        `stats`: the update's figures, kept with its checked `num_samples` as their `samples`. `checked_finite`:
        the caller's decoder already refused NaN and Inf in exactly these tensors (~0.5 ms per update not spent
        twice). Staged tensors (read a slice at a time: transfer/staging.py) only for the mean.
        """
        try:
            if not checked_finite and not serde.finite(tensors):  # e.g. a delta that overflows as weights
                raise NonFiniteError("the update has NaN or Inf values (or overflows float32 as weights)")
        except OSError as err:  # a staged update's file: nothing of it was added
            raise StagingError(f"the update could not be read back ({err})") from err
        with self._cv:
            self._check(agent_id, round_, num_samples)
            if not aggregation.keeps_updates(self.aggregator):
                if self._acc.spoiled:
                    raise StagingError(f"round {round_} runs again: an update failed while it was being added")
                try:
                    self._acc.add(tensors, num_samples)
                except OSError as err:  # read back from its staging file: part of it is in the sum now
                    self._cv.notify_all()  # the driver closes the round early and runs it again
                    raise StagingError(f"the update could not be read back ({err}): round {round_} runs again"
                                       ) from err
            else:
                whole = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
                if len(whole) != len(tensors):
                    raise TypeError(f"the {self.aggregator} aggregator keeps whole tensors, not staged ones")
                self._kept.append((whole, num_samples))
            now = self._clock()
            self._received[agent_id] = Contribution(agent_id, replace(stats or NodeStats(), samples=num_samples), now)
            if stats is not None and math.isfinite(stats.compute_seconds) and stats.compute_seconds > 0:
                window = self._per_sample.setdefault(agent_id, deque(maxlen=SPEED_WINDOW))
                window.append(stats.compute_seconds / num_samples)
            fetched = self._fetched_at.get(agent_id)
            if fetched is not None:
                steps = max(1, self._assignments[agent_id].local_steps)
                seconds = max(now - fetched, 1e-6) / steps
                old = self._per_step.get(agent_id)
                self._per_step[agent_id] = seconds if old is None else 0.5 * (old + seconds)
                self._contributed.add(agent_id)
            self._cv.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint needs besides the weights."""
        with self._cv:
            return {"completed_rounds": self.completed_rounds, "cursors": dict(self.cursors)}
