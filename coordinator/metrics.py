"""The coordinator's metrics (registered into an injected registry), including what agents report per node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgetrain import metric_names as m
from edgetrain.serde import UPDATE_DTYPES

if TYPE_CHECKING:
    from edgetrain.records import NodeStats

# Rounds and a node's compute in one take from a millisecond (tiny models, K=1) to minutes (big models on slow
# boards).
ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                 300.0, 600.0)


def _counter(name: str, doc: str, labels: list[str], registry: CollectorRegistry) -> Counter:
    # prometheus_client appends _total itself
    return Counter(name.removesuffix("_total"), doc, labels, registry=registry)


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        node = [m.NODE]
        self.round = Gauge(m.ROUND, "Rounds completed.", registry=registry)
        self.round_duration = Histogram(m.ROUND_DURATION, "Wall time of a round, open to aggregated.",
                                        buckets=ROUND_BUCKETS, registry=registry)
        self.accuracy = Gauge(m.GLOBAL_ACCURACY, "Test accuracy of the global model.", registry=registry)
        self.loss = Gauge(m.GLOBAL_LOSS, "Test cross-entropy of the global model.", registry=registry)
        self.macro_f1 = Gauge(m.GLOBAL_MACRO_F1, "Test macro-F1 of the global model.", registry=registry)
        self.metric = Gauge(m.GLOBAL_METRIC, "Test value of the global model's --metric, the figure that decides "
                            "the run (its name in the label).", [m.METRIC], registry=registry)
        self.agents = Gauge(m.AGENTS_CONNECTED, "Agents admitted and not gone.", registry=registry)
        self.elapsed = Gauge(m.TRAINING_SECONDS, "Seconds since the first round opened.", registry=registry)
        self.training_share = Gauge(m.TRAINING_SHARE, "Agents' time in training steps over the wall time since the "
                                    "first round opened (mean over the nodes).", registry=registry)
        self.startup = Gauge(m.STARTUP_SECONDS, "Seconds from the coordinator's start to its first round.",
                             registry=registry)
        self.compute = Gauge(m.NODE_COMPUTE, "Node's compute time in its last round.", node, registry=registry)
        self.communication = Gauge(m.NODE_COMMUNICATION, "Node's download+upload time, as it measured it.", node,
                                   registry=registry)
        self.compute_hist = Histogram(m.NODE_COMPUTE_HIST, "Node compute time per round.", node,
                                      buckets=ROUND_BUCKETS, registry=registry)
        self.throughput = Gauge(m.NODE_THROUGHPUT, "Node's training samples per second.", node, registry=registry)
        self.node_loss = Gauge(m.NODE_LOSS, "Node's local training loss.", node, registry=registry)
        self.node_accuracy = Gauge(m.NODE_ACCURACY, "Node's local training accuracy.", node, registry=registry)
        self.node_samples = _counter(m.NODE_SAMPLES, "Samples in a node's accepted updates.", node, registry)
        self.accepted = _counter(m.UPDATES_ACCEPTED, "Updates accepted.", node, registry)
        self.refused = _counter(m.UPDATES_REFUSED, "Updates and requests refused, by reason.", [m.NODE, m.REASON],
                                registry)
        self.bytes_in = _counter(m.NODE_RECEIVED_BYTES, "Tensor bytes of a node's accepted updates.", node, registry)
        self.bytes_out = _counter(m.NODE_SENT_BYTES, "Tensor bytes of the weights handed to a node.", node, registry)
        self.polls_deferred = _counter(m.POLLS_DEFERRED, "GetRounds answered WAIT at once: the long-polls an agent "
                                       "like it may hold were all held.", [], registry)
        self.rounds_short = _counter(m.ROUNDS_SHORT, "Rounds closed at the deadline without every update.", [],
                                     registry)
        self.local_steps = Gauge(m.LOCAL_STEPS, "K: local steps asked of the agents in the rounds handed out now.",
                                 registry=registry)
        self.update_dtype = Gauge(m.UPDATE_DTYPE, "1 for the dtype the agents are asked to upload in now, 0 for the "
                                  "others.", [m.DTYPE], registry=registry)
        self._zeroed: set[str] = set()  # nodes whose counters exist from zero (`_zero`)

    def adapted(self, local_steps: int, update_dtype: str) -> None:
        """The K and upload dtype the rounds ask for from now on (coordinator/adapt.py when auto)."""
        self.local_steps.set(local_steps)
        for dtype in UPDATE_DTYPES:
            self.update_dtype.labels(dtype).set(1.0 if dtype == update_dtype else 0.0)

    def accepted_update(self, node: str, stats: NodeStats) -> None:
        """An update taken: its samples and received bytes counted, its figures the node's latest."""
        if node not in self._zeroed:
            self._zero(node)
        self.accepted.labels(node).inc()
        self.node_samples.labels(node).inc(stats.samples)
        self.bytes_in.labels(node).inc(stats.bytes)
        self.compute.labels(node).set(stats.compute_seconds)
        self.compute_hist.labels(node).observe(stats.compute_seconds)
        self.communication.labels(node).set(stats.communication_seconds)
        self.throughput.labels(node).set(stats.samples_per_second)
        self.node_loss.labels(node).set(stats.loss)
        self.node_accuracy.labels(node).set(stats.accuracy)

    def node_left(self, node: str) -> None:
        """A node left or was evicted: drop every series labelled with it.

        Its last-value gauges would go on claiming its last round (a sum of throughputs would count it forever),
        and agents that come and go under new names would grow /metrics without bound. Rates over its counters
        end with it; sums over nodes then count the nodes that are in (docs/monitoring.md).
        """
        for metric in (self.compute, self.communication, self.throughput, self.node_loss, self.node_accuracy,
                       self.compute_hist, self.node_samples, self.accepted, self.bytes_in, self.bytes_out):
            try:
                metric.remove(node)
            except KeyError:  # it never sent an update, or never got weights
                pass
        for reason in m.REFUSAL_REASONS:
            try:
                self.refused.remove(node, reason)
            except KeyError:
                pass
        self._zeroed.discard(node)

    def _zero(self, node: str) -> None:
        """Create a node's counters at zero once its first update is taken.

        So rates and "refused by reason" panels have data from its start. Not at its Join: agents that join and
        never train (a flood of them) would add ~20 series each until evicted (they keep only the bytes they were
        sent, if they fetched, and what they were refused), and a scrape of a flood's tens of
        thousands of series took a quarter of the coordinator's CPU (docs/security.md).
        """
        self._zeroed.add(node)
        self.accepted.labels(node)
        for reason in m.REFUSAL_REASONS:
            self.refused.labels(node, reason)

    def refused_update(self, node: str, reason: str) -> None:
        if reason not in m.REFUSAL_REASONS:  # keep the label set bounded
            reason = "malformed"
        self.refused.labels(node, reason).inc()
