"""Hostile clients beside one real agent: its pace and the coordinator's resources, without and with each attack.

A benchmark, not a test (tests/integration/test_hostile.py asserts the behaviour). It starts a real coordinator
(`python -m edgetrain.coordinator run --cores 0`, a child process) and one real agent pinned to the other core
(`edge-agent start --cores 1`), as a coordinator's host and an edge machine are two machines, measures the agent's
rounds/s from the coordinator's /metrics, then runs each attack from this process
(niced, so the attackers' own CPU weighs least on the 2-core machine) and measures again: rounds/s during and
after, and the coordinator's RSS, threads, open fds and metric series before, during and after.

    python bench/hostile.py                       # every attack, scaled to 1,000 clients where it is a flood
    python bench/hostile.py --attacks ghosts,join-flood --window 15

Target (docs/security.md, "Limits"): during every attack the agent keeps >= 80 % of its pace, and the
coordinator's RSS stays within 1.5x its idle RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from edgetrain import grpc_options  # noqa: E402
from edgetrain.procs import free_port  # noqa: E402
from edgetrain.proto import edgetrain_pb2 as pb  # noqa: E402
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc  # noqa: E402

FLOOD = 1000


class Target:
    """The coordinator under attack: its address, /metrics and process."""

    def __init__(self, port: int, metrics_port: int, proc: subprocess.Popen[bytes], ghosts: int = 200) -> None:
        self.address, self.metrics_port, self.proc = f"127.0.0.1:{port}", metrics_port, proc
        self.ghosts = ghosts  # ghost threads at a time
        self.ps = psutil.Process(proc.pid)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return str(r.read().decode())

    def round(self) -> float:
        for line in self.scrape().splitlines():
            if line.startswith("edgetrain_round "):
                return float(line.split()[1])
        return 0.0

    def resources(self) -> dict[str, float]:
        text = self.scrape()
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        return {"rss_mb": self.ps.memory_info().rss / 2**20, "threads": self.ps.num_threads(),
                "fds": self.ps.num_fds(), "series": series}

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[*grpc_options.CLIENT,
                                                            ("grpc.max_send_message_length", 64 << 20)])


def pace(target: Target, seconds: float, peak: dict[str, float] | None = None) -> float:
    """Rounds/s over `seconds`; `peak` collects the highest resource figures seen meanwhile (a scrape every 5 s,
    as often as a keen Prometheus; a scrape of tens of thousands of series costs the coordinator CPU too) and
    the coordinator's CPU use over the window, in cores."""
    r0, t0, cpu0 = target.round(), time.monotonic(), sum(target.ps.cpu_times()[:2])
    while time.monotonic() - t0 < seconds:
        if peak is not None:
            for k, v in target.resources().items():
                peak[k] = max(peak.get(k, 0.0), v)
        time.sleep(min(5.0, max(0.0, seconds - (time.monotonic() - t0))))
    wall = time.monotonic() - t0
    if peak is not None:
        peak["cpu_cores"] = (sum(target.ps.cpu_times()[:2]) - cpu0) / wall
    return (target.round() - r0) / wall


# ---- the attacks: each starts in the background and returns a function that stops it
Stop = Callable[[], None]


Work = Callable[[pb_grpc.CoordinatorStub, int, threading.Event], None]


def _attack(target: Target, n: int, work: Work, channels: int = 1) -> Stop:
    """`n` threads run `work(stub, i, stop)` over `channels` connections until the returned function stops them."""
    chans = [target.channel() for _ in range(channels)]
    stop = threading.Event()
    threads = [threading.Thread(target=work, args=(pb_grpc.CoordinatorStub(chans[i % channels]), i, stop),
                                daemon=True) for i in range(n)]
    for t in threads:
        t.start()

    def end() -> None:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for c in chans:
            c.close()

    return end


def _join(stub: pb_grpc.CoordinatorStub, name: str) -> tuple[str, list[tuple[str, str]]] | None:
    try:
        reply = stub.Join(pb.JoinRequest(agent_name=name), timeout=10)
    except grpc.RpcError:
        return None
    return reply.agent_id, [(grpc_options.SESSION_METADATA, reply.session_token)]


