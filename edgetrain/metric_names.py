"""Metric and label names shared by the agent, the coordinator, deploy/ dashboards and their tests.

Conventions: one prefix, base units in the name (_seconds, _bytes), ratios in 0..1 end in _ratio,
counters end in _total, bounded label sets (node = an agent's name; reason from REFUSAL_REASONS).
"""

from __future__ import annotations

import re

PREFIX = "edgetrain"

# ---- labels
NODE = "node"
REASON = "reason"
CORE = "core"
DTYPE = "dtype"  # an upload dtype: float32, float16, bfloat16, int8
METRIC = "metric"  # the run's --metric (accuracy, macro-f1, macro-recall, f1:<class>): one value per run

# ---- coordinator
ROUND = f"{PREFIX}_round"  # gauge: the last completed round
ROUND_DURATION = f"{PREFIX}_round_duration_seconds"  # histogram: open -> aggregated
GLOBAL_ACCURACY = f"{PREFIX}_global_accuracy_ratio"  # gauge: test accuracy of the global model
GLOBAL_LOSS = f"{PREFIX}_global_loss"  # gauge: test cross-entropy of the global model
GLOBAL_MACRO_F1 = f"{PREFIX}_global_macro_f1_ratio"  # gauge
GLOBAL_METRIC = f"{PREFIX}_global_metric_ratio"  # gauge{metric}: test value of the run's --metric (what decides it)
AGENTS_CONNECTED = f"{PREFIX}_agents_connected"  # gauge
TRAINING_SECONDS = f"{PREFIX}_training_elapsed_seconds"  # gauge: wall time since the first round opened
TRAINING_SHARE = f"{PREFIX}_training_share_ratio"  # gauge: agents' time in training steps / wall since round 1
STARTUP_SECONDS = f"{PREFIX}_startup_seconds"  # gauge: from the command (process start) to the first round
NODE_COMPUTE = f"{PREFIX}_node_compute_seconds"  # gauge{node}: last round's compute time
NODE_COMMUNICATION = f"{PREFIX}_node_communication_seconds"  # gauge{node}
NODE_COMPUTE_HIST = f"{PREFIX}_node_round_compute_seconds"  # histogram{node}: aggregates across nodes
NODE_THROUGHPUT = f"{PREFIX}_node_samples_per_second"  # gauge{node}
NODE_LOSS = f"{PREFIX}_node_loss"  # gauge{node}: local training loss
NODE_ACCURACY = f"{PREFIX}_node_accuracy_ratio"  # gauge{node}: local training accuracy
NODE_SAMPLES = f"{PREFIX}_node_samples_total"  # counter{node}: samples in accepted updates
UPDATES_ACCEPTED = f"{PREFIX}_updates_accepted_total"  # counter{node}
UPDATES_REFUSED = f"{PREFIX}_updates_refused_total"  # counter{node, reason}
NODE_RECEIVED_BYTES = f"{PREFIX}_node_received_bytes_total"  # counter{node}: bytes from the node
NODE_SENT_BYTES = f"{PREFIX}_node_sent_bytes_total"  # counter{node}: bytes to the node
# counter: GetRounds answered WAIT at once (with poll_again_ms) because Limits.held_polls or newcomer_polls long-polls
# were held; no node label, so agents that join only to poll add no series
POLLS_DEFERRED = f"{PREFIX}_polls_deferred_total"
LOCAL_STEPS = f"{PREFIX}_local_steps"  # gauge: K asked of the agents in the rounds handed out now (auto: adapt.py)
UPDATE_DTYPE = f"{PREFIX}_update_dtype"  # gauge{dtype}: 1 for the dtype uploads are asked for now, 0 for the others
ROUNDS_SHORT = f"{PREFIX}_rounds_closed_short_total"  # counter: rounds closed at the deadline without everyone

# ---- agent
AGENT_INFO = f"{PREFIX}_agent"  # info{node, cores, device, workers} -> edgetrain_agent_info
STEP_SECONDS = f"{PREFIX}_agent_step_seconds"  # histogram: one optimizer step
AGENT_SAMPLES = f"{PREFIX}_agent_samples_total"  # counter
CORE_CPU = f"{PREFIX}_agent_core_cpu_usage_ratio"  # gauge{core}: busy fraction of each pinned core
AGENT_MEMORY = f"{PREFIX}_agent_memory_bytes"  # gauge: RSS of the agent and its workers
AGENT_ROUNDS = f"{PREFIX}_agent_rounds_total"  # counter: rounds trained

# The `node` of refusals that come before the caller is known (no valid session yet): one value, not the
# caller's claim, so the label set stays bounded. Dashboards list it apart from the nodes.
UNKNOWN_NODE = "unknown"
_AGENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def agent_name_problem(name: str) -> str | None:
    """Why `name` cannot name an agent (it becomes the `node` label and goes into logs), or None if it can."""
    if not _AGENT_NAME.fullmatch(name):
        return "use 1-128 letters, digits, '_', '.', ':' or '-'"
    if name == UNKNOWN_NODE:
        return f"{UNKNOWN_NODE!r} is reserved (it counts refusals before the caller is known)"
    return None

_DEVICE = re.compile(r"cpu|cuda(:\d{1,4})?")


def device_problem(device: str) -> str | None:
    """Why `device` names no device an agent trains on (it becomes a label and goes into logs), or None."""
    return None if _DEVICE.fullmatch(device) else "use cpu or cuda:N"


# Why an update is refused: the `reason` label's whole value set.
REFUSAL_REASONS = (
    "unauthenticated",  # no or bad token / session
    "unknown_agent",  # agent id not registered
    "stale_round",  # update for a round that is not open
    "not_participant",  # agent joined after the round opened
    "duplicate",  # second update for the same (round, agent)
    "late",  # after the round's deadline
    "malformed",  # stream order, missing header, bad part
    "bad_tensor",  # wrong names, shapes, dtypes or byte counts
    "non_finite",  # NaN or Inf
    "bad_sample_count",  # <= 0 or more than the round asked for
    "too_large",  # message over the size limit
    "staging",  # the coordinator could not write or read back a streamed update (its staging directory)
    "too_many_calls",  # an agent's session had coordinator.admission.Limits.calls_per_agent calls open already
    "stream_timeout",  # an update stream sent no message within its deadline (first message, or between parts)
    "rate_limited",  # Joins from one peer address faster than Limits.joins_per_second
    "too_many_agents",  # Limits.max_agents agents admitted already
    "data_mismatch",  # a Join whose data_fingerprint is not the run's (RunSpec.data_fingerprint)
)
