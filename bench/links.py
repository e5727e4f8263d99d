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


def train_args(data_dir: Path, k: int, dtype: str, rounds: int, run_dir: Path) -> list[str]:
    return ["--dataset", "mnist", "--data-dir", str(data_dir), "--model", "mnist-cnn", "--seed", "0",
            "--batch-size", str(BATCH), "--local-steps", str(k), "--update-dtype", dtype, "--rounds", str(rounds),
            "--min-agents", "2", "--round-timeout", "600", "--join-timeout", "300", "--eval-every", "100000",
            "--no-progress", "--run-dir", str(run_dir)]


def run_once(link: Link, net: Cluster | None, data_dir: Path, k: int, dtype: str, rounds: int,
             folder: Path) -> list[dict[str, Any]]:
    """One run of `rounds` rounds; its rounds.jsonl records (the last one holds the final evaluation)."""
    run_dir = folder / "run"
    py = [sys.executable, "-m"]
    if net is None:
        host, port, wrap = "127.0.0.1", free_port(), {"coord": [], "a": [], "b": []}
    else:
        host, port = net.address("coord"), PORT
        wrap = {h: net.wrap(h) for h in ("coord", "a", "b")}
    coord_cmd = [*wrap["coord"], *py, "edgetrain.coordinator", "run", *train_args(data_dir, k, dtype, rounds, run_dir),
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
    args = p.parse_args()
    links = [LINKS[name] for name in args.links.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    dtypes = args.dtypes.split(",")
    if any(link.rate_bits is not None or link.delay_s for link in links):
        reason = unavailable()
        if reason is not None:
            sys.exit(f"error: {reason}")

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
