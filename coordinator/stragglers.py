"""Which node held the run's rounds back, and why: its compute, its link, or both (for the run's summary).

Pure arithmetic on what each node reported with its updates (edgetrain.records.NodeStats: its local steps'
seconds, its download and upload seconds, the bytes it sent), summed over the run. A node is slow on a count
when its time per round on it is at least `SLOWER` times the median of the other nodes' and the difference is at
least `MATERIAL_SECONDS`: a board twice as slow as the rest on a 3 ms step holds nobody back worth naming.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

SLOWER = 1.5  # times the other nodes' median time per round
MATERIAL_SECONDS = 0.05  # and at least this much longer per round


@dataclass(frozen=True)
class NodeTimes:
    """One node's totals over the run."""

    rounds: int  # updates taken from it
    compute_seconds: float
    link_seconds: float  # downloading the weights and uploading its update
    link_bytes: float  # its updates' bytes
    missed: int = 0  # rounds that closed without its update
    down_bytes: float = 0.0  # the weights it downloaded (float32; 0: unknown, taken as many as its updates')


@dataclass(frozen=True)
class Straggler:
    name: str
    why: str  # "compute", "link" or "both"
    compute_per_round: float
    link_per_round: float
    median_compute: float  # the other nodes'
    median_link: float
    link_bits_per_second: float  # what its link carried each way while it moved weights and updates (0: unknown)
    missed: int

    def __str__(self) -> str:
        parts = []
        if self.why in ("compute", "both"):
            parts.append(f"compute {self.compute_per_round:.2f} s a round (the others' median "
                         f"{self.median_compute:.2f} s)")
        if self.why in ("link", "both"):
            rate = f", ~{_bits(self.link_bits_per_second)} each way" if self.link_bits_per_second > 0 else ""
            parts.append(f"link {self.link_per_round:.2f} s a round{rate} (the others' median "
                         f"{self.median_link:.2f} s)")
        missed = f"; missed {self.missed} round{'s' * (self.missed != 1)}" if self.missed else ""
        return f"slowest node: {self.name}, held back by its {self.why}: {'; '.join(parts)}{missed}"


def _bits(rate: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit}"
    return f"{rate:.0f} bit/s"


def slowest(nodes: Mapping[str, NodeTimes]) -> Straggler | None:
    """The node whose rounds took longest, if it stands out from the others' median by `SLOWER` (None: none does).

    Needs two nodes that sent at least one update each: with one there is nobody to compare with.
    """
    sent = {name: n for name, n in nodes.items() if n.rounds > 0}
    if len(sent) < 2:
        return None
    compute = {name: n.compute_seconds / n.rounds for name, n in sent.items()}
    link = {name: n.link_seconds / n.rounds for name, n in sent.items()}
    name = max(sent, key=lambda k: compute[k] + link[k])
    med_c = statistics.median(v for k, v in compute.items() if k != name)
    med_l = statistics.median(v for k, v in link.items() if k != name)

    def slow(value: float, median: float) -> bool:
        return value >= SLOWER * median and value - median >= MATERIAL_SECONDS

    slow_c, slow_l = slow(compute[name], med_c), slow(link[name], med_l)
    if not (slow_c or slow_l):
        return None
    n = sent[name]
    return Straggler(
        name=name, why="both" if slow_c and slow_l else "compute" if slow_c else "link",
        compute_per_round=compute[name], link_per_round=link[name], median_compute=med_c, median_link=med_l,
        link_bits_per_second=(8 * (n.link_bytes + (n.down_bytes or n.link_bytes)) / n.link_seconds
                              if n.link_seconds > 0 else 0.0),
        missed=n.missed)
