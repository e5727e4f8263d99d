"""What a round hands an agent and what the agent reports back, as typed records both sides share.

`Assignment` is one agent's work in one round: the coordinator's round engine makes it, the round header carries
it, the agent's worker trains it (`agent.route.RoundTask` wraps it with the same-host files). `NodeStats` is one
node's figures for one round's update: the agent makes them, the coordinator's engine, metrics and round log
(coordinator/runlog.py) read them. Neither knows protobuf: `edgetrain.records_pb` converts them to and from the
gRPC messages, and only the gRPC edge calls it (agent/route.py, coordinator/servicer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

TIMED_MAX_STEPS = 2  # a timed round's most steps, in units of K: what its fastest participant may train


@dataclass(frozen=True)
class Assignment:
    """One agent's work in one round (pb.RoundHeader's WORK fields)."""

    round: int
    rank: int  # this agent's shard among `world`
    world: int
    local_steps: int  # K
    batch_size: int
    sample_offset: int  # where in its shard's epoch stream this round starts
    update_dtype: str = ""  # the dtype to upload the update in ("": the run's RunSpec.update_dtype)
    # A timed round (> 0): steps until about this many seconds have passed, at least one, at most `max_steps`
    # (pb.RoundHeader.budget_seconds; coordinator/rounds.py, `timed_budget`). 0: exactly `local_steps`.
    budget_seconds: float = 0.0
    max_steps: int = 0

    def steps_and_budget(self, can_stop_early: bool = True) -> tuple[int, float]:
        """The most steps to plan and the budget to stop at (0: none) for a trainer that can or cannot stop early.

        Never more than `TIMED_MAX_STEPS` x K, whatever the header says (the coordinator takes no more samples).
        """
        if self.budget_seconds > 0 and can_stop_early:
            most = min(self.max_steps, TIMED_MAX_STEPS * self.local_steps)
            return max(self.local_steps, most), self.budget_seconds
        return self.local_steps, 0.0


@dataclass(frozen=True)
class NodeStats:
    """One node's figures for one round's update; the round log keeps them under these names, in this order.

    `samples` travels as UpdateHeader.num_samples (the update's weight in the average, which the coordinator
    checks), the agent's own figures as pb.NodeStats, and `bytes` does not travel: the coordinator counts the
    update's tensor bytes as it receives them (0 on the agent's side).
    """

    samples: int = 0
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0  # the previous round's download + upload time, as the agent saw it
    loss: float = 0.0
    accuracy: float = 0.0  # on the batches it trained on
    samples_per_second: float = 0.0
    bytes: float = 0.0