def idle_streams(target: Target, joined: bool) -> Stop:
    """Finding 1: FLOOD update streams that open and send nothing, reopened as soon as they end."""
    md: list[tuple[str, str]] = []
    if joined:
        with target.channel() as channel:
            got = _join(pb_grpc.CoordinatorStub(channel), "intruder")
        md = got[1] if got else []

    def work(stub: pb_grpc.CoordinatorStub, i: int, stop: threading.Event) -> None:
        def nothing() -> Iterator[pb.UpdateMessage]:
            stop.wait()  # sends nothing until the attack ends
            yield from ()

        while not stop.is_set():
            try:
                stub.SubmitUpdate(nothing(), metadata=md, timeout=60)
            except grpc.RpcError:
                stop.wait(0.05)

    return _attack(target, FLOOD, work, channels=10)


def slow_uploader(target: Target) -> Stop:
    """Finding 2: two joined agents take work each round and trickle their upload (a header, a part, nothing)."""

    def work(stub: pb_grpc.CoordinatorStub, i: int, stop: threading.Event) -> None:
        got = _join(stub, f"slow-{i}")
        if got is None:
            return
        agent_id, md = got
        after = -1
        while not stop.is_set():
            try:
                msgs = list(stub.GetRound(pb.RoundRequest(agent_id=agent_id, after_round=after), metadata=md,
                                          timeout=60))
            except grpc.RpcError:
                stop.wait(0.5)
                continue
            h = msgs[0].header
            if h.status != pb.WORK:
                continue
            after = h.round
            first = [pb.UpdateMessage(header=pb.UpdateHeader(agent_id=agent_id, round=h.round, num_samples=1))]
            if len(msgs) > 1:
                first.append(pb.UpdateMessage(part=msgs[1].part))

            def trickle(first: list[pb.UpdateMessage] = first) -> Iterator[pb.UpdateMessage]:
                yield from first
                stop.wait(120)

            for _ in range(2):  # two uploads at once, as the probe did
                stub.SubmitUpdate.future(trickle(), metadata=md, timeout=120)

    return _attack(target, 2, work)


