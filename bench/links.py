"""Rounds over real links: the MNIST CNN with 2 agents, each agent on its own emulated host behind a shaped link.

For each link x local steps K x update encoding it runs the real CLIs (`coordinator run` on host "coord",
`edge-agent start` on hosts "a" and "b", pinned to one core each; tests/integration/netns.py) and reads the run's
rounds.jsonl: median time per round and samples/s over the rounds after the first (the first includes the
workers' warm-up). Each agent's link is shaped both ways: rate with tc tbf, one-way delay with the harness's
relay (so RTT = 2 x delay), loss with iptables; the coordinator's own link is not shaped.

Accuracy at a fixed sample budget is measured once per (K, encoding), on loopback: with deterministic shards
the link changes only when updates arrive, never what they hold (tests/integration/test_netns.py checks this
bit for bit), so the same budget gives the same model on every link. The time the budget takes on a link is
its rounds x the link's time per round.

    flock /tmp/edgetrain-bench.lock python bench/links.py --out docs/img/links.png
    flock /tmp/edgetrain-bench.lock python bench/links.py --links 100M --ks 8 --dtypes float32   # one cell
    flock /tmp/edgetrain-bench.lock python bench/links.py --auto --links loopback,100M --budget 120000 --repeats 2

`--auto`: instead of the grid, the defaults (`--local-steps auto --update-dtype auto`, coordinator/adapt.py) on
each link, each run trained to the same sample budget on that link itself (the choice depends on the link, so
accuracy cannot come from loopback): samples/s over the whole run (its first round, the warm-up, left out) and
over the rounds after the choice, the choice, and test accuracy at the budget; ratios against loopback.

Needs root, iproute2 and iptables (as the harness does), and MNIST's 4 IDX files in --data-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.procs import free_port  # noqa: E402
from tests.integration.netns import Cluster, unavailable  # noqa: E402


@dataclass(frozen=True)
class Link:
    name: str
    rate_bits: float | None  # None: not shaped
    delay_s: float  # one way
    loss: float


LINKS = {
    "loopback": Link("loopback (one host)", None, 0.0, 0.0),
    "10G": Link("10 GbE, 0.1 ms", 10e9, 0.0001, 0.0),
    "1G": Link("1 GbE, 0.5 ms", 1e9, 0.0005, 0.0),
    "100M": Link("100 Mbit/s, 20 ms", 100e6, 0.020, 0.0),
    "20M": Link("20 Mbit/s, 50 ms, 1 % loss", 20e6, 0.050, 0.01),
}
BATCH = 64
PORT = 50051
CORES = sorted(os.sched_getaffinity(0))


def train_args(data_dir: Path, k: int | str, dtype: str, stop: list[str], run_dir: Path) -> list[str]:
    """`stop`: the stopping rule, ["--rounds", N] or ["--epochs", E]."""
    return ["--dataset", "mnist", "--data-dir", str(data_dir), "--model", "mnist-cnn", "--seed", "0",
            "--batch-size", str(BATCH), "--local-steps", str(k), "--update-dtype", dtype, *stop,
            "--min-agents", "2", "--round-timeout", "600", "--join-timeout", "300", "--eval-every", "100000",
            "--no-progress", "--run-dir", str(run_dir)]


def run_once(link: Link, net: Cluster | None, data_dir: Path, k: int | str, dtype: str, rounds: int | list[str],
             folder: Path) -> list[dict[str, Any]]:
    """One run of `rounds` rounds (or to a stopping rule); its rounds.jsonl records (the last one holds the final
    evaluation). Its result.json stays in `folder`/run."""
    run_dir = folder / "run"
    py = [sys.executable, "-m"]
    if net is None:
        host, port, wrap = "127.0.0.1", free_port(), {"coord": [], "a": [], "b": []}
    else:
        host, port = net.address("coord"), PORT
        wrap = {h: net.wrap(h) for h in ("coord", "a", "b")}
    stop = rounds if isinstance(rounds, list) else ["--rounds", str(rounds)]
    coord_cmd = [*wrap["coord"], *py, "edgetrain.coordinator", "run", *train_args(data_dir, k, dtype, stop, run_dir),
                 "--host", host, "--port", str(PORT if net else port)]
    if net is not None:
        coord_cmd.append("--insecure")  # plaintext across the emulated hosts: TLS is not what is measured
    agent_port = port
    relay = None
    if net is not None and link.delay_s:
        relay = net.relay("coord", PORT, delay_s=link.delay_s)
        agent_port = relay.port
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        log = open(folder / "coordinator.log", "wb")  # noqa: SIM115 - the child holds it
        logs.append(log)
        procs.append(subprocess.Popen(coord_cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        for name, core in (("a", CORES[0]), ("b", CORES[-1])):
            log = open(folder / f"{name}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(
                [*wrap[name], *py, "edgetrain.agent", "start", "--coordinator", f"{host}:{agent_port}", "--cores",
                 str(core),
                 "--name", name, "--data-dir", str(data_dir), "--give-up-after", "120"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        if procs[0].wait(3600) != 0:
            raise RuntimeError(f"coordinator failed: {(folder / 'coordinator.log').read_text()[-2000:]}")
        for p in procs[1:]:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        if relay is not None:
            relay.close()
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def shaped(link: Link) -> Cluster:
    net = Cluster(["coord", "a", "b"])
    try:
        for name in ("a", "b"):
            if link.rate_bits is not None:
                net.shape(name, link.rate_bits)
            if link.loss:
                net.lose(name, link.loss)
    except BaseException:
        net.close()
        raise
    return net


def timing(records: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Median seconds per round, samples/s, and MB per update, over the rounds after the first."""
    rest = records[1:] or records
    per_round = statistics.median(r["duration_seconds"] for r in rest)
    samples = statistics.median(r["samples"] for r in rest)
    mb = statistics.median(n["bytes"] for r in rest for n in r["nodes"].values()) / 1e6
    return per_round, samples / per_round, mb


