"""Install agent/ and coordinator/ as edgetrain.agent and edgetrain.coordinator (issue 19, item 7).

The folders stay where they are; pyproject.toml maps them with setuptools' package-dir, so the distribution
claims one import name, `edgetrain`. This script makes every change that takes, and can be run again on a tree
that gained code since (it is idempotent: a second run changes nothing):

1. inside agent/ and coordinator/, imports of their own package become relative (`from .client import ...`,
   `from .. import rounds`): the code then reads the same whichever name it is installed under, and
   `mypy edgetrain agent coordinator` still checks the folders as they are;
2. everywhere else (tests, bench, scripts, deploy, edgetrain), `agent.x` / `coordinator.x` imports become
   `edgetrain.agent.x` / `edgetrain.coordinator.x`;
3. `python -m agent` / `python -m coordinator` (argument lists and prose) become `-m edgetrain.agent` /
   `-m edgetrain.coordinator`, and so do the argument lists tests build from a splat (`"-m", *args`, whose first
   item names the package: `f"edgetrain.{args[0]}", *args[1:]`);
4. pyproject.toml: the console scripts point at edgetrain.agent.cli / edgetrain.coordinator.cli (their names,
   `edge-agent` and `coordinator`, stay), and the package list maps the folders (every folder with an
   __init__.py under edgetrain/, agent/ and coordinator/; tests/unit/test_packaging.py fails when one is missing).

    python tools/rename_packages.py          # rewrite the tree
    python tools/rename_packages.py --check  # exit 1 and list the files that would change
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("agent", "coordinator")
SKIP_DIRS = {".git", ".venv", ".venv-checkov", "build", "dist", "node_modules", "__pycache__", ".mypy_cache",
             ".ruff_cache", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".service", ".cfg", ".ini", ".txt", ".sh", ""}
THIS = Path(__file__).resolve()

_FROM = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<module>(?:agent|coordinator)(?:\.\w+)*)[ \t]+import\b",
                   re.MULTILINE)
_IMPORT = re.compile(r"^(?P<indent>[ \t]*)import[ \t]+(?P<module>(?:agent|coordinator)(?:\.\w+)*)\b", re.MULTILINE)
_DASH_M_ARGS = re.compile(r"""(?P<q>["'])-m(?P=q)(?P<sep>,[ \t]*)(?P<q2>["'])(?P<side>agent|coordinator)(?P=q2)""")
# `[sys.executable, "-m", *args]` where args starts with the package's name (test helpers)
_DASH_M_SPLAT = re.compile(r"""(?P<q>["'])-m(?P=q)(?P<sep>,[ \t]*)\*(?P<name>\w+)\b(?!\[)""")
# `py = [sys.executable, "-m"]` ... `[*py, "coordinator", ...]` (bench/links.py)
_PY_SPLAT = re.compile(r"""(?P<pre>\*py,[ \t]*)(?P<q>["'])(?P<side>agent|coordinator)(?P=q)""")
_DASH_M_TEXT = re.compile(r"(?P<pre>python3?[ \t]+-m[ \t]+)(?P<side>agent|coordinator)\b(?!\.)")


def _files() -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        if path.resolve() == THIS or rel.parts[:2] == ("edgetrain", "proto"):
            continue  # this script names the old imports on purpose; generated code has none
        if path.suffix in TEXT_SUFFIXES or path.name in {"Dockerfile", "run"}:
            out.append(path)
    return out


def _relative(package: list[str], module: str) -> str:
    """`module` (absolute, by its folder's name) as seen from `package`.

    "coordinator.rounds" from ["coordinator", "transfer"] is "..rounds".
    """
    target = module.split(".")
    common = 0
    while common < min(len(package), len(target)) and package[common] == target[common]:
        common += 1
    dots = "." * (len(package) - common + 1)
    return dots + ".".join(target[common:])


def rewrite_python(text: str, rel: Path) -> str:
    side = rel.parts[0] if rel.parts[0] in SIDES else None
    package = list(rel.with_suffix("").parts[:-1])  # a module's package; for __init__.py, the package it starts

    def from_import(m: re.Match[str]) -> str:
        module = m["module"]
        if side is not None and module.split(".")[0] == side:
            return f"{m['indent']}from {_relative(package, module)} import"
        return f"{m['indent']}from edgetrain.{module} import"

    def plain_import(m: re.Match[str]) -> str:
        module = m["module"]
        parent, _, name = module.rpartition(".")
        if side is not None and module.split(".")[0] == side and parent:  # `import coordinator.x` inside coordinator/
            return f"{m['indent']}from {_relative(package, parent)} import {name}"
        if not parent:  # `import agent`: the same name bound, from its new home
            return f"{m['indent']}from edgetrain import {module}"
        raise SystemExit(f"{rel}: `import {module}` is used as `{module}.…`; write it as a from-import first")

    text = _FROM.sub(from_import, text)
    text = _IMPORT.sub(plain_import, text)
    text = _DASH_M_ARGS.sub(lambda m: f"{m['q']}-m{m['q']}{m['sep']}{m['q2']}edgetrain.{m['side']}{m['q2']}", text)
    text = _DASH_M_SPLAT.sub(lambda m: f"{m['q']}-m{m['q']}{m['sep']}f\"edgetrain.{{{m['name']}[0]}}\", "
                             f"*{m['name']}[1:]", text)
    text = _PY_SPLAT.sub(lambda m: f"{m['pre']}{m['q']}edgetrain.{m['side']}{m['q']}", text)
    text = "".join(_wrap(line) for line in text.splitlines(keepends=True))
    return _DASH_M_TEXT.sub(lambda m: f"{m['pre']}edgetrain.{m['side']}", text)


def _wrap(line: str, limit: int = 120) -> str:
    """Break an argument list made too long by `edgetrain.` at its last top-level comma that fits."""
    if len(line.rstrip("\n")) <= limit or '"edgetrain.' not in line:
        return line
    at = line.index('"edgetrain.')
    opened, quote = [], ""  # the innermost list still open where the name stands
    for i, c in enumerate(line[:at]):
        if quote:
            quote = "" if c == quote and line[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c == "[":
            opened.append(i)
        elif c == "]" and opened:
            opened.pop()
    if not opened:
        return line
    start = opened[-1]
    depth, cut = 0, -1
    for i in range(start + 1, len(line)):
        c = line[i]
        if quote:
            quote = "" if c == quote and line[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif c == "," and depth == 0 and i > at and i + 1 < limit:
            cut = i
    if cut < 0:
        return line
    return line[: cut + 1] + "\n" + " " * (start + 1) + line[cut + 1 :].lstrip(" ")


def rewrite_text(text: str) -> str:
    return _DASH_M_TEXT.sub(lambda m: f"{m['pre']}edgetrain.{m['side']}", text)


def _packages() -> list[str]:
    names = []
    for top, installed in (("edgetrain", "edgetrain"), *((s, f"edgetrain.{s}") for s in SIDES)):
        for init in sorted((ROOT / top).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / top)
            names.append(".".join([installed, *rel.parts]))
    return sorted(names)


def rewrite_pyproject(text: str) -> str:
    for side in SIDES:
        text = re.sub(rf'= "{side}\.cli:main"', f'= "edgetrain.{side}.cli:main"', text)
    packages = "\n".join(f'    "{p}",' for p in _packages())
    block = (
        "[tool.setuptools]\n"
        "# One import name: agent/ and coordinator/ stay top-level folders of the repository and install as\n"
        "# edgetrain.agent and edgetrain.coordinator (tools/rename_packages.py writes this list; run it again after\n"
        "# adding a package, tests/unit/test_packaging.py fails until then).\n"
        'package-dir = { "edgetrain" = "edgetrain", "edgetrain.agent" = "agent", '
        '"edgetrain.coordinator" = "coordinator" }\n'
        f"packages = [\n{packages}\n]\n"
    )
    lines = text.splitlines(keepends=True)
    heads = [i for i, line in enumerate(lines)
             if line.strip() in ("[tool.setuptools.packages.find]", "[tool.setuptools]")]
    if not heads:
        raise SystemExit("pyproject.toml: no [tool.setuptools] or [tool.setuptools.packages.find] table to replace")
    start = heads[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))  # the next table
    return "".join(lines[:start]) + block + "\n" + "".join(lines[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    args = parser.parse_args()
    changed = []
    for path in _files():
        rel = path.relative_to(ROOT)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if rel == Path("pyproject.toml"):
            new = rewrite_pyproject(text)
        elif path.suffix == ".py":
            new = rewrite_python(text, rel)
        else:
            new = rewrite_text(text)
        if new != text:
            changed.append(rel)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for rel in changed:
        print(f"{'would change' if args.check else 'changed'} {rel}")
    py = [str(ROOT / rel) for rel in changed if rel.suffix == ".py"]
    if py and not args.check:  # relative imports sort after absolute ones (ruff's isort rule, I001)
        ruff = shutil.which("ruff")
        if ruff is None:
            print("ruff not found: run `ruff check --select I --fix .` to sort the rewritten imports")
        else:
            subprocess.run([ruff, "check", "--select", "I", "--fix", "--quiet", *py], cwd=ROOT, check=False)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
