"""Protocol load: N agents against a real coordinator on loopback; prints figures (a benchmark, not a test).

The coordinator is the real one (`python -m edgetrain.coordinator run`, a child process, so its memory is its own);
the agents are N threads in this process, each the agents' own client with its own channel, streaming as from
another host: Join, long-poll GetRound, decode the weights, send a real-size update back when the coordinator
has an upload slot for it (the weights nudged; no training, so the load is the protocol's). Reports whether
every round completed and every agent heard FINISHED (no deadlock), rounds/s, p50/p95 round time, and the
coordinator's peak RSS growth against the model's size.

    python bench/load.py                              # 32 agents, 10 rounds, text-cnn on tweets
    python bench/load.py --agents 64 --model text-bag
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from edgetrain.agent.client import CoordinatorClient, poll_again_delay  # noqa: E402
from edgetrain.agent.route import Route  # noqa: E402
from edgetrain.agent.runner import _REJOIN, _RETRY  # noqa: E402 - what edge-agent does on each status

from edgetrain import serde  # noqa: E402
from edgetrain.procs import free_port  # noqa: E402
from edgetrain.proto import edgetrain_pb2 as pb  # noqa: E402
from edgetrain.records import NodeStats  # noqa: E402
from edgetrain.spec import RunSpec  # noqa: E402
from edgetrain.training import state_of  # noqa: E402
from edgetrain.workload import load_workload  # noqa: E402


class Agent(threading.Thread):
    """One agent: sends nudged weights back each round until FINISHED, or until `kill()` closes its channel."""

    def __init__(self, name: str, port: int, expected: dict[str, serde.TensorSpec]) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.expected = port, expected
        # the agents' own client (paced uploads, deadlines, decoding), streaming as from another host
        self.client = client = CoordinatorClient(f"127.0.0.1:{port}")
        self.route = Route(client, same_host=False)
        self.rounds = 0
        self.finished = False
        self.killed = False
        self.error = ""
        self.refused = 0  # updates the coordinator refused or did not confirm (late for a round that closed, ...)

    def kill(self) -> None:
        """Die as a process does (bench/soak.py): every call in flight fails at once, and no Leave."""
        self.killed = True
        self.client.close()

    def run(self) -> None:
        client = self.client
        try:
            client.join(pb.JoinRequest(agent_name=self.name))
            after = -1
            while True:
                rnd = self.route.fetch(after, self.expected)
                h = rnd.header
                if h.status == pb.FINISHED:
                    self.finished = True
                    return
                if h.status != pb.WORK or rnd.state is None:
                    time.sleep(poll_again_delay(h))  # as the agent does: a WAIT at once asks it to hold off
                    continue
                state = {k: v + 1e-3 if v.is_floating_point() else v for k, v in rnd.state.items()}
                try:
                    self.route.send(h.round, NodeStats(samples=h.local_steps * h.batch_size), state)
                except grpc.RpcError as err:
                    if self.killed or err.code() in _REJOIN:
                        raise
                    self.refused += 1
                    if err.code() in _RETRY:  # not confirmed (the round closed at its deadline, ...): edge-agent
                        time.sleep(0.5)  # asks for work again, and the coordinator says which round is next
                        continue
                    # refused (the round closed while it arrived, ...): edge-agent goes on with the next round
                else:
                    self.rounds += 1
                after = h.round
        except (grpc.RpcError, ValueError) as err:  # ValueError: a call on the channel kill() closed
            if not self.killed:
                self.error = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
        finally:
            if not self.killed:
                client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--model", default="text-cnn")
    p.add_argument("--limit", type=int, default=2000, help="tweets used (sets the vocabulary, so the model size)")
    p.add_argument("--timeout", type=float, default=900.0, help="call it a deadlock after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the coordinator's run dir (log, checkpoint)")
    args = p.parse_args()

    spec = RunSpec(dataset="tweets", model=args.model, limit=args.limit, seed=0)
    state = state_of(load_workload(spec).new_model())
    expected = serde.spec_of(state)
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    params = sum(v.numel() for v in state.values())
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="edgetrain-load-"))
    cmd = [sys.executable, "-m", "edgetrain.coordinator", "run", "--dataset", "tweets", "--model", args.model,
           "--limit",
           str(args.limit), "--rounds", str(args.rounds), "--min-agents", str(args.agents), "--local-steps", "1",
           "--port", str(port), "--run-dir", str(run_dir), "--round-timeout", "300", "--join-timeout", "300",
           "--eval-every", str(10**9), "--no-progress", "--log-level", "error"]
    log = open(run_dir / "coordinator.log", "wb")  # noqa: SIM115
    coord = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    proc = psutil.Process(coord.pid)
    # the coordinator has loaded data and model and is listening: its RSS now is the baseline
    deadline = time.monotonic() + 120
    while b"listening" not in (run_dir / "coordinator.log").read_bytes():
        if coord.poll() is not None or time.monotonic() > deadline:
            print((run_dir / "coordinator.log").read_text(), file=sys.stderr)
            return 1
        time.sleep(0.05)
    time.sleep(0.5)
    base = peak = proc.memory_info().rss
    sampling = threading.Event()

    by_round: dict[int, int] = {}  # peak RSS while the slowest agent had finished this many rounds

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            try:
                rss = proc.memory_info().rss
            except psutil.NoSuchProcess:
                return
            peak = max(peak, rss)
            r = min((a.rounds for a in agents), default=0)
            by_round[r] = max(by_round.get(r, 0), rss)
            time.sleep(0.005)

    agents = [Agent(f"load-{i:02d}", port, expected) for i in range(args.agents)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    for a in agents:
        a.start()
    try:
        code = coord.wait(args.timeout)
    except subprocess.TimeoutExpired:
        code = None
        coord.kill()
        coord.wait()
    wall = time.perf_counter() - t0
    sampling.set()
    sampler.join()
    for a in agents:
        a.join(30)
    log.close()

    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()] \
        if (run_dir / "rounds.jsonl").exists() else []
    durations = sorted(r["duration_seconds"] for r in records)
    finished = sum(a.finished for a in agents)
    errors = [f"{a.name}: {a.error}" for a in agents if a.error]
    full = sum(len(r["nodes"]) == args.agents for r in records)
    print(f"load: {args.agents} agents (threads, one channel each) x {args.rounds} rounds, {args.model} "
          f"({params / 1e6:.2f} M parameters, {model_bytes / 1e6:.1f} MB), loopback, {len(os.sched_getaffinity(0))} "
          f"cores shared by coordinator and agents")
    print(f"  coordinator exit code {code if code is not None else 'none: killed after --timeout (deadlock?)'}; "
          f"rounds completed {len(records)}/{args.rounds} ({full} with every agent); agents that heard FINISHED "
          f"{finished}/{args.agents}; updates refused or not confirmed {sum(a.refused for a in agents)}; client errors "
          f"{len(errors)}")
    if durations:
        p95 = durations[min(len(durations) - 1, round(0.95 * (len(durations) - 1)))]
        busy = sum(durations)
        moved, p50 = 2 * args.agents * model_bytes, statistics.median(durations)
        print(f"  rounds/s {len(durations) / busy:.2f} (wall incl. joins {wall:.1f} s); round time p50 {p50:.2f} s, "
              f"p95 {p95:.2f} s, max {durations[-1]:.2f} s; {moved / 1e6:.0f} MB through the coordinator per round "
              f"({moved / 1e6 / p50:.0f} MB/s at p50)")
    rounds_seen = [r for r in sorted(by_round) if r < args.rounds]
    in_rounds = max((by_round[r] for r in rounds_seen), default=base) - base
    after = by_round.get(args.rounds, base) - base
    print(f"  coordinator RSS: {base / 1e6:.0f} MB listening; peak growth while rounds ran {in_rounds / 1e6:.0f} MB "
          f"= {in_rounds / model_bytes:.1f}x the model; after the last round (final evaluation, checkpoint) "
          f"{after / 1e6:.0f} MB")
    print("  peak RSS growth by round (MB): " + ", ".join(f"{(by_round[r] - base) / 1e6:.0f}" for r in rounds_seen))
    for e in errors[:5]:
        print(f"  {e}")
    ok = code == 0 and len(records) == args.rounds and finished == args.agents and not errors
    if ok and not args.keep:
        shutil.rmtree(run_dir)
        print("  OK")
    else:
        print("  OK" if ok else "  FAILED", f"(run dir {run_dir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
