"""The checked-in generated code must be exactly what scripts/gen_proto.py makes from proto/."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_proto  # noqa: E402


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    written = gen_proto.generate(tmp_path)
    assert written, "protoc wrote nothing"
    for fresh in written:
        checked_in = ROOT / "edgetrain" / "proto" / fresh.name
        assert checked_in.exists(), f"{fresh.name} is not checked in; run scripts/gen_proto.py"
        assert checked_in.read_bytes() == fresh.read_bytes(), (
            f"{checked_in} drifted from proto/: run python scripts/gen_proto.py and commit"
        )
    names = {p.name for p in written}
    stale = {p.name for p in (ROOT / "edgetrain" / "proto").glob("*_pb2*")} - names
    assert not stale, f"generated files with no .proto: {stale}"