def train_examples(data_dir: Path) -> int:
    """The MNIST training split's size, as the coordinator loads it (its epochs count these)."""
    from edgetrain.spec import DataLocation, RunSpec
    from edgetrain.workload import load_workload

    return len(load_workload(RunSpec(dataset="mnist", model="mnist-cnn"), DataLocation(data_dir=data_dir)).data.train)


def auto_cells(links: list[Link], data_dir: Path, budget: int, repeats: int) -> list[dict[str, Any]]:
    """The defaults on each link, to `budget` samples there: the rows of the --auto table (see the docstring)."""
    epochs = budget / train_examples(data_dir)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="links-auto-") as tmp:
        for rep in range(repeats):  # links innermost: each repetition compares them under the same load
            for link in links:
                net = shaped(link) if link.rate_bits is not None or link.delay_s else None
                folder = Path(tempfile.mkdtemp(dir=tmp))
                try:
                    records = run_once(link, net, data_dir, "auto", "auto", ["--epochs", f"{epochs:.6f}"], folder)
                finally:
                    if net is not None:
                        net.close()
                result = json.loads((folder / "run" / "result.json").read_text())
                rest = records[1:]
                chosen = (result["local_steps"], result["update_dtype"])
                after = [r for r in rest if (r["local_steps"], r["update_dtype"]) == chosen]
                switched = next((r["round"] for r in records if (r["local_steps"], r["update_dtype"]) == chosen), 0)
                rows.append({
                    "link": link.name, "repeat": rep, "k": chosen[0], "dtype": chosen[1], "from_round": switched,
                    "samples": sum(r["samples"] for r in records),
                    "samples_s": sum(r["samples"] for r in rest) / sum(r["duration_seconds"] for r in rest),
                    "after_s": (sum(r["samples"] for r in after) / sum(r["duration_seconds"] for r in after)
                                if after else float("nan")),
                    "accuracy": records[-1]["accuracy"], "wall_s": records[-1]["elapsed_seconds"]})
                r = rows[-1]
                print(f"| {r['link']} | {rep + 1} | K {r['k']}, {r['dtype']} (from round {r['from_round']}) | "
                      f"{r['samples']:,} | {r['samples_s']:,.0f} | {r['after_s']:,.0f} | {r['wall_s']:.1f} s | "
                      f"{r['accuracy']:.4f} |", flush=True)
    return rows


