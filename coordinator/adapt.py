"""`--local-steps auto` and `--update-dtype auto`: K and the uploads' dtype from what the agents' links cost.

A round costs each agent K steps of compute plus one trip of the weights down and its update up. On loopback the
trip is a few milliseconds and the recipe's K (edgetrain.recipes) is the right one; over 100 Mbit/s it is ~0.8 s
for the MNIST CNN, as long as 8 of its steps, and the agents idle half the time. The rule:

- **Who**: agents that joined from another address. One on this host (a loopback peer) has no link to adapt to,
  and what its uploads wait for (the upload slots, the aggregation) is no link either.

- **Measured**, from each update's own figures (edgetrain.records.NodeStats): a node's time per local step
  (`compute_seconds / K`) and its link time per round (`communication_seconds`: the round's download plus its
  previous upload), scaled to what a float32 upload would have taken (the download is always float32, the upload
  is as many bytes as the node sent). The median of its last `WINDOW` updates, leaving out each node's first (its
  workers' warm-up).
- **Budget**: a round's link time may be `LINK_SHARE` (10 %) of its compute, or `MATERIAL_SECONDS` (50 ms),
  whichever is larger: below that the link costs less than a round's other overheads and nothing changes.
  A LAN whose round trip stays under both keeps the recipe too.
- **Encoding first**: with the recipe's K, the first of float32, float16 and int8 whose round trip fits the
  budget. Compression only approximates each update, and error feedback sends what it dropped in later rounds;
  a larger K changes the optimisation itself. An upload in float16 is half the bytes, in int8 a quarter; the
  download stays float32.
- **Then K**: if even int8 does not fit, K doubles from the recipe's until it does, up to `MAX_K_FACTOR` (8) times
  the recipe's (and at most the driver's `k_max`: a shard's batches per epoch), and short enough that a round
  stays within half `--round-timeout`. At 8x (K 64) the MNIST CNN lost 0.09 points at 60,000 samples
  (docs/performance.md, "Rounds that adapt to the link").
- **One choice for the run**, from the node that needs the most (rounds are synchronous: everyone waits for it).
- **When**: as soon as a node has `MIN_SAMPLES` measured updates, then every `EVERY` rounds again, from the nodes
  measured in the last `EVERY` rounds, so a link that gets slower or faster is followed; a choice that did not
  change says nothing. A resumed run starts from the recipe again and decides anew.

A K or dtype the user gave is kept; the other may still be auto. Pure code: the driver (coordinator/run.py) feeds
it the rounds' contributions and sets what it returns on the round engine.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from edgetrain.records import NodeStats
from edgetrain.serde import UPDATE_DTYPES

LINK_SHARE = 0.1
MATERIAL_SECONDS = 0.05
MAX_K_FACTOR = 8
WINDOW = 5
MIN_SAMPLES = 2
EVERY = 10
ENCODINGS = ("float32", "float16", "int8")  # least lossy first: the order the rule tries them in
_RATIO = {name: t.itemsize / 4 for name, t in UPDATE_DTYPES.items()}  # upload bytes per float32 byte


@dataclass(frozen=True)
class Need:
    """What one node's link and compute call for."""

    local_steps: int
    update_dtype: str
    step_seconds: float
    link_seconds: float  # a round trip's time with float32 uploads


def link_seconds_as(link32: float, dtype: str) -> float:
    """A round trip's time with `dtype` uploads, from its time with float32 ones (download float32 both ways)."""
    return link32 * (1.0 + _RATIO[dtype]) / 2.0


def need(step_seconds: float, link32: float, k_floor: int, *, k_auto: bool = True, dtype_auto: bool = True,
         dtype: str = "float32", k_max: int | None = None, max_round_seconds: float = math.inf) -> Need:
    """The K and upload dtype one node needs: the module's rule, for a step time and a float32 round trip.

    K stays at most `k_max` (default: `MAX_K_FACTOR` x `k_floor`) and keeps the node's round within
    `max_round_seconds` (half the hard --round-timeout, so its update is never late by design).
    """
    cap = k_floor * MAX_K_FACTOR if k_max is None else max(k_floor, k_max)

    def fits(k: int, d: str) -> bool:
        return link_seconds_as(link32, d) <= max(LINK_SHARE * k * step_seconds, MATERIAL_SECONDS)

    encodings = ENCODINGS if dtype_auto else (dtype,)
    for d in encodings:
        if fits(k_floor, d):
            return Need(k_floor, d, step_seconds, link32)
    narrowest = encodings[-1]
    k = k_floor
    while (k_auto and k < cap and not fits(k, narrowest)
           and min(k * 2, cap) * step_seconds + link_seconds_as(link32, narrowest) <= max_round_seconds):
        k = min(k * 2, cap)
    return Need(k, narrowest, step_seconds, link32)


