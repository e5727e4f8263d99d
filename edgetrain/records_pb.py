"""The one mapping between edgetrain.records' types and their gRPC messages, for the gRPC edge only.

The agent's route (agent/route.py) and the coordinator's servicer (coordinator/servicer.py) call these; every
other module works with the records themselves (tests/unit/test_layers.py checks who imports this).
"""

from __future__ import annotations

from edgetrain.proto import edgetrain_pb2 as pb

from .records import Assignment, NodeStats


def work_header(a: Assignment, deadline_unix: float) -> pb.RoundHeader:
    """A WORK round header stating `a`; the transfer adds the same-host files where it uses them."""
    return pb.RoundHeader(status=pb.WORK, round=a.round, rank=a.rank, world=a.world, local_steps=a.local_steps,
                          sample_offset=a.sample_offset, deadline_unix=deadline_unix, batch_size=a.batch_size,
                          update_dtype=a.update_dtype, budget_seconds=a.budget_seconds,
                          budget_max_steps=a.max_steps)


def assignment_of(h: pb.RoundHeader) -> Assignment:
    """The assignment a WORK round header states."""
    return Assignment(round=h.round, rank=h.rank, world=h.world, local_steps=h.local_steps, batch_size=h.batch_size,
                      sample_offset=h.sample_offset, update_dtype=h.update_dtype, budget_seconds=h.budget_seconds,
                      max_steps=h.budget_max_steps)


def stats_message(s: NodeStats) -> pb.NodeStats:
    """The agent's own figures as they travel (`samples` goes as UpdateHeader.num_samples; `bytes` not at all)."""
    return pb.NodeStats(compute_seconds=s.compute_seconds, communication_seconds=s.communication_seconds,
                        loss=s.loss, accuracy=s.accuracy, samples_per_second=s.samples_per_second)


def stats_of(msg: pb.NodeStats, *, samples: int, received_bytes: float = 0.0) -> NodeStats:
    """An update's figures: the agent's `msg`, its header's `samples`, the tensor bytes the coordinator received."""
    return NodeStats(samples=samples, compute_seconds=msg.compute_seconds,
                     communication_seconds=msg.communication_seconds, loss=msg.loss, accuracy=msg.accuracy,
                     samples_per_second=msg.samples_per_second, bytes=received_bytes)
