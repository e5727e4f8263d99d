"""Checkpoint files: what a killed writer leaves behind is cleaned up when a run starts in that folder."""

from __future__ import annotations

from pathlib import Path

from coordinator import checkpoint


def test_temp_files_of_a_killed_checkpoint_writer_are_removed_and_nothing_else(tmp_path: Path) -> None:
    stale = [tmp_path / ".checkpoint.pt.x1y2.tmp", tmp_path / ".rounds.jsonl.ab.tmp"]
    keep = [tmp_path / "checkpoint.pt", tmp_path / "rounds.jsonl", tmp_path / "notes.tmp"]
    for f in stale + keep:
        f.write_bytes(b"x")
    assert sorted(checkpoint.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in stale)
