"""The auto rule for K and the uploads' dtype (coordinator/adapt.py): pure arithmetic on reported figures."""

from __future__ import annotations

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
    # 100 Mbit/s: ~0.8 s a float32 round trip, int8 0.5 s; 0.1 s steps: K 8 -> 32 would need 0.32 s of budget;
    # 50 s steps away the cap holds
    n = need(0.1, 0.8, 8)
    assert n.update_dtype == "int8"
    assert n.local_steps == 8 * MAX_K_FACTOR
    n = need(0.1, 0.3, 8)  # int8: 0.1875 s fits 0.1 x 16 x 0.1 s = 0.16? no; 32 x: 0.32 yes
    assert n.local_steps == 32
    n = need(0.1, 0.2, 8)  # int8: 0.125 s; K 16 gives 0.16 s
    assert n.local_steps == 16


def test_user_choices_are_kept() -> None:
    n = need(0.1, 0.8, 8, k_auto=False)
    assert (n.local_steps, n.update_dtype) == (8, "int8")  # K the user's, the dtype still auto
    n = need(0.1, 0.8, 8, dtype_auto=False, dtype="bfloat16")
    assert n.update_dtype == "bfloat16" and n.local_steps == 32
    n = need(0.1, 0.8, 8, k_auto=False, dtype_auto=False)
    assert (n.local_steps, n.update_dtype) == (8, "float32")


def test_upload_scaling_keeps_the_download_in_float32() -> None:
    assert link_seconds_as(1.0, "float32") == 1.0
    assert link_seconds_as(1.0, "float16") == pytest.approx(0.75)
    assert link_seconds_as(1.0, "int8") == pytest.approx(0.625)


def stats(compute: float, link: float, sent: float) -> NodeStats:
    return NodeStats(samples=512, compute_seconds=compute, communication_seconds=link, bytes=sent)


def test_the_adapter_leaves_out_each_nodes_first_update_and_waits_for_two() -> None:
    a = Adapter(8, "float32", MB, k_auto=True, dtype_auto=True)
    a.observe("b", stats(5.0, 0.8, MB), 8)  # warm-up: left out
    assert a.decide(1, ["b"]) is None
    a.observe("b", stats(0.8, 0.8, MB), 8)
    assert a.decide(2, ["b"]) is None  # one measured update
    a.observe("b", stats(0.8, 0.8, MB), 8)
    new = a.decide(3, ["b"])
    assert new is not None and (new.local_steps, new.update_dtype) == (32, "int8")
    assert new.node == "b" and new.step_seconds == pytest.approx(0.1)
    assert "K 8 -> 32" in new.describe(Adaptation(8, "float32")) and "float32 -> int8" in new.describe(
        Adaptation(8, "float32"))


def test_the_adapter_normalises_compressed_uploads_to_float32() -> None:
    a = Adapter(8, "float32", MB, k_auto=True, dtype_auto=True)
    for _ in range(3):  # int8 uploads (a quarter of the bytes): 0.5 s is a 0.8 s float32 round trip
        a.observe("b", stats(0.8, 0.5, MB / 4), 8)
    new = a.decide(3, ["b"])
    assert new is not None and new.update_dtype == "int8" and new.local_steps == 32


def test_one_choice_for_the_run_from_the_node_that_needs_most_and_only_every_few_rounds() -> None:
    a = Adapter(8, "float32", MB, k_auto=True, dtype_auto=True)
    for _ in range(3):
        a.observe("fast", stats(0.8, 0.01, MB), 8)
        a.observe("slow", stats(0.8, 0.8, MB), 8)
    new = a.decide(3, ["fast", "slow"])
    assert new is not None and new.node == "slow" and new.local_steps == 32
    # the link heals: noticed only EVERY rounds after the last decision, and from the window's median
    for _ in range(5):
        a.observe("slow", stats(3.2, 0.01, MB / 4), 32)
    assert a.decide(3 + EVERY - 1, ["fast", "slow"]) is None
    back = a.decide(3 + EVERY, ["fast", "slow"])
    assert back is not None and (back.local_steps, back.update_dtype) == (8, "float32")


def test_a_node_gone_from_the_round_no_longer_decides() -> None:
    a = Adapter(8, "float32", MB, k_auto=True, dtype_auto=True)
    for _ in range(3):
        a.observe("slow", stats(0.8, 0.8, MB), 8)
        a.observe("fast", stats(0.8, 0.01, MB), 8)
    assert a.decide(3, ["fast"]) is None  # only "fast" took part: the recipe holds


def test_nothing_auto_never_decides() -> None:
    a = Adapter(8, "float32", MB, k_auto=False, dtype_auto=False)
    for _ in range(3):
        a.observe("slow", stats(0.8, 0.8, MB), 8)
    assert a.decide(3, ["slow"]) is None
