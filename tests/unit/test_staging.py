"""A streamed update waiting in a staging file reads back exactly what a decode in memory makes."""

from pathlib import Path

import pytest
import torch
from edgetrain.coordinator.transfer.staging import Stage, StagedTensor, finish_staged

from edgetrain import serde
from edgetrain.compression import apply_delta


def _staged(state: dict[str, torch.Tensor], wire: str, stage: Stage,
            base: dict[str, torch.Tensor] | None = None) -> dict[str, serde.Sliced | torch.Tensor]:
    asm = serde.Assembler(serde.spec_of(state), into=stage.begin(), check_finite=False)
    for part in serde.encode(state, wire_dtype=wire, part_bytes=1000):  # parts that do not line up with chunks
        asm.add(part)
    return finish_staged(asm, base=base)


def _read_back(t: serde.Sliced | torch.Tensor) -> bytes:
    if isinstance(t, torch.Tensor):
        return t.numpy().tobytes()
    got = bytearray()
    for lo, values in t.slices():
        assert lo * 4 == len(got)  # in order, nothing skipped
        got += values.tobytes()
    return bytes(got)


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("delta", [False, True])
def test_a_staged_update_reads_back_exactly_what_a_decode_in_memory_makes(
    wire: str, delta: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Stage, "CHUNK", 777)  # many chunks, the last one short
    g = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(30, 70, generator=g), "b": torch.randn(7, generator=g), "n": torch.tensor(5),
             "empty": torch.zeros(0, 3)}
    base = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in state.items()}
    stage = Stage(tmp_path)
    for _ in range(2):  # the file is reused update after update
        staged = _staged(state, wire, stage, base if delta else None)
        in_memory = serde.decode(serde.encode(state, wire_dtype=wire), serde.spec_of(state))
        if delta:
            in_memory = apply_delta(base, in_memory)
        assert isinstance(staged["w"], StagedTensor) and isinstance(staged["n"], torch.Tensor)
        assert {k: _read_back(v) for k, v in staged.items()} == {
            k: v.numpy().tobytes() for k, v in in_memory.items()}
        assert serde.finite(staged)
    assert list(tmp_path.iterdir()) == []  # the staging file has no name: nothing to leave behind
    stage.close()


def test_finite_reads_a_staged_update_to_its_last_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Stage, "CHUNK", 100)
    stage = Stage(tmp_path)
    w = torch.ones(1000)
    w[-1] = float("nan")
    assert not serde.finite(_staged({"w": w}, "float32", stage))
    # finite weights whose delta overflows float32 once added to the base
    big = {"w": torch.full((1000,), 3e38)}
    assert serde.finite(_staged(big, "float32", stage))
    assert not serde.finite(_staged(big, "float32", stage, base=big))
    assert not serde.finite({"w": w})  # whole tensors as before
