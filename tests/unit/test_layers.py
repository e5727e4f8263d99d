"""The import rules of docs/architecture.md, read from the source (a rule broken here is a doc made untrue)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _package_of(path: Path) -> list[str]:
    """The folder-named package a source file is in: agent/route.py -> ["agent"] (installed: edgetrain.agent)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]  # a module's package; for __init__.py, the package it starts


def _canonical(name: str) -> str:
    """A module's name by its folder: edgetrain.agent.x and agent.x are both "agent.x" (either way of installing)."""
    for side in ("agent", "coordinator"):
        if name == f"edgetrain.{side}" or name.startswith(f"edgetrain.{side}."):
            return name.removeprefix("edgetrain.")
    return name


def _imports(path: Path, *, typing_only: bool = True) -> set[str]:
    """The modules `path` imports, by folder name (relative imports resolved); `typing_only` False leaves out
    `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                skip |= {id(n) for n in ast.walk(node)}
    package = _package_of(path)
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {_canonical(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(_canonical(module))
            names |= {_canonical(f"{module}.{alias.name}") for alias in node.names}  # `from pkg import module`
    return names


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "proto" not in p.parts)


@pytest.mark.parametrize(("package", "forbidden"), [
    ("edgetrain", ("agent", "coordinator", "bench")),
    ("agent", ("coordinator", "bench")),
    ("coordinator", ("agent",)),
])
def test_each_side_imports_only_what_the_architecture_allows(package: str, forbidden: tuple[str, ...]) -> None:
    broken = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in forbidden)
              for p in _modules(package)}
    assert {k: v for k, v in broken.items() if v} == {}


def test_the_codec_opens_no_files_and_the_transfer_never_reaches_back_into_the_servicer() -> None:
    assert not _imports(ROOT / "edgetrain" / "serde.py") & {"os", "tempfile", "weakref", "threading"}
    for path in (ROOT / "coordinator" / "transfer").glob("*.py"):
        assert not {n for n in _imports(path)
                    if n.startswith(("coordinator.servicer", "coordinator.service", "coordinator.streams"))}, path


def test_the_service_is_plain_code_under_the_grpc_servicer() -> None:
    """coordinator/service.py decides; only the servicer above it speaks gRPC and protobuf."""
    service = _imports(ROOT / "coordinator" / "service.py")
    assert not {n for n in service if n.split(".")[0] == "grpc" or "proto" in n or n.endswith("records_pb")}
    assert "coordinator.servicer" not in service
    assert "coordinator.service" in _imports(ROOT / "coordinator" / "servicer.py")


def test_a_worker_process_loads_no_grpc() -> None:
    """The worker imports agent.route; the route names the gRPC client for types only."""
    assert "agent.client" not in _imports(ROOT / "agent" / "route.py", typing_only=False)
    out = subprocess.run([sys.executable, "-c", "import sys, edgetrain.agent.worker; print('grpc' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def _file_of(name: str) -> Path | None:
    """The source file of a module named by folder ("agent.route", "edgetrain.split"), None if it is not ours."""
    if name.split(".")[0] not in ("agent", "edgetrain", "coordinator"):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _defined(path: Path) -> set[str]:
    """The public top-level functions and classes of a module."""
    return {n.name for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and not n.name.startswith("_")}


def test_nothing_the_agent_imports_holds_or_imports_the_benchmark_baselines() -> None:
    """From source: every module of agent/, and every module those import (to the end, imports inside functions
    included), neither imports coordinator/experiments/baselines.py nor defines one of its names."""
    seen: set[Path] = set()
    todo = list(_modules("agent"))
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [f for f in map(_file_of, _imports(path)) if f is not None]
    reached = {str(p.relative_to(ROOT)) for p in seen}
    assert {"edgetrain/split.py", "edgetrain/pinned.py", "edgetrain/procs.py"} <= reached  # the probe is followed
    baselines = ROOT / "coordinator" / "experiments" / "baselines.py"
    names = _defined(baselines)
    assert {"torch_single", "torch_ddp", "torch_lockstep", "TrainJob", "combine"} <= names
    assert baselines not in seen
    assert {k: sorted(_defined(ROOT / k) & names) for k in reached if _defined(ROOT / k) & names} == {}
    users = {str(p.relative_to(ROOT)) for package in ("edgetrain", "agent", "coordinator") for p in _modules(package)
             if any(n.startswith("coordinator.experiments.baselines") for n in _imports(p))}
    assert users and all(u.startswith("coordinator/experiments/") or u == "coordinator/bench_ttt.py" for u in users)


def test_records_meet_protobuf_only_at_the_grpc_edge() -> None:
    """edgetrain/records.py knows no protobuf; only the route and the servicer convert (edgetrain/records_pb.py)."""
    assert not {n for n in _imports(ROOT / "edgetrain" / "records.py") if "proto" in n}
    users = {str(p.relative_to(ROOT)) for package in ("edgetrain", "agent", "coordinator") for p in _modules(package)
             if any(n.startswith("edgetrain.records_pb") for n in _imports(p))}
    assert users == {"agent/route.py", "coordinator/servicer.py"}
