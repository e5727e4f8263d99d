"""One process, one thread: train a text model epoch by epoch and print val and test scores after each.

The 1-process rows of docs/accuracy.md come from this script; it uses the same data, model and training
functions as the agents' workers (edgetrain.workload / edgetrain.training), without the protocol around them.

    python bench/text_recipes.py --model text-gru --lr 0.003 --class-weighting balanced --epochs 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.spec import DataLocation, RunSpec  # noqa: E402
from edgetrain.training import batch_plan, evaluate, make_optimizer, set_lr, train_steps  # noqa: E402
from edgetrain.workload import load_workload  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="tweeteval-sentiment")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "tweets" / "tweeteval-sentiment")
    p.add_argument("--model", default="text-gru")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-decay", type=float, default=1.0)
    p.add_argument("--class-weighting", default="balanced")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    spec = RunSpec(dataset=args.dataset, model=args.model, lr=args.lr, lr_decay=args.lr_decay,
                   class_weighting=args.class_weighting, batch_size=args.batch_size)
    where = DataLocation(data_dir=args.data_dir if args.dataset != "tweets" else None, download=False)
    wl = load_workload(spec, where)
    model = wl.new_model()
    opt = make_optimizer(model, spec.train_config())
    x, y = wl.data.train.x, wl.data.train.y
    n = len(y)
    steps = n // spec.batch_size
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        set_lr(opt, spec.lr_at(epoch))
        plan = batch_plan(torch.arange(n), seed=spec.seed, rank=0, start_sample=epoch * steps * spec.batch_size,
                          steps=steps, batch_size=spec.batch_size)
        train_steps(model, opt, x, y, plan, seed=epoch, class_weights=wl.class_weights())
        val = evaluate(model, wl.data.val.x, wl.data.val.y, wl.data.num_classes) if wl.data.val else None
        test = evaluate(model, wl.data.test.x, wl.data.test.y, wl.data.num_classes)
        val_text = f"val macro-recall {val.macro_recall:.4f} | " if val else ""
        print(f"{args.model} epoch {epoch + 1}/{args.epochs} {time.perf_counter() - t0:5.0f} s | {val_text}"
              f"test macro-recall {test.macro_recall:.4f} accuracy {test.accuracy:.4f} macro-F1 {test.macro_f1:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
