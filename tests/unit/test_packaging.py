"""The distribution claims one import name: agent/ and coordinator/ install as edgetrain.agent and
edgetrain.coordinator (pyproject's package-dir map, written by tools/rename_packages.py)."""

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_edgetrain() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"edgetrain": "edgetrain", "edgetrain.agent": "agent",
                                         "edgetrain.coordinator": "coordinator"}
    folders = set()
    for name, top in setuptools["package-dir"].items():
        folders |= {".".join([name, *init.parent.relative_to(ROOT / top).parts])
                    for init in (ROOT / top).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders  # a new package: run tools/rename_packages.py again


def test_the_console_scripts_keep_their_names_and_point_into_edgetrain() -> None:
    assert _pyproject()["project"]["scripts"] == {"edge-agent": "edgetrain.agent.cli:main",
                                                  "coordinator": "edgetrain.coordinator.cli:main"}


def test_nothing_in_the_tree_still_names_the_old_packages() -> None:
    """After a merge, code importing `agent.x` or running a side by its old module name fails here: run the script."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "rename_packages.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


def test_the_installed_distribution_has_edgetrain_agent_and_coordinator_and_no_top_level_ones(tmp_path: Path) -> None:
    code = ("import importlib.util as u, edgetrain.agent.cli, edgetrain.coordinator.cli, edgetrain.proto.edgetrain_pb2;"
            "print(u.find_spec('agent'), u.find_spec('coordinator'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]  # outside the checkout: no generic top-level names installed
