"""Text recipes, measured: what chose the defaults (``sweep``), and what the defaults reach (``table``).

``one``: one process, one thread, train a text model epoch by epoch and print val and test scores after each
(the 1-process rows of docs/accuracy.md; the same data, model and training functions as the agents' workers).

``sweep``: one process, one thread, text-ngram on every task for each combination of class weighting, learning
rate, hash buckets, feature scaling, embedding width, weight averaging and input dropout (and, one at a time,
other batch sizes, n-gram ranges, weight decay, val-fitted logit offsets: the screening of docs/accuracy.md);
the model is evaluated four times an epoch and the one with the best val figure (the task's metric) is kept,
as a run does. Prints a markdown table of val (and, for the record, test) figures.

``table``: the product's own command with defaults only (``coordinator run --dataset tweeteval --data-dir DIR
--local-agents 2``; ``--dataset tweets`` for the embedded corpus), 3 seeds per task; prints the median of the
test figure (the model picked on val) and of the val figure, per task, as markdown.

    python bench/text_recipes.py one --model text-gru --lr 0.003 --class-weighting balanced --epochs 4
    flock /tmp/edgetrain-bench.lock python bench/text_recipes.py sweep
    python bench/text_recipes.py table    # each run takes /tmp/edgetrain-bench.lock itself
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain import recipes  # noqa: E402
from edgetrain.datasets import load_dataset  # noqa: E402
from edgetrain.models import ModelInput, build_model, log_count_ratios  # noqa: E402
from edgetrain.spec import DataLocation, RunSpec  # noqa: E402
from edgetrain.training import (  # noqa: E402
    EvalResult,
    balanced_class_weights,
    batch_plan,
    confusion,
    confusion_scores,
    evaluate,
    make_optimizer,
    set_lr,
    train_steps,
)
from edgetrain.workload import load_workload  # noqa: E402

# ../shared/data beside a checkout (the team's layout), else $EDGETRAIN_SHARED_DATA
DATA = Path(os.environ.get("EDGETRAIN_SHARED_DATA") or next(
    (p for p in (ROOT.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
    ROOT.parent / "shared" / "data")) / "tweets"
# task -> (--dataset, --data-dir, the TweetEval paper's best non-pretrained test figure)
TASKS: dict[str, tuple[str, Path | None, float | None]] = {
    "tweets": ("tweets", None, None),
    "sentiment": ("tweeteval", DATA / "tweeteval-sentiment", 62.9),
    "emotion": ("tweeteval", DATA / "tweeteval-emotion", 66.0),
    "hate": ("tweeteval", DATA / "tweeteval-hate", 52.6),
    "irony": ("tweeteval", DATA / "tweeteval-irony", 63.1),
    "offensive": ("tweeteval", DATA / "tweeteval-offensive", 73.4),
}


def one(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    spec = RunSpec(dataset=args.dataset, model=args.model, lr=args.lr, lr_decay=args.lr_decay,
                   class_weighting=args.class_weighting, batch_size=args.batch_size)
    where = DataLocation(data_dir=args.data_dir if args.dataset != "tweets" else None, download=False)
    wl = load_workload(spec, where)
    model = wl.new_model()
    opt = make_optimizer(model, wl.spec.train_config())
    x, y = wl.data.train.x, wl.data.train.y
    n = len(y)
    steps = n // spec.batch_size
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        set_lr(opt, wl.spec.lr_at(epoch))
        plan = batch_plan(torch.arange(n), seed=spec.seed, rank=0, start_sample=epoch * steps * spec.batch_size,
                          steps=steps, batch_size=spec.batch_size)
        train_steps(model, opt, x, y, plan, seed=epoch, class_weights=wl.class_weights())
        val = evaluate(model, wl.data.val.x, wl.data.val.y, wl.data.num_classes) if wl.data.val else None
        test = evaluate(model, wl.data.test.x, wl.data.test.y, wl.data.num_classes)
        val_text = f"val macro-recall {val.macro_recall:.4f} | " if val else ""
        print(f"{wl.model_name} epoch {epoch + 1}/{args.epochs} {time.perf_counter() - t0:5.0f} s | {val_text}"
              f"test macro-recall {test.macro_recall:.4f} accuracy {test.accuracy:.4f} macro-F1 {test.macro_f1:.4f}",
              flush=True)


def _features(char_sizes: str, word_trigrams: bool) -> None:
    """Screening only: other character n-gram sizes, and word trigrams beside the bigrams."""
    from edgetrain.datasets import text

    text.CHAR_NGRAM_SIZES = tuple(int(v) for v in char_sizes.split(","))  # type: ignore[misc]
    if word_trigrams:
        plain = text.ngram_ids

        def with_trigrams(tokens: Any, buckets: int = text.NGRAM_BUCKETS) -> list[int]:
            ids = set(plain(tokens, buckets))
            ids.update(text._hash(f"t {a} {b} {c}", buckets) for a, b, c in
                       zip(tokens, tokens[1:], tokens[2:], strict=False))
            return sorted(ids)

        text.ngram_ids = with_trigrams  # type: ignore[assignment]


def sweep(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _features(args.char_sizes, args.word_trigrams)
    print(f"char n-grams {args.char_sizes}, word trigrams {args.word_trigrams}")
    print(f"lr decay {args.lr_decay or 'the rule'} per epoch, weight decay {args.weight_decay:g}, seed {args.seed}")
    print("| task | train | skew | weighting | lr | buckets | feature scaling | embedding | EMA half-life | "
          "input dropout | best val | test there | at epoch | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        dataset, folder, _ = TASKS[task]
        for buckets in [int(b) for b in args.buckets.split(",")]:
            data = load_dataset(dataset, data_dir=folder, text_features="ngrams", ngram_buckets=buckets or None,
                                download=False)
            assert data.val is not None
            counts = torch.bincount(data.train.y, minlength=data.num_classes).tolist()
            metric = recipes.resolve_metric(recipes.default_metric(dataset, data.classes, counts), data.classes)
            n = len(data.train)
            epochs = recipes.epochs(recipes.TEXT_MODEL, n) if args.epochs == 0 else args.epochs
            for scaling, weighting, lr, dim, half_life, drop in itertools.product(
                    args.scaling.split(","),
                    [recipes.class_weighting(counts, metric.name) if w == "auto" else w
                     for w in args.weighting.split(",")],
                    [float(v) for v in args.lr.split(",")],
                    [int(v) for v in args.dims.split(",")],
                    [float(v) for v in args.ema.split(",")],
                    [float(v) for v in args.input_dropout.split(",")]):
                t0 = time.perf_counter()
                inp = ModelInput(data.num_classes, 2, data.ngram_buckets, dim)
                if scaling == "log-count-ratio":
                    inp = replace(inp, ngram_scale=log_count_ratios(data.train.x, data.train.y, data.num_classes,
                                                                    data.ngram_buckets, recipes.NGRAM_SCALING_ALPHA))
                model = build_model(recipes.TEXT_MODEL, inp, seed=args.seed)
                if drop > 0:
                    model.register_forward_pre_hook(_input_dropout(drop))
                decay = args.lr_decay or recipes.lr_decay(recipes.TEXT_MODEL, n)
                spec = RunSpec(dataset=dataset, model=recipes.TEXT_MODEL, lr=lr, lr_decay=decay,
                               weight_decay=args.weight_decay, batch_size=args.batch_size)
                opt = make_optimizer(model, spec.train_config())
                balanced = weighting == "balanced"
                weights = balanced_class_weights(data.train.y, data.num_classes) if balanced else None
                chunk = max(1, n // spec.batch_size // args.evals_per_epoch)
                # the weights' exponential average, half-life `half_life` epochs, evaluated in their place
                averaged = copy.deepcopy(model) if half_life > 0 else None
                beta = 0.5 ** (chunk * spec.batch_size / n / half_life) if half_life > 0 else 0.0
                best = (-1.0, 0.0, 0.0)
                pos = 0
                while pos < epochs * n:
                    set_lr(opt, spec.lr_at(pos // n))
                    plan = batch_plan(torch.arange(n), seed=args.seed, rank=0, start_sample=pos, steps=chunk,
                                      batch_size=spec.batch_size)
                    train_steps(model, opt, data.train.x, data.train.y, plan, seed=pos, class_weights=weights)
                    pos += chunk * spec.batch_size
                    judged = model
                    if averaged is not None:
                        with torch.no_grad():
                            for a, p in zip(averaged.parameters(), model.parameters(), strict=True):
                                a.lerp_(p, 1 - beta)
                        judged = averaged
                    val = evaluate(judged, data.val.x, data.val.y, data.num_classes).value(
                        metric.name, metric.class_index)
                    if val > best[0]:
                        test = evaluate(judged, data.test.x, data.test.y, data.num_classes).value(
                            metric.name, metric.class_index)
                        best = (val, test, pos / n)
                        kept = copy.deepcopy(judged)
                if args.calibrate:
                    _calibration(kept, data, metric)
                print(f"| {task} ({metric.name}) | {n} | {recipes.skew(counts):.2f} | {weighting} | {lr:g} | "
                      f"{data.ngram_buckets} | {scaling} | {dim} | {half_life:g} | {drop:g} | "
                      f"{100 * best[0]:.1f} | {100 * best[1]:.1f} | {best[2]:.2f} | "
                      f"{time.perf_counter() - t0:.0f} |", flush=True)


def _scores(logits: torch.Tensor, y: torch.Tensor, k: int, metric: recipes.Metric) -> float:
    pred = logits.argmax(1)
    cm = confusion(pred, y, k)
    f1, recall = confusion_scores(cm)
    result = EvalResult(len(y), 0.0, float((pred == y).double().mean()), f1, recall,
                        tuple(tuple(int(v) for v in row) for row in cm.tolist()))
    return result.value(metric.name, metric.class_index)


def _fit_offsets(logits: torch.Tensor, y: torch.Tensor, k: int, metric: recipes.Metric) -> torch.Tensor:
    """Per-class logit offsets that maximise the metric on (logits, y): coordinate ascent over a grid."""
    off = torch.zeros(k)
    grid = torch.linspace(-1.0, 1.0, 41) * float(logits.std())
    for _ in range(3):
        for c in range(k):
            best = (_scores(logits + off, y, k, metric), -abs(float(off[c])), float(off[c]))
            for d in grid.tolist():
                trial = off.clone()
                trial[c] = d
                cand = (_scores(logits + trial, y, k, metric), -abs(d), d)
                if cand > best:
                    best = cand
            off[c] = best[2]
    return off


@torch.no_grad()
def _calibration(model: nn.Module, data: Any, metric: recipes.Metric) -> None:
    """Bias offsets fitted on val for the metric: 2-fold on val (fit on one half, score the other), and test."""
    model.eval()
    k = data.num_classes
    lv, yv = model(data.val.x), data.val.y
    lt, yt = model(data.test.x), data.test.y
    halves = torch.randperm(len(yv), generator=torch.Generator().manual_seed(0)).chunk(2)
    raw, cal = [], []
    for a, b in (halves, halves[::-1]):
        off = _fit_offsets(lv[a], yv[a], k, metric)
        raw.append(_scores(lv[b], yv[b], k, metric))
        cal.append(_scores(lv[b] + off, yv[b], k, metric))
    off = _fit_offsets(lv, yv, k, metric)
    print(f"    calibration: val 2-fold raw {100 * sum(raw) / 2:.1f} -> calibrated {100 * sum(cal) / 2:.1f}; "
          f"test raw {100 * _scores(lt, yt, k, metric):.1f} -> {100 * _scores(lt + off, yt, k, metric):.1f} "
          f"(offsets {[round(v, 2) for v in off.tolist()]})", flush=True)


def _input_dropout(p: float) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor] | None]:
    """A forward pre-hook that zeroes (pads out) a share `p` of the n-gram ids of each text in training."""
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
        if not module.training:
            return None
        x = inputs[0]
        return (x * (torch.rand(x.shape) >= p),)
    return hook


def _run(task: str, seed: int, extra: list[str], lock: str) -> dict[str, object]:
    dataset, folder, _ = TASKS[task]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = (["flock", lock] if lock else []) + [
            "coordinator", "run", "--dataset", dataset, "--local-agents", "2", "--seed", str(seed),
            "--run-dir", f"{tmp}/run", "--no-progress", "--port", "0", *extra]
        if folder is not None:
            cmd += ["--data-dir", str(folder)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        result: dict[str, object] = json.loads(Path(f"{tmp}/run/result.json").read_text())
        rounds = Path(f"{tmp}/run/rounds.jsonl").read_text().splitlines()
        result["train_seconds"] = json.loads(rounds[-1])["elapsed_seconds"]
        return result


def table(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = args.extra.split() if args.extra else []
    print("| task | metric | target | test (median) | val (median) | test per seed | val per seed | "
          "test accuracy (median) | majority-class test | training s (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        runs = [_run(task, seed, extra, args.lock) for seed in seeds]
        metric = str(runs[0]["metric"])
        test = [100 * float(r["test"]["value"]) for r in runs]  # type: ignore[index]
        val = [100 * float(r["val"]["value"]) for r in runs if r.get("val")]  # type: ignore[index]
        target = TASKS[task][2] if task != "tweets" else 75.0
        acc = statistics.median(100 * float(r["test"]["accuracy"]) for r in runs)  # type: ignore[index]
        base = 100 * float(runs[0]["majority"]["value"])  # type: ignore[index]
        wall = statistics.median(float(r["train_seconds"]) for r in runs)  # type: ignore[arg-type]
        print(f"| {task} | {metric} | {target} | **{statistics.median(test):.1f}** | "
              f"{statistics.median(val):.1f} | {' / '.join(f'{v:.1f}' for v in test)} | "
              f"{' / '.join(f'{v:.1f}' for v in val)} | {acc:.1f} | {base:.1f} | {wall:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("one", help="one model, epoch by epoch")
    o.add_argument("--dataset", default="tweeteval-sentiment")
    o.add_argument("--data-dir", type=Path, default=DATA / "tweeteval-sentiment")
    o.add_argument("--model", default="text-gru")
    o.add_argument("--lr", type=float, default=3e-3)
    o.add_argument("--lr-decay", type=float, default=1.0)
    o.add_argument("--class-weighting", default="balanced")
    o.add_argument("--epochs", type=int, default=4)
    o.add_argument("--batch-size", type=int, default=64)
    s = sub.add_parser("sweep", help="text-ngram recipes per task, picked on val")
    s.add_argument("--tasks", default=",".join(TASKS))
    s.add_argument("--weighting", default="none,balanced", help="comma-separated; auto: the rule's")
    s.add_argument("--lr", default="0.1")
    s.add_argument("--buckets", default="0", help="comma-separated; 0: the rule's")
    s.add_argument("--dims", default="0", help="text-ngram's feature embedding widths, comma-separated; 0: none")
    s.add_argument("--seed", type=int, default=0, help="of the initial weights and the batch order")
    s.add_argument("--epochs", type=float, default=0, help="0: the rule's")
    s.add_argument("--lr-decay", type=float, default=0, help="0: the rule's")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--ema", default="0", help="half-lives (epochs) of an average of the weights judged in their "
                   "place, comma-separated; 0: the weights themselves")
    s.add_argument("--input-dropout", default="0", help="share of a text's n-gram ids dropped in training")
    s.add_argument("--evals-per-epoch", type=int, default=4)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--char-sizes", default="2,3,4,5")
    s.add_argument("--word-trigrams", action="store_true")
    s.add_argument("--scaling", default=recipes.NGRAM_SCALING,
                   help="text-ngram's feature scaling, comma-separated: log-count-ratio (NBSVM's) or none")
    s.add_argument("--calibrate", action="store_true", help="also fit per-class logit offsets on val (screening)")
    t = sub.add_parser("table", help="the product's defaults, 3 seeds per task")
    t.add_argument("--tasks", default="sentiment,emotion,hate,irony,offensive,tweets")
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--extra", default="", help="more coordinator options (to compare against the defaults)")
    t.add_argument("--lock", default="/tmp/edgetrain-bench.lock",
                   help="run each training under flock on this file ('' for none): one benchmark at a time")
    args = p.parse_args()
    {"one": one, "sweep": sweep, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
