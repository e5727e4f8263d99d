"""The auto rule for K and the uploads' dtype (coordinator/adapt.py): pure arithmetic on reported figures."""

from __future__ import annotations

import math

import pytest
from edgetrain.coordinator.adapt import EVERY, MAX_K_FACTOR, Adaptation, Adapter, link_seconds_as, need

from edgetrain.records import NodeStats

MB = 4_800_000  # the MNIST CNN's float32 weights


def test_a_fast_link_keeps_the_recipe() -> None:
    # loopback: 10 ms a round trip against 8 steps of 0.1 s
    assert (need(0.1, 0.010, 8).local_steps, need(0.1, 0.010, 8).update_dtype) == (8, "float32")


def test_a_link_under_the_material_floor_changes_nothing_even_with_tiny_steps() -> None:
    # a tiny test model: 1 ms steps, 30 ms of link is 375 % of compute but under 50 ms
    n = need(0.001, 0.030, 8)
    assert (n.local_steps, n.update_dtype) == (8, "float32")


def test_compression_is_tried_before_k() -> None:
    # 1 s of compute a round (8 x 0.125 s); float32 round trip 0.14 s: float16's 0.105 s does not fit 0.1 s, int8's
    # 0.0875 s does
    n = need(0.125, 0.14, 8)
    assert (n.local_steps, n.update_dtype) == (8, "int8")
    n = need(0.125, 0.12, 8)  # float16: 0.09 s fits
    assert (n.local_steps, n.update_dtype) == (8, "float16")


def test_a_slow_link_doubles_k_up_to_its_cap() -> None:
    # 100 Mbit/s: ~0.8 s a float32 round trip, int8 0.5 s, against 0.1 s steps: K 64 (0.64 s of budget) fits
    n = need(0.1, 0.8, 8)
    assert (n.local_steps, n.update_dtype) == (64, "int8") and 64 == 8 * MAX_K_FACTOR
    assert need(0.1, 3.0, 8).local_steps == 8 * MAX_K_FACTOR  # never fits: the cap holds
    assert need(0.1, 0.3, 8).local_steps == 32  # int8 0.1875 s: K 16 gives 0.16 s, 32 gives 0.32 s
    assert need(0.1, 0.2, 8).local_steps == 16  # int8 0.125 s


def test_k_stays_within_a_shards_epoch_and_half_the_round_timeout() -> None:
    assert need(0.1, 0.8, 8, k_max=20).local_steps == 20  # doubling stops at the shard's 20 batches an epoch
    assert need(0.1, 0.8, 8, k_max=4).local_steps == 8  # never below the recipe's
    # a round of K x 0.1 s + 0.5 s of int8 link within 2.2 s: K 16 (2.1 s), not 32 (3.7 s)
    assert need(0.1, 0.8, 8, max_round_seconds=2.2).local_steps == 16


def test_user_choices_are_kept() -> None:
    n = need(0.1, 0.8, 8, k_auto=False)
    assert (n.local_steps, n.update_dtype) == (8, "int8")  # K the user's, the dtype still auto
    n = need(0.1, 0.8, 8, dtype_auto=False, dtype="bfloat16")
    assert n.update_dtype == "bfloat16" and n.local_steps == 64  # 0.6 s of link fits 0.64 s
    n = need(0.1, 0.8, 8, k_auto=False, dtype_auto=False)
    assert (n.local_steps, n.update_dtype) == (8, "float32")


def test_upload_scaling_keeps_the_download_in_float32() -> None:
    assert link_seconds_as(1.0, "float32") == 1.0
    assert link_seconds_as(1.0, "float16") == pytest.approx(0.75)
    assert link_seconds_as(1.0, "int8") == pytest.approx(0.625)


def stats(compute: float, link: float, sent: float) -> NodeStats:
    return NodeStats(samples=512, compute_seconds=compute, communication_seconds=link, bytes=sent)


def adapter() -> Adapter:
    return Adapter(8, "float32", MB, k_auto=True, dtype_auto=True)


def test_the_adapter_leaves_out_each_nodes_first_update_and_waits_for_two() -> None:
    a = adapter()
    a.observe("b", stats(5.0, 0.8, MB), 8, 0)  # warm-up: left out
    assert a.decide(1) is None
    a.observe("b", stats(0.8, 0.8, MB), 8, 1)
    assert a.decide(2) is None  # one measured update
    a.observe("b", stats(0.8, 0.8, MB), 8, 2)
    new = a.decide(3)
    assert new is not None and (new.local_steps, new.update_dtype) == (64, "int8")
    assert new.node == "b" and new.step_seconds == pytest.approx(0.1)
    line = new.describe(Adaptation(8, "float32"))
    assert "K 8 -> 64" in line and "uploads float32 -> int8" in line and line.startswith("auto: ")


def test_the_adapter_normalises_compressed_uploads_to_float32() -> None:
    a = adapter()
    for r in range(3):  # int8 uploads (a quarter of the bytes): 0.5 s is a 0.8 s float32 round trip
        a.observe("b", stats(0.8, 0.5, MB / 4), 8, r)
    new = a.decide(3)
    assert new is not None and new.update_dtype == "int8" and new.local_steps == 64


def test_figures_that_are_not_finite_are_left_out() -> None:
    a = adapter()
    for r in range(4):
        a.observe("liar", stats(0.8, math.inf, MB), 8, r)
        a.observe("nan", stats(math.nan, 0.8, MB), 8, r)
        a.observe("neg", stats(0.8, -1.0, MB), 8, r)
    assert a.decide(4) is None  # nobody measured: the recipe holds


def test_one_choice_for_the_run_from_the_node_that_needs_most_and_only_every_few_rounds() -> None:
    a = adapter()
    for r in range(3):
        a.observe("fast", stats(0.8, 0.01, MB), 8, r)
        a.observe("slow", stats(0.8, 0.8, MB), 8, r)
    new = a.decide(3)
    assert new is not None and new.node == "slow" and new.local_steps == 64
    # the link heals: noticed only EVERY rounds after the last decision, and from the window's median
    for r in range(3, 8):
        a.observe("slow", stats(6.4, 0.01, MB / 4), 64, r)
    assert a.decide(3 + EVERY - 1) is None
    back = a.decide(3 + EVERY)
    assert back is not None and (back.local_steps, back.update_dtype) == (8, "float32")


def test_a_slow_node_that_missed_the_deciding_round_still_counts_and_one_long_gone_does_not() -> None:
    a = adapter()
    for r in range(3):
        a.observe("slow", stats(0.8, 0.8, MB), 8, r)
        a.observe("fast", stats(0.8, 0.01, MB), 8, r)
    a.observe("fast", stats(0.8, 0.01, MB), 8, 3)  # round 3 without "slow"
    new = a.decide(4)
    assert new is not None and new.node == "slow"
    for r in range(4, 4 + 2 * EVERY):  # "slow" left: only "fast" sends
        a.observe("fast", stats(0.8, 0.01, MB), 8, r)
    back = a.decide(4 + 2 * EVERY)
    assert back is not None and (back.local_steps, back.update_dtype) == (8, "float32")


def test_nothing_auto_never_decides() -> None:
    a = Adapter(8, "float32", MB, k_auto=False, dtype_auto=False)
    for r in range(3):
        a.observe("slow", stats(0.8, 0.8, MB), 8, r)
    assert a.decide(3) is None