def join_flood(target: Target) -> Stop:
    """Finding 3: 20,000 Joins with distinct names as fast as they go, and Join+Leave cycles beside them."""
    counter = iter(range(10**9))

    def work(stub: pb_grpc.CoordinatorStub, i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            n = next(counter)
            if n >= 20_000:
                return
            got = _join(stub, f"flood-{n}")
            if got is not None and i % 4 == 0:  # a quarter of them leave again at once
                try:
                    stub.Leave(pb.LeaveRequest(agent_id=got[0]), metadata=got[1], timeout=10)
                except grpc.RpcError:
                    pass

    return _attack(target, 16, work)


def fat_joins(target: Target) -> Stop:
    """Finding 4: Joins with 1,000,000 cores, a 3 MB device and a 1 MB metrics address, and a forged log line."""

    def work(stub: pb_grpc.CoordinatorStub, i: int, stop: threading.Event) -> None:
        for n in range(40):
            if stop.is_set():
                return
            request = pb.JoinRequest(agent_name=f"fat-{i}-{n}", device="x" * 3_000_000 if n % 2 else "cpu\nforged",
                                     metrics_address="y" * 1_000_000)
            request.cores.extend(range(1_000_000))
            try:
                stub.Join(request, timeout=30)
            except grpc.RpcError:
                pass

    return _attack(target, 4, work)


def ghosts(target: Target) -> Stop:
    """Finding 5: agents that Join, poll once and vanish (half hang up mid-poll), --ghosts at a time, again and
    again."""
    counter = iter(range(10**9))

    def work(stub: pb_grpc.CoordinatorStub, i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            got = _join(stub, f"ghost-{next(counter)}")
            if got is None:
                stop.wait(0.2)
                continue
            call = stub.GetRound(pb.RoundRequest(agent_id=got[0]), metadata=got[1], timeout=30)
            if i % 2:
                stop.wait(0.1)
                call.cancel()
            else:
                try:
                    list(call)
                except grpc.RpcError:
                    pass

    return _attack(target, target.ghosts, work)


def oversize(target: Target) -> Stop:
    """Finding 6: messages over the 8 MiB limit."""
    big = "z" * (grpc_options.MAX_MESSAGE_BYTES + 1024)

    def work(stub: pb_grpc.CoordinatorStub, i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                stub.Join(pb.JoinRequest(agent_name=f"big-{i}", device=big), timeout=30)
            except grpc.RpcError:
                pass
            stop.wait(0.1)

    return _attack(target, 4, work)


ATTACKS: dict[str, Callable[[Target], Stop]] = {
    "idle-streams": lambda t: idle_streams(t, joined=False),
    "idle-streams-joined": lambda t: idle_streams(t, joined=True),
    "slow-uploader": slow_uploader,
    "join-flood": join_flood,
    "fat-joins": fat_joins,
    "ghosts": ghosts,
    "oversize": oversize,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated: " + ", ".join(ATTACKS))
    p.add_argument("--window", type=float, default=20.0, help="seconds each pace is measured over")
    p.add_argument("--model", default="text-cnn")
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--ghosts", type=int, default=FLOOD, help="ghost threads at a time (each joins, polls "
                   "once and goes, again and again)")
    p.add_argument("--coordinator-cores", default="0", help="the coordinator's --cores ('': unpinned, sharing the "
                   "agent's core 1 as well)")
    p.add_argument("--keep", action="store_true", help="keep the run's folder (rounds.jsonl, logs) and print it")
    args = p.parse_args()
    names = [a for a in args.attacks.split(",") if a]
    unknown = set(names) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    port, metrics_port = free_port(), free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="edgetrain-hostile-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    coord = subprocess.Popen(
        [sys.executable, "-m", "edgetrain.coordinator", "run", "--dataset", "tweets", "--model", args.model,
         "--local-steps", str(args.local_steps), "--rounds", str(10**6), "--port", str(port),
         "--metrics-port", str(metrics_port), "--round-timeout", "30", "--eval-every", str(10**6),
         "--checkpoint-every", str(10**6), "--run-dir", str(run_dir / "run"), "--no-progress", "--log-level",
         "error", *(["--cores", args.coordinator_cores] if args.coordinator_cores else [])],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(run_dir / "coordinator.log", "wb"))
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgetrain.agent", "start", "--coordinator", f"127.0.0.1:{port}", "--cores", "1",
         "--name",
         "real", "--log-level", "error"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=open(run_dir / "agent.log", "wb"))
    target = Target(port, metrics_port, coord, args.ghosts)
    os.nice(19)  # the attackers come last for the CPU: what is measured is the coordinator's limits
    rows = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if target.round() >= 3:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the real agent made no round in 300 s; see " + str(run_dir))
        pace(target, 5)  # warm
        idle = target.resources()
        print(f"idle: RSS {idle['rss_mb']:.0f} MB, {idle['threads']:.0f} threads, {idle['fds']:.0f} fds, "
              f"{idle['series']:.0f} series", flush=True)
        for name in names:
            before = pace(target, args.window)
            peak: dict[str, float] = {}
            end = ATTACKS[name](target)
            time.sleep(2)  # the attack under way
            first = target.round()
            during = pace(target, args.window, peak)
            if args.keep:  # which records of rounds.jsonl the window holds
                print(f"{name}: rounds {first:.0f}-{target.round():.0f} ran under attack", flush=True)
            end()
            time.sleep(2)
            after = pace(target, args.window)
            res = target.resources()
            rows.append((name, before, during, after, peak, res))
            print(f"{name}: {before:.2f} -> {during:.2f} -> {after:.2f} rounds/s; coordinator CPU "
                  f"{peak['cpu_cores']:.2f} cores; peak RSS "
                  f"{peak['rss_mb']:.0f} MB ({peak['rss_mb'] / idle['rss_mb']:.2f}x idle), threads "
                  f"{peak['threads']:.0f}, fds {peak['fds']:.0f}, series {peak['series']:.0f}; after: RSS "
                  f"{res['rss_mb']:.0f} MB, series {res['series']:.0f}", flush=True)
    finally:
        for proc in (agent, coord):
            proc.terminate()
        for proc in (agent, coord):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"run folder kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    print()
    print(f"| attack | rounds/s before | during | after | pace during | coordinator CPU during (cores) "
          f"| peak RSS (x idle {idle['rss_mb']:.0f} MB) | peak threads | peak fds | peak series | series after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, before, during, after, peak, res in rows:
        print(f"| {name} | {before:.2f} | {during:.2f} | {after:.2f} | {during / before:.0%} | "
              f"{peak['cpu_cores']:.2f} | "
              f"{peak['rss_mb']:.0f} MB ({peak['rss_mb'] / idle['rss_mb']:.2f}x) | {peak['threads']:.0f} | "
              f"{peak['fds']:.0f} | {peak['series']:.0f} | {res['series']:.0f} |")
    worst = min((during / before for _, before, during, *_ in rows), default=1.0)
    print(f"\nworst pace kept: {worst:.0%}; median {statistics.median(d / b for _, b, d, *_ in rows):.0%}"
          if rows else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
