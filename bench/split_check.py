"""Check --workers auto's probe against the truth: the full `bench affinity --layout` sweep, in the same session.

    flock /tmp/edgetrain-bench.lock python bench/split_check.py --dataset tweets --probes 3 --epochs 0.5 --repeats 3

Runs the probe `--probes` times (each with an empty cache, so each measures), then the layout sweep over the same
candidates (every P x T of the allowed cores) with `coordinator bench affinity`'s code, and prints whether each
probe's choice is the sweep's fastest layout or within 5 % of its samples/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgetrain.coordinator import experiments as ex
from rich.console import Console

from edgetrain.cores import allowed_cores
from edgetrain.spec import DataLocation
from edgetrain.split import candidates, choose_split, split_table

WITHIN = 0.05


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="tweets")
    ap.add_argument("--model", default="")
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--max-other-load", type=float, default=25.0)
    ap.add_argument("--retries", type=int, default=2)
    args = ap.parse_args()
    out = Console(width=160)
    cores = allowed_cores()
    settings = ex.BenchSettings(dataset=args.dataset, model=args.model, epochs=args.epochs, repeats=args.repeats,
                                quiet_wait=args.quiet_wait, max_other_load=args.max_other_load,
                                retries=args.retries)
    choices = []
    for i in range(args.probes):
        ex.wait_until_quiet(args.quiet_wait)
        with tempfile.TemporaryDirectory() as cache:
            split = choose_split(settings.spec(), DataLocation(), cores, mode="ddp", cache_dir=Path(cache),
                                 say=out.print)
        out.print(split_table(split, title=f"probe {i + 1}/{args.probes}"))
        choices.append(split)
    report = ex.run_affinity(settings, layouts=candidates(len(cores)), progress=True)
    out.print(ex.rich_table(f"bench affinity --layout: {args.dataset}, {report.facts.model}",
                            ex.affinity_headers(args.repeats), ex.affinity_cells(report),
                            caption=report.machine.describe()))
    print(ex.markdown_table(ex.affinity_headers(args.repeats), ex.affinity_cells(report)))
    rates = {(r.processes, r.threads): r.samples_per_s for r in report.rows}
    fastest = max(rates, key=lambda k: rates[k])
    print(f"\nsweep's fastest: {fastest[0]}x{fastest[1]} ({rates[fastest]:.0f} samples/s); "
          f"{ex.chosen_sentence(report)}")
    ok = True
    for i, split in enumerate(choices, 1):
        rate = rates[(split.processes, split.threads)]
        short = 1 - rate / rates[fastest]
        good = short <= WITHIN
        ok &= good
        print(f"probe {i}: chose {split.label} in {split.probe_seconds:.1f} s; the sweep measured it at {rate:.0f} "
              f"samples/s, {short * 100:.1f} % below the fastest -> {'OK' if good else 'NOT within 5 %'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
