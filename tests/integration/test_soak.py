"""The soak benchmark's short version: agents killed at random and restarted lose no round and leak no staging.

The figures (RSS, file descriptors and threads per 100 rounds) are the benchmark's to print (bench/soak.py,
docs/security.md); here only what must hold on any machine is checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from edgetrain.coordinator.config import UPLOAD_SLOTS

ROOT = Path(__file__).resolve().parents[2]


def test_agents_killed_and_restarted_lose_no_round_and_staging_ends_empty(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--agents", "4", "--rounds", "120",
                           "--kill-every", "10", "--seed", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads(out.read_text())
    assert r["kills"] >= 2, r  # the kills happened...
    assert (r["exit_code"], r["lost"], r["twice"], r["errors"]) == (0, 0, 0, []), r  # ...and cost no round
    assert r["finished"] == r["agents"] == 4, r  # the restarted agents heard FINISHED too
    # staged updates are unnamed files: what the coordinator holds open there is what counts; never more than
    # its upload slots, however many uploads were cut off by a kill
    assert 1 <= r["staged_max"] <= UPLOAD_SLOTS and r["left_in_staging"] == [], r
    assert "| rss |" in done.stdout and "rounds lost 0" in done.stdout
    # the slopes come over the second half as well (past the heap's growth to its working size), and every
    # sample is in the json, in the order of the rounds
    half = r["second_half_slopes_per_100_rounds"]["rss"]
    assert math.isfinite(half["slope"]) and math.isfinite(half["two_se"]), r
    rows = r["series"]["rows"]
    assert len(rows) == r["samples"] > 0 and [row[0] for row in rows] == sorted(row[0] for row in rows), r
    assert "second half" in done.stdout
