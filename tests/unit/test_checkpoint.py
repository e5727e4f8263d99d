"""Checkpoint files: safetensors plus JSON, checksummed, checked whole on load, never unpickled, written atomically."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from edgetrain.coordinator import checkpoint

from tests.smallfs import fill, free_bytes, tmpfs


def _state(rows: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"embedding.weight": torch.randn(rows, 32, generator=g), "fc.bias": torch.randn(3, generator=g),
            "bn.num_batches_tracked": torch.tensor(7)}


def _save(run_dir: Path, state: dict[str, torch.Tensor] | None = None, rounds: int = 20) -> Path:
    return checkpoint.save(run_dir, checkpoint.Checkpoint(
        completed_rounds=rounds, state=state or _state(), cursors={"2/0": 640, "2/1": 512},
        meta={"fingerprint": "abc", "model": "text-cnn"}))


def _tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """Where `name`'s raw bytes lie in a safetensors file: (start, end) from the file's start."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    start, end = json.loads(blob[8:8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def test_temp_files_of_a_killed_checkpoint_writer_are_removed_and_nothing_else(tmp_path: Path) -> None:
    stale = [tmp_path / ".checkpoint.safetensors.x1y2.tmp", tmp_path / ".rounds.jsonl.ab.tmp"]
    keep = [tmp_path / "checkpoint.safetensors", tmp_path / "rounds.jsonl", tmp_path / "notes.tmp"]
    for f in stale + keep:
        f.write_bytes(b"x")
    assert sorted(checkpoint.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in stale)


def test_a_checkpoint_comes_back_exactly_and_is_plain_safetensors(tmp_path: Path) -> None:
    path = _save(tmp_path)
    assert path == tmp_path / "checkpoint.safetensors"
    ck = checkpoint.load(tmp_path, expected=_state())
    assert (ck.completed_rounds, ck.cursors, ck.meta) == (20, {"2/0": 640, "2/1": 512},
                                                          {"fingerprint": "abc", "model": "text-cnn"})
    assert ck.state.keys() == _state().keys()
    assert all(torch.equal(ck.state[k], v) and ck.state[k].dtype == v.dtype for k, v in _state().items())
    # any safetensors reader opens it (the final model too): our facts ride in the header's metadata
    other = safetensors.torch.load_file(path)
    assert all(torch.equal(other[k], v) for k, v in _state().items())
    model = checkpoint.save_model(tmp_path, _state(), {"model": "text-cnn"})
    assert all(torch.equal(checkpoint.load_model(model, expected=_state())[k], v) for k, v in _state().items())


def test_bytes_flipped_inside_a_tensor_are_refused_naming_the_file(tmp_path: Path) -> None:
    """The outside probe of 2026-12-07: 4 KiB of embedding.weight set to 0xFF (1,024 float32 NaNs) loaded silently."""
    path = _save(tmp_path)
    start, end = _tensor_bytes(path, "embedding.weight")
    assert end - start >= 4096 + 1024
    blob = bytearray(path.read_bytes())
    blob[start + 1024:start + 1024 + 4096] = b"\xff" * 4096
    path.write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path, expected=_state())
    assert str(err.value) == (f"{path} is damaged (its SHA-256 does not match: truncated or altered); "
                              "refusing to load it")


@pytest.mark.parametrize("where", ["first byte of data", "last byte", "header metadata", "one bit of a float"])
def test_any_changed_byte_is_refused(tmp_path: Path, where: str) -> None:
    path = _save(tmp_path)
    blob = bytearray(path.read_bytes())
    start, end = _tensor_bytes(path, "embedding.weight")
    if where == "first byte of data":
        blob[start] ^= 0x01
    elif where == "last byte":
        blob[-1] ^= 0x80
    elif where == "one bit of a float":
        blob[(start + end) // 2] ^= 0x04  # a finite value stays finite: only the checksum sees it
    else:
        at = blob.index(b'completed_rounds\\": 20')  # the meta's JSON, escaped inside the header's JSON
        blob[at + len(b'completed_rounds\\": 2')] = ord("9")  # 20 -> 29: a valid header, a wrong round
    path.write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -4096])
def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path: Path, keep: int) -> None:
    path = _save(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[:keep])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "damaged" in message or "not an edgetrain safetensors checkpoint" in message


def test_non_finite_values_are_refused_even_when_the_checksum_holds(tmp_path: Path) -> None:
    state = _state()
    state["embedding.weight"][3, :5] = float("nan")
    state["embedding.weight"][7, 0] = float("inf")
    path = _save(tmp_path, state)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path)
    assert str(err.value) == f"{path}: tensor embedding.weight holds 6 NaN/Inf value(s); refusing to load it"


@pytest.mark.parametrize("change", ["shape", "dtype", "missing", "extra"])
def test_tensors_that_do_not_fit_the_model_are_refused(tmp_path: Path, change: str) -> None:
    state = _state()
    if change == "shape":
        state["embedding.weight"] = torch.zeros(255, 32)
    elif change == "dtype":
        state["fc.bias"] = state["fc.bias"].double()
    elif change == "missing":
        del state["fc.bias"]
    else:
        state["fc2.weight"] = torch.zeros(2)
    _save(tmp_path, state)
    checkpoint.load(tmp_path)  # a sound file...
    with pytest.raises(checkpoint.CheckpointError, match=f"^checkpoint in {tmp_path} is from another data set or"):
        checkpoint.load(tmp_path, expected=_state())  # ...of another model


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # what a hostile pickle would do instead of touching a file


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint.pt"])
def test_a_pickle_is_never_unpickled(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    (tmp_path / name).write_bytes(pickle.dumps({"state": _Boom(marker)}))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path)
    assert not marker.exists()
    if name == "checkpoint.pt":  # what an older edgetrain wrote: refused with the way out, never opened
        assert str(err.value) == (
            f"{tmp_path / 'checkpoint.pt'} was written by an older edgetrain with torch.save (a pickle), which this "
            "version never loads: finish that run with the edgetrain that started it, or start a new run "
            "(docs/security.md)")
    else:
        assert str(err.value) == f"cannot read {tmp_path / name}: not an edgetrain safetensors checkpoint"


def test_a_checkpoint_that_hits_a_full_disk_is_one_error_line_and_the_previous_one_stays(tmp_path: Path) -> None:
    """ENOSPC on a real tmpfs: the temp file needs room beside the old checkpoint, and there is none."""
    with tmpfs(tmp_path / "fs", 1 << 20) as fs:
        run_dir = fs / "run"
        _save(run_dir, rounds=20)
        kept = (run_dir / checkpoint.LATEST).read_bytes()
        fill(fs, leave=16 << 10)  # less than one checkpoint (33 KiB)
        assert free_bytes(fs) < len(kept)
        with pytest.raises(checkpoint.CheckpointWriteError) as err:
            _save(run_dir, rounds=21)
        assert str(err.value) == f"cannot write {run_dir / checkpoint.LATEST}: No space left on device (ENOSPC)"
        assert (run_dir / checkpoint.LATEST).read_bytes() == kept
        assert checkpoint.load(run_dir, expected=_state()).completed_rounds == 20
        assert [p.name for p in run_dir.iterdir()] == [checkpoint.LATEST]  # no temp file left behind
