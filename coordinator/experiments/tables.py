"""The experiments' tables: cells, Markdown and the terminal's rich table."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from edgetrain.models import default_lr

from .common import BenchSettings


def num_cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def csv_cell(value: float | None) -> str:
    return "" if value is None else repr(value)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A report's rows as CSV (figures as repr, so they read back exactly)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_report(out: Path, stem: str, markdown: str, csv_of: Callable[[Path], Path],
                 png_of: Callable[[Path], Path]) -> list[Path]:
    """A report's three files in `out`: STEM.md (the write-up), STEM.csv and STEM.png."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    md.write_text(markdown, encoding="utf-8")
    return [md, csv_of(out / f"{stem}.csv"), png_of(out / f"{stem}.png")]


def markdown_head(bench: str, s: BenchSettings, model: str, machine: str) -> list[str]:
    """The first lines of a report's write-up: which bench, data, model, machine and settings."""
    return [f"# bench {bench}: {s.dataset}, {model}", "", f"- Machine: {machine}",
            f"- Settings: {settings_line(s, model)}"]


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in items) + " |"

    align = ["---" if i < 1 or h in ("cores", "note", "method", "sweep") else "---:" for i, h in enumerate(headers)]
    return "\n".join([line(headers), "| " + " | ".join(align) + " |", *(line(c) for c in cells)])


_SHORT = {  # the terminal table's headers (the Markdown and CSV keep the long ones)
    "processes x threads": "PxT", "time s (median)": "median s", "time to target s": "to target s",
    "test accuracy %": "acc %", "speed-up vs serial": "vs serial", "speed-up vs DDP": "vs DDP",
    "% gain vs slowest": "gain %", "mean ms": "mean", "median ms": "median", "other load % (max)": "other %",
}


def rich_table(title: str, headers: Sequence[str], cells: Sequence[Sequence[str]], caption: str = "") -> Table:
    table = Table(title=title, caption=caption or None)
    for h in headers:
        short = _SHORT.get(h, h.removeprefix("time s ").removeprefix("time ms "))
        table.add_column(short, justify="left" if h in ("method", "sweep", "cores", "note") else "right")
    for c in cells:
        table.add_row(*c)
    return table


def settings_line(s: BenchSettings, model: str) -> str:
    return (f"data set `{s.dataset}` (limit {s.limit or 'none'}), model `{model}`, {s.epochs:g} epoch(s), "
            f"batch {s.batch_size} per worker, {s.optimizer} lr {s.spec().lr or default_lr(model):g} "
            f"(x{s.lr_decay:g} per epoch), "
            f"seed {s.seed}, {s.repeats} repeat(s)")