def auto_summary(rows: list[dict[str, Any]], links: list[Link]) -> None:
    """Medians per link, and each link's ratios against loopback's (the issue's target: >= 0.8x, within 0.5 points)."""
    base = [r for r in rows if r["link"] == LINKS["loopback"].name]
    if not base:
        return
    b_sps = statistics.median(r["samples_s"] for r in base)
    b_acc = statistics.median(r["accuracy"] for r in base)
    print("\n| link | samples/s (median) | x loopback | test accuracy (median) | points from loopback |\n"
          "|---|---|---|---|---|")
    for link in links:
        mine = [r for r in rows if r["link"] == link.name]
        sps = statistics.median(r["samples_s"] for r in mine)
        acc = statistics.median(r["accuracy"] for r in mine)
        print(f"| {link.name} | {sps:,.0f} | {sps / b_sps:.2f} | {acc:.4f} | {100 * (acc - b_acc):+.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--links", default=",".join(LINKS))
    p.add_argument("--ks", default="1,8,32")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--timed-rounds", type=int, default=4, help="Rounds timed per cell (after one warm-up round).")
    p.add_argument("--budget", type=int, default=2 * 32 * BATCH * 8,
                   help="Samples (both agents together) for the accuracy column.")
    p.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/mnist"))
    p.add_argument("--out", type=Path, help="Write a PNG of samples/s per link here.")
    p.add_argument("--auto", action="store_true", help="The defaults (auto K and dtype) per link, to --budget.")
    p.add_argument("--repeats", type=int, default=1, help="--auto: runs per link.")
    args = p.parse_args()
    links = [LINKS[name] for name in args.links.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    dtypes = args.dtypes.split(",")
    if any(link.rate_bits is not None or link.delay_s for link in links):
        reason = unavailable()
        if reason is not None:
            sys.exit(f"error: {reason}")
    if args.auto:
        print(f"\nMNIST CNN, 2 agents x 1 core, batch {BATCH}, the defaults (--local-steps auto --update-dtype auto), "
              f"{args.budget:,} samples on each link\n")
        print("| link | run | choice | samples | samples/s | samples/s after the choice | wall | test accuracy |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
        auto_summary(auto_cells(links, args.data_dir, args.budget, args.repeats), links)
        return

    from rich.progress import Progress

    accuracy: dict[tuple[int, str], float] = {}
    rows: list[dict[str, Any]] = []
    cells = len(ks) * len(dtypes) * (1 + len(links))
    print(f"\nMNIST CNN, 2 agents x 1 core, batch {BATCH}; accuracy after {args.budget:,} samples (on loopback); "
          f"time per round: median of {args.timed_rounds} rounds after the first\n")
    print("| link | K | update | MB up per update | s per round | samples/s | time for the budget "
          "| test accuracy |\n|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="links-") as tmp, Progress() as bar:
        task = bar.add_task("runs", total=cells)
        # (K, encoding) outermost, in the order given: a grid cut short (the shared bench lock) has every link
        # of its first cells, which compare, rather than every cell of one link
        for dtype in dtypes:
            for k in ks:
                rounds = max(1, args.budget // (2 * k * BATCH))
                records = run_once(LINKS["loopback"], None, args.data_dir, k, dtype, rounds,
                                   Path(tempfile.mkdtemp(dir=tmp)))  # accuracy at the budget, on loopback
                accuracy[(k, dtype)] = records[-1]["accuracy"]
                bar.update(task, advance=1, description=f"accuracy K={k} {dtype}: {accuracy[(k, dtype)]:.4f}")
                for link in links:
                    net = shaped(link) if link.rate_bits is not None or link.delay_s else None
                    t0 = time.monotonic()
                    try:
                        records = run_once(link, net, args.data_dir, k, dtype, 1 + args.timed_rounds,
                                           Path(tempfile.mkdtemp(dir=tmp)))
                    finally:
                        if net is not None:
                            net.close()
                    per_round, sps, mb = timing(records)
                    rows.append({"link": link.name, "k": k, "dtype": dtype, "mb": mb, "round_s": per_round,
                                 "samples_s": sps, "budget_s": rounds * per_round, "accuracy": accuracy[(k, dtype)]})
                    print(row(rows[-1]), flush=True)  # as it comes: a cut-short grid keeps what it measured
                    bar.update(task, advance=1, description=f"{link.name} K={k} {dtype}: {per_round:.3f} s/round "
                                                            f"({time.monotonic() - t0:.0f} s)")
    if args.out is not None:
        plot(rows, links, ks, dtypes, args.out)
        print(f"\nwrote {args.out}")


def row(r: dict[str, Any]) -> str:
    return (f"| {r['link']} | {r['k']} | {r['dtype']} | {r['mb']:.2f} | {r['round_s']:.3f} | {r['samples_s']:,.0f} | "
            f"{r['budget_s']:.1f} s | {r['accuracy']:.4f} |")


def plot(rows: list[dict[str, Any]], links: list[Link], ks: list[int], dtypes: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 4), sharey=True, squeeze=False)
    width = 0.8 / len(dtypes)
    for ax, k in zip(axes[0], ks, strict=True):
        for i, dtype in enumerate(dtypes):
            ys = [next((r["samples_s"] for r in rows if r["link"] == link.name and r["k"] == k
                        and r["dtype"] == dtype), 0.0) for link in links]
            ax.bar([x + i * width for x in range(len(links))], ys, width, label=dtype)
        ax.set_xticks([x + width * (len(dtypes) - 1) / 2 for x in range(len(links))])
        ax.set_xticklabels([link.name.replace(", ", "\n") for link in links], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"K = {k}")
    axes[0][0].set_ylabel("samples/s (2 agents)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("MNIST CNN over emulated links (bench/links.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
