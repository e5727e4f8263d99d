import pytest
import torch

from edgetrain import serde
from edgetrain.compression import ErrorFeedback, apply_delta


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "int8"])
def test_error_feedback_loses_nothing_over_rounds(wire: str) -> None:
    g = torch.Generator().manual_seed(0)
    fb = ErrorFeedback(wire)
    base = {"w": torch.randn(1000, generator=g), "n": torch.tensor(3)}
    true_total = torch.zeros(1000)
    sent_total = torch.zeros(1000)
    for _ in range(20):
        step = 1e-3 * torch.randn(1000, generator=g)
        trained = {"w": base["w"] + step, "n": base["n"]}
        true_total += step
        delta = fb.delta(trained, base)
        sent_total += serde.roundtrip(delta["w"], wire)  # what the coordinator decodes
        assert torch.equal(delta["n"], base["n"])
    # everything not yet sent is in the residual: sent + residual == the true sum of updates
    assert torch.allclose(sent_total + fb.residual["w"], true_total, atol=1e-6)
    # and the residual is no bigger than one round's quantisation error
    assert float(fb.residual["w"].abs().max()) < 1e-3


def test_apply_delta_adds_floats_and_keeps_integers() -> None:
    base = {"w": torch.ones(2), "n": torch.tensor(4)}
    out = apply_delta(base, {"w": torch.tensor([0.5, -1.0]), "n": torch.tensor(5)})
    assert torch.equal(out["w"], torch.tensor([1.5, 0.0]))
    assert int(out["n"]) == 5


def test_float32_feedback_is_inactive_and_unknown_names_are_refused() -> None:
    assert not ErrorFeedback("float32").active
    with pytest.raises(ValueError):
        ErrorFeedback("float4")


def test_a_round_may_ask_for_another_dtype_and_float32_sends_what_was_held_back() -> None:
    torch.manual_seed(0)
    base = {"w": torch.zeros(1000)}
    fb = ErrorFeedback("float32")  # the run's dtype; rounds ask for others (--update-dtype auto)
    assert not fb.active and not fb.pending
    assert fb.wire_for("") == "float32" and fb.wire_for("int8") == "int8" and fb.wire_for("int4") == "float32"
    sent = torch.zeros(1000)
    trained_total = torch.zeros(1000)
    for wire in ("int8", "float16", "int8"):
        trained = {"w": torch.randn(1000) * 0.01}
        trained_total += trained["w"]
        delta = fb.delta(trained, base, wire)
        sent += serde.roundtrip(delta["w"], wire)
        assert fb.pending
    assert float((trained_total - sent).abs().max()) > 1e-6  # int8 held something back
    last = fb.delta({"w": torch.zeros(1000)}, base, "float32")  # nothing new trained: only the residual goes
    sent += last["w"]
    assert not fb.pending  # float32 sends it exactly and clears it
    assert torch.allclose(sent, trained_total, atol=1e-6)
