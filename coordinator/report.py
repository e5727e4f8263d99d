"""`coordinator report RUN_DIR`: a run's log (runlog.py) as PNG plots (for users without Grafana)."""

from __future__ import annotations

import json
from pathlib import Path

from .runlog import ReportError, RoundRecord, read_log


def training_times(records: list[RoundRecord]) -> list[float]:
    """Each record's training time, continuing across restarts.

    `elapsed_seconds` starts again from 0 when a run is resumed (`--resume` appends to the same log), so
    where it goes backwards the time of the earlier part is added, keeping the time axis monotonic.
    """
    times: list[float] = []
    offset = previous = 0.0
    for record in records:
        elapsed = float(record.elapsed_seconds)
        if elapsed < previous:
            offset += previous
        previous = elapsed
        times.append(offset + elapsed)
    return times


def read_confusion(run_dir: Path) -> tuple[list[str], list[list[int]], str] | None:
    """(class names, test confusion matrix of the model kept, a title) from the run's result.json; None without one."""
    path = run_dir / "result.json"
    if not path.exists():
        return None  # a run that has not finished (or one from before result.json)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        classes = [str(c) for c in result["classes"]]
        matrix = [[int(v) for v in row] for row in result["test"]["confusion"]]
        title = f"test {result['metric']} {float(result['test']['value']):.4f}, model of round {int(result['round'])}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not a run result ({exc})") from exc
    if len(matrix) != len(classes) or any(len(row) != len(classes) for row in matrix):
        raise ReportError(f"{path}: the confusion matrix is not {len(classes)} x {len(classes)}")
    return classes, matrix, title


def confusion_png(classes: list[str], matrix: list[list[int]], title: str, path: Path) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted), each row normalised, counts written in."""
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(30.0, max(6.0, 0.45 * k + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    rates = [[v / max(1, sum(row)) for v in row] for row in matrix]
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = list(range(k))
    ax.set_xticks(ticks, classes, rotation=90 if k > 6 else 0, fontsize=8 if k > 20 else 10)
    ax.set_yticks(ticks, classes, fontsize=8 if k > 20 else 10)
    if k <= 20:  # counts stay readable up to about 20 classes
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(matrix[t][p]), ha="center", va="center",
                        color="white" if rates[t][p] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path, out: Path) -> list[Path]:
    """Write the run's plots: accuracy.png, round_time.png and, once the run is over, confusion.png.

    accuracy.png: global test and per-node local accuracy against time; round_time.png: compute and
    communication per node and round; confusion.png: the kept model on test (from the run's result.json).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodes = sorted({n for r in records for n in r.nodes})

    fig, ax = plt.subplots(figsize=(8, 4.5))
    times = training_times(records)
    evaluated = [(t, r.test) for t, r in zip(times, records, strict=True) if r.test is not None]
    ax.plot([t for t, _ in evaluated], [test.accuracy for _, test in evaluated], "k-o", ms=3,
            label="global model (test)")
    for node in nodes:
        pts = [(t, r.nodes[node].accuracy) for t, r in zip(times, records, strict=True) if node in r.nodes]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], alpha=0.7, label=f"{node} (local batches)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Accuracy against time — {run_dir.name}")
    acc_png = out / "accuracy.png"
    fig.tight_layout()
    fig.savefig(acc_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(nodes))
    rounds = [r.round for r in records]
    for i, node in enumerate(nodes):
        xs = [r.round + (i - (len(nodes) - 1) / 2) * width for r in records if node in r.nodes]
        comp = [r.nodes[node].compute_seconds for r in records if node in r.nodes]
        comm = [r.nodes[node].communication_seconds for r in records if node in r.nodes]
        ax.bar(xs, comp, width, label=f"{node} compute")
        ax.bar(xs, comm, width, bottom=comp, label=f"{node} communication", alpha=0.6)
    ax.plot(rounds, [r.duration_seconds for r in records], "k.-", label="round wall time")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("Round time per node: compute and communication")
    time_png = out / "round_time.png"
    fig.tight_layout()
    fig.savefig(time_png, dpi=120)
    plt.close(fig)
    confusion = read_confusion(run_dir)
    if confusion is None:
        return [acc_png, time_png]
    return [acc_png, time_png, confusion_png(*confusion, out / "confusion.png")]
