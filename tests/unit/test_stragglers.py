"""The run summary's slow node: named with its cause (compute, link or both), or nobody when none stands out."""

from __future__ import annotations

import pytest
from edgetrain.coordinator.stragglers import NodeTimes, slowest


def _fleet(**slow: NodeTimes) -> dict[str, NodeTimes]:
    even = NodeTimes(rounds=10, compute_seconds=5.0, link_seconds=1.0, link_bytes=10 * 1e6)  # 0.5 s + 0.1 s a round
    return {"a": even, "b": even, "c": even, **slow}


@pytest.mark.parametrize(("compute", "link", "why"), [(20.0, 1.0, "compute"), (5.0, 40.0, "link"),
                                                      (20.0, 40.0, "both")])
def test_the_slowest_node_is_named_with_what_holds_it_back(compute: float, link: float, why: str) -> None:
    s = slowest(_fleet(d=NodeTimes(10, compute, link, 10 * 1e6, missed=2)))
    assert s is not None and (s.name, s.why, s.missed) == ("d", why, 2)
    assert s.link_per_round == pytest.approx(link / 10) and s.median_compute == pytest.approx(0.5)
    text = str(s)
    assert text.startswith(f"slowest node: d, held back by its {why}") and "missed 2 rounds" in text
    assert ("compute 2.00 s a round" in text) == (why != "link")
    assert ("link 4.00 s a round, ~4.0 Mbit/s each way" in text) == (why != "compute")  # 2 x 10 MB x 8 / 40 s


def test_nobody_is_named_when_no_node_stands_out_or_the_gap_is_immaterial() -> None:
    assert slowest(_fleet(d=NodeTimes(10, 6.0, 1.2, 1e6))) is None  # 1.2x the median
    tiny = NodeTimes(10, 0.01, 0.01, 1e3)
    assert slowest({"a": tiny, "b": tiny, "c": NodeTimes(10, 0.04, 0.01, 1e3)}) is None  # 4x, but 3 ms a round
    assert slowest({"a": NodeTimes(10, 5.0, 1.0, 1e6)}) is None  # nobody to compare with
    # a node that never sent is not compared (it has no times): the others are
    assert slowest({"a": NodeTimes(10, 5.0, 1.0, 1e6), "gone": NodeTimes(0, 0.0, 0.0, 0.0, missed=10)}) is None


def test_a_link_with_compressed_uploads_is_rated_by_every_byte_it_carried() -> None:
    # int8 uploads: 2.5 MB up against 10 MB of float32 weights down, in 40 s: (10 + 2.5) MB x 8 / 40 s
    s = slowest(_fleet(d=NodeTimes(10, 5.0, 40.0, 2.5 * 1e6, down_bytes=10 * 1e6)))
    assert s is not None and s.why == "link"
    assert s.link_bits_per_second == pytest.approx(2.5e6)
