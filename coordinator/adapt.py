"""`--local-steps auto` and `--update-dtype auto`: K and the uploads' dtype from what the agents' links cost.

A round costs each agent K steps of compute plus one trip of the weights down and its update up. On loopback or a
fast LAN the trip is a few milliseconds and the recipe's K (edgetrain.recipes) is the right one; over 100 Mbit/s
it is ~0.8 s for the MNIST CNN, as long as 8 of its steps, and the agents idle half the time. The rule:

- **Measured**, from each update's own figures (edgetrain.records.NodeStats): a node's time per local step
  (`compute_seconds / K`) and its link time per round (`communication_seconds`: the round's download plus its
  previous upload), scaled to what a float32 upload would have taken (the download is always float32, the upload
  is as many bytes as the node sent). The median of its last `WINDOW` updates, leaving out each node's first (its
  workers' warm-up).
- **Budget**: a round's link time may be `LINK_SHARE` (10 %) of its compute, or `MATERIAL_SECONDS` (50 ms),
  whichever is larger: below that the link costs less than a round's other overheads and nothing changes. So
  loopback and fast links keep today's defaults exactly.
- **Encoding first**: with the recipe's K, the first of float32, float16 and int8 whose round trip fits the
  budget. Compression keeps the optimiser's trajectory (error feedback sends what it dropped in later rounds);
  a larger K changes it. An upload in float16 is half the bytes, in int8 a quarter; the download stays float32.
- **Then K**: if even int8 does not fit, K doubles from the recipe's until it does, up to `MAX_K_FACTOR` (4) times
  the recipe's: further, local steps drift apart and accuracy at the same sample budget drops
  (docs/performance.md, "Rounds over emulated links").
- **One choice for the run**, from the node that needs the most (rounds are synchronous: everyone waits for it).
- **When**: as soon as a node has `MIN_SAMPLES` measured updates, then every `EVERY` rounds again, so a link that
  gets slower or faster is followed; a choice that did not change says nothing.

A K or dtype the user gave is kept; the other may still be auto. Pure code: the driver (coordinator/run.py) feeds
it the rounds' contributions and sets what it returns on the round engine.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from edgetrain.records import NodeStats

LINK_SHARE = 0.1
MATERIAL_SECONDS = 0.05
MAX_K_FACTOR = 4
WINDOW = 5
MIN_SAMPLES = 2
EVERY = 10
ENCODINGS = ("float32", "float16", "int8")  # least lossy first: the order the rule tries them in
_RATIO = {"float32": 1.0, "float16": 0.5, "bfloat16": 0.5, "int8": 0.25}  # upload bytes per float32 byte


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
         dtype: str = "float32") -> Need:
    """The K and upload dtype one node needs: the module's rule, for a step time and a float32 round trip."""
    def fits(k: int, d: str) -> bool:
        return link_seconds_as(link32, d) <= max(LINK_SHARE * k * step_seconds, MATERIAL_SECONDS)

    encodings = ENCODINGS if dtype_auto else (dtype,)
    for d in encodings:
        if fits(k_floor, d):
            return Need(k_floor, d, step_seconds, link32)
    narrowest = encodings[-1]
    k = k_floor
    while k_auto and k < k_floor * MAX_K_FACTOR and not fits(k, narrowest):
        k = min(k * 2, k_floor * MAX_K_FACTOR)
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

    def __init__(self, k_floor: int, dtype: str, model_bytes: int, *, k_auto: bool, dtype_auto: bool) -> None:
        self.k_floor = k_floor
        self.k_auto, self.dtype_auto = k_auto, dtype_auto
        self.model_bytes = max(1, model_bytes)  # the float32 weights: the download, and a float32 upload
        self.choice = Adaptation(k_floor, dtype)
        self._samples: dict[str, deque[tuple[float, float]]] = {}  # node -> (step seconds, float32 round trip)
        self._seen: set[str] = set()  # nodes whose first (warm-up) update was left out
        self._last_upload: dict[str, float] = {}  # node -> bytes of its previous update (its communication's upload)
        self._decided_at: int | None = None

    @property
    def active(self) -> bool:
        return self.k_auto or self.dtype_auto

    def observe(self, node: str, stats: NodeStats, local_steps: int) -> None:
        """One taken update of `node`, trained for `local_steps` steps."""
        upload = self._last_upload.get(node, 0.0)
        self._last_upload[node] = stats.bytes
        if node not in self._seen:
            self._seen.add(node)
            return
        if local_steps < 1 or stats.compute_seconds <= 0:
            return
        moved = self.model_bytes + (upload if upload > 0 else self.model_bytes)
        link32 = stats.communication_seconds * 2 * self.model_bytes / moved
        self._samples.setdefault(node, deque(maxlen=WINDOW)).append((stats.compute_seconds / local_steps, link32))

    def decide(self, completed_rounds: int, nodes: Iterable[str]) -> Adaptation | None:
        """The new choice, if it differs from the current one and one is due; from `nodes` (this round's)."""
        if not self.active or (self._decided_at is not None and completed_rounds - self._decided_at < EVERY):
            return None
        needs = {}
        for node in nodes:
            window = self._samples.get(node, ())
            if len(window) >= MIN_SAMPLES:
                needs[node] = need(statistics.median(s for s, _ in window),
                                   statistics.median(link for _, link in window),
                                   self.k_floor if self.k_auto else self.choice.local_steps, k_auto=self.k_auto,
                                   dtype_auto=self.dtype_auto, dtype=self.choice.update_dtype)
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