@dataclass(frozen=True)
class Adaptation:
    """The run's K and upload dtype, and the node and figures that decided them."""

    local_steps: int
    update_dtype: str
    node: str = ""
    step_seconds: float = 0.0
    link_seconds: float = 0.0  # the node's round trip with `update_dtype` uploads

    def describe(self, previous: Adaptation) -> str:
        """One line for the console and the log: what changed, and why."""
        changes = []
        if self.local_steps != previous.local_steps:
            changes.append(f"K {previous.local_steps} -> {self.local_steps}")
        if self.update_dtype != previous.update_dtype:
            changes.append(f"uploads {previous.update_dtype} -> {self.update_dtype}")
        return (f"auto: {', '.join(changes)} ({self.node}: {self.link_seconds:.3f} s of link a round against "
                f"{self.step_seconds * 1e3:.1f} ms a step; docs/performance.md, 'Rounds that adapt to the link')")


class Adapter:
    """Keeps each node's recent figures and says when the run's K or upload dtype should change."""

    def __init__(self, k_floor: int, dtype: str, model_bytes: int, *, k_auto: bool, dtype_auto: bool,
                 k_max: int | None = None, max_round_seconds: float = math.inf) -> None:
        self.k_floor = k_floor
        self.k_max, self.max_round_seconds = k_max, max_round_seconds
        self.k_auto, self.dtype_auto = k_auto, dtype_auto
        self.model_bytes = max(1, model_bytes)  # the float32 weights: the download, and a float32 upload
        self.choice = Adaptation(k_floor, dtype)
        self._samples: dict[str, deque[tuple[float, float]]] = {}  # node -> (step seconds, float32 round trip)
        self._last_upload: dict[str, float] = {}  # node -> bytes of its previous update (its communication's upload)
        self._last_round: dict[str, int] = {}  # node -> the round of its last measured update
        self._decided_at: int | None = None

    @property
    def active(self) -> bool:
        return self.k_auto or self.dtype_auto

    def observe(self, node: str, stats: NodeStats, local_steps: int, round_: int = 0) -> None:
        """One taken update of `node` in round `round_`, trained for `local_steps` steps.

        Figures that are not finite and non-negative (a broken or hostile agent's) are left out: one node must
        not push the run to int8 and an 8x K by claiming an infinite link.
        """
        figures = (stats.compute_seconds, stats.communication_seconds, stats.bytes)
        if not all(math.isfinite(x) and x >= 0 for x in figures):
            return
        first = node not in self._last_upload  # its first update: its workers' warm-up, left out
        upload = self._last_upload.get(node, 0.0)
        self._last_upload[node] = stats.bytes
        if first:
            return
        if local_steps < 1 or stats.compute_seconds <= 0:
            return
        moved = self.model_bytes + (upload if upload > 0 else self.model_bytes)
        link32 = stats.communication_seconds * 2 * self.model_bytes / moved
        self._samples.setdefault(node, deque(maxlen=WINDOW)).append((stats.compute_seconds / local_steps, link32))
        self._last_round[node] = round_

    def decide(self, completed_rounds: int) -> Adaptation | None:
        """The new choice, if it differs from the current one and one is due.

        From the nodes measured in the last `EVERY` rounds: a slow node that missed the round a decision falls on
        still counts, and one that left stops counting.
        """
        if not self.active or (self._decided_at is not None and completed_rounds - self._decided_at < EVERY):
            return None
        needs = {}
        for node in [n for n, r in self._last_round.items() if completed_rounds - r <= EVERY]:
            window = self._samples.get(node, ())
            if len(window) >= MIN_SAMPLES:
                needs[node] = need(statistics.median(s for s, _ in window),
                                   statistics.median(link for _, link in window),
                                   self.k_floor if self.k_auto else self.choice.local_steps, k_auto=self.k_auto,
                                   dtype_auto=self.dtype_auto, dtype=self.choice.update_dtype, k_max=self.k_max,
                                   max_round_seconds=self.max_round_seconds)
        if not needs:
            return None
        self._decided_at = completed_rounds
        node = max(needs, key=lambda n: (needs[n].local_steps, -_RATIO[needs[n].update_dtype]))
        n = needs[node]
        dtype = min((x.update_dtype for x in needs.values()), key=lambda d: _RATIO[d])
        new = Adaptation(n.local_steps, dtype, node, n.step_seconds, link_seconds_as(n.link_seconds, dtype))
        if (new.local_steps, new.update_dtype) == (self.choice.local_steps, self.choice.update_dtype):
            return None
        self.choice = new
        return new
