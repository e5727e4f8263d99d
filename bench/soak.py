"""Soak: N agents x R rounds on loopback, an agent killed at random and restarted every ~K rounds (a benchmark).

The coordinator is the real one (`python -m edgetrain.coordinator run`, a child process with a run dir and its own
staging dir); the agents are N threads in this process, each the agents' own client with its own channel (as in
bench/load.py: Join, long-poll GetRound, decode, a real-size update back; no training) and its own TCP
connection (gRPC would otherwise share one among the channels of a process to the same address, and a leak per
connection would not show). Every ~K rounds (uniform
in [K/2, 3K/2]) one agent, at random, is killed at a random moment: its channel is closed under whatever call it
is in and it never says Leave, as a process that dies; after a random pause (0-1 s) it is started again under
the same name. `--min-agents` is half the agents, so a round with a killed agent in it closes short and is
applied with the others (the documented behaviour) instead of being run again.

Prints, as a markdown table, the coordinator's RSS, open file descriptors and threads, each as a least-squares
slope per 100 rounds with ±2 standard errors, after a short warm-up and over the second half; rounds lost (a
round number missing from the log) or logged twice; rounds closed short; and the staging files the coordinator
held at the end and left in its staging dir. `--json` writes the figures and every sample.

    flock /tmp/edgetrain-bench.lock python bench/soak.py --agents 32 --rounds 500
    python bench/soak.py --agents 4 --rounds 120 --kill-every 10 --json out.json   # the test's short version
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "soak_probe"
sys.path.insert(0, str(ROOT))

from edgetrain.coordinator.admission import HANDLER_THREADS  # noqa: E402
from edgetrain.coordinator.config import UPLOAD_SLOTS  # noqa: E402
from load import Agent  # noqa: E402 - bench/load.py, beside this script

from edgetrain import grpc_options, serde  # noqa: E402
from edgetrain.procs import free_port  # noqa: E402
from edgetrain.spec import RunSpec  # noqa: E402
from edgetrain.training import state_of  # noqa: E402
from edgetrain.workload import load_workload  # noqa: E402

# A subchannel pool per channel: each agent its own TCP connection, as agents on other hosts have
grpc_options.CLIENT = [*grpc_options.CLIENT, ("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Sample:
    rounds: int
    rss: int
    fds: int
    threads: int
    staged: int  # files the coordinator holds open in its staging dir (unnamed: "#inode (deleted)")
    connections: int = 0  # its established TCP connections (the agents')


@dataclass
class Soak:
    exit_code: int | None
    rounds: int
    logged: list[int]
    short: int
    reruns: int
    kills: int
    samples: list[Sample] = field(default_factory=list)
    finished: int = 0
    refused: int = 0  # updates the coordinator refused or did not confirm (the round had closed); the agent went on
    agents: int = 0
    errors: list[str] = field(default_factory=list)
    staged_at_end: int = -1  # at the last sample (usually during shutdown; before it, the one kept file)
    staged_max: int = -1  # the most held at once while rounds ran
    left_in_staging: list[str] = field(default_factory=list)
    model_bytes: int = 0
    wall: float = 0.0

    @property
    def lost(self) -> int:
        return len(set(range(self.rounds)) - set(self.logged))

    @property
    def twice(self) -> int:
        return len(self.logged) - len(set(self.logged))


def _staged(proc: psutil.Process, staging: Path) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        except OSError:
            continue
        n += os.path.dirname(target) == str(staging)
    return n


def _connections(proc: psutil.Process) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED for c in proc.net_connections("tcp"))


def _log_rounds(path: Path) -> list[int]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            pass  # a line being written
    return out


# The coordinator's native heap grows to its working size over the first 500-1,000 rounds (bytes in use and the
# free gaps in glibc's main arena; Python objects flat: docs/security.md, "Soak"); a slope over the second half
# says whether anything still grows once that is done, beside the one after the short warm-up
SECOND_HALF = 0.5


def slope(samples: list[Sample], attr: str, warmup: float) -> tuple[float, float]:
    """Least-squares slope of `attr` per 100 rounds over the last (1 - warmup) of the rounds, and 2 std errors."""
    last: dict[int, float] = {}
    top = max((s.rounds for s in samples), default=0)
    for s in samples:
        if s.rounds < top:  # while rounds ran: not the final evaluation and checkpoint
            last[s.rounds] = float(getattr(s, attr))  # the value at each round count, as it ended
    xs = [r for r in sorted(last) if r >= warmup * top]
    if len(xs) < 3:
        return math.nan, math.nan
    ys = [last[r] for r in xs]
    fit = statistics.linear_regression(xs, ys)
    mx = statistics.fmean(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    ssr = sum((y - (fit.slope * x + fit.intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    se = math.sqrt(ssr / (len(xs) - 2) / sxx) if sxx > 0 else math.nan
    return 100 * fit.slope, 200 * se


def soak(agents: int, rounds: int, kill_every: float, *, model: str, limit: int, seed: int, round_timeout: float,
         timeout: float, probe: Path | None = None, probe_gc_every: int = 0) -> Soak:
    rng = random.Random(seed)
    spec = RunSpec(dataset="tweets", model=model, limit=limit, seed=0)
    state = state_of(load_workload(spec).new_model())
    expected = serde.spec_of(state)
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="edgetrain-soak-"))
    run_dir, staging = work / "run", work / "staging"
    staging.mkdir()
    cmd = [sys.executable, "-m", "edgetrain.coordinator", "run", "--dataset", "tweets", "--model", model, "--limit",
           str(limit), "--rounds", str(rounds), "--min-agents", str(max(1, agents // 2)), "--local-steps", "1",
           "--port", str(port), "--run-dir", str(run_dir), "--staging-dir", str(staging),
           "--round-timeout", str(round_timeout), "--join-timeout", "300", "--eval-every", str(10**9),
           "--no-progress", "--log-level", "warning"]
    log_path = work / "coordinator.log"
    with open(log_path, "wb") as log:
        env = dict(os.environ)
        if probe is not None:  # bench/soak_probe/sitecustomize.py, in the coordinator alone
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE), env.get("PYTHONPATH")]))
            env["SOAK_PROBE_OUT"], env["SOAK_PROBE_GC_EVERY"] = str(probe.resolve()), str(probe_gc_every)
        coord = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc = psutil.Process(coord.pid)
    deadline = time.monotonic() + 120
    while b"listening" not in log_path.read_bytes():
        if coord.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start:\n{log_path.read_text()}")
        time.sleep(0.05)

    result = Soak(None, rounds, [], 0, 0, 0, agents=agents,
                  model_bytes=sum(v.numel() * v.element_size() for v in state.values()))
    live = {f"soak-{i:02d}": Agent(f"soak-{i:02d}", port, expected) for i in range(agents)}
    gone: list[Agent] = []
    done = threading.Event()
    current = [0]

    def sample() -> None:
        log, seen = run_dir / "rounds.jsonl", 0
        while not done.is_set():
            try:
                if log.exists():
                    with open(log, "rb") as fh:  # only what was added since the last look
                        fh.seek(seen)
                        added = fh.read()
                    seen += len(added)
                    current[0] += added.count(b"\n")
                if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: nothing left to measure
                    return
                result.samples.append(Sample(current[0], proc.memory_info().rss, proc.num_fds(), proc.num_threads(),
                                             _staged(proc, staging), _connections(proc)))
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                return
            done.wait(0.25)

    def killer() -> None:
        next_kill = rng.uniform(0.5, 1.5) * kill_every
        started = time.monotonic()
        while not done.is_set():
            # No kill in the run's last ~2 s (at the pace so far): a restart could come after the coordinator
            # has told FINISHED and gone, and would wait for it for ever (that is no fault of the run's)
            rate = current[0] / max(1e-3, time.monotonic() - started)
            if current[0] >= next_kill and rounds - current[0] > 2.0 * rate:
                done.wait(rng.uniform(0.0, 0.3))  # somewhere in a round: downloading, uploading or waiting
                name = rng.choice(sorted(live))
                victim = live[name]
                victim.kill()
                gone.append(victim)
                result.kills += 1
                done.wait(rng.uniform(0.0, 1.0))
                live[name] = Agent(name, port, expected)  # restarted under the same name
                live[name].start()
                next_kill = current[0] + rng.uniform(0.5, 1.5) * kill_every
            done.wait(0.05)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=killer, daemon=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for a in list(live.values()):
        a.start()
    try:
        result.exit_code = coord.wait(timeout)
    except subprocess.TimeoutExpired:
        coord.kill()
        coord.wait()
    result.wall = time.perf_counter() - t0
    if result.samples:  # after the last round (final evaluation, checkpoint) if sampled then
        result.staged_at_end = result.samples[-1].staged
        result.staged_max = max(s.staged for s in result.samples)
    done.set()
    for t in threads:
        t.join(10)
    for a in list(live.values()) + gone:
        a.join(30)
    result.finished = sum(a.finished for a in live.values())
    result.refused = sum(a.refused for a in list(live.values()) + gone)
    result.errors = [f"{a.name}: {a.error}" for a in list(live.values()) + gone if a.error]
    result.logged = _log_rounds(run_dir / "rounds.jsonl")
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()] \
        if (run_dir / "rounds.jsonl").exists() else []
    result.short = sum(bool(r["missing"]) for r in records)
    result.reruns = log_path.read_text(errors="replace").count("running it again")
    result.left_in_staging = sorted(p.name for p in staging.iterdir())
    ok = result.exit_code == 0 and not result.lost and not result.errors
    if ok:
        shutil.rmtree(work)
    else:
        print(f"(kept {work})", file=sys.stderr)
    return result


def probe_report(path: Path, rounds: int) -> str:
    """The probe's samples while rounds ran, as medians over six windows of rounds (threads: the most)."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [x for x in recs if 0 < x["rounds"] < rounds]  # while rounds ran
    edges = sorted({*range(0, rounds, max(1, rounds // 6)), rounds})
    lines = ["", "| rounds | RssAnon MB | heap MB (malloc arena) | in use MB | free in heap MB | malloc arenas | "
             "threads | Python objects |", "|---|---|---|---|---|---|---|---|"]
    for a, b in itertools.pairwise(edges):
        w = [x for x in recs if a <= x["rounds"] < b]
        if not w:
            continue

        def med(key: str, scale: float, w: list[dict[str, Any]] = w) -> str:
            vals = [x[key] / scale for x in w if key in x]
            return f"{statistics.median(vals):.1f}" if vals else "-"

        objects = [str(x["objects"]) for x in w if "objects" in x]
        lines.append(f"| {a}–{b} | {med('RssAnon', 1e3)} | {med('arena', 1e6)} | {med('uord', 1e6)} | "
                     f"{med('ford', 1e6)} | {med('arenas', 1)[:-2]} | {max(x['Threads'] for x in w)} | "
                     f"{', '.join(objects) or '-'} |")
    return "\n".join(lines)


def report(r: Soak, warmup: float, model: str) -> str:
    rounds_seen = max((s.rounds for s in r.samples), default=0)
    lines = [
        f"soak: {r.agents} agents (threads, one channel and TCP connection each) x {r.rounds} rounds, {model} "
        f"({r.model_bytes / 1e6:.2f} MB), loopback, {len(os.sched_getaffinity(0))} cores shared; "
        f"{r.kills} agents killed and restarted; {r.wall:.0f} s",
        "",
        f"| coordinator | first sample | last sample (after the last round) | slope per 100 rounds ± 2 SE, after "
        f"{warmup:.0%} warm-up | the same over the second half |",
        "|---|---|---|---|---|",
    ]
    first, last = (r.samples[0], r.samples[-1]) if r.samples else (None, None)
    for attr, unit, scale in (("rss", "MB", 1e6), ("fds", "", 1), ("threads", "", 1), ("connections", "", 1)):
        a = f"{getattr(first, attr) / scale:.1f} {unit}" if first else "-"
        b = f"{getattr(last, attr) / scale:.1f} {unit}" if last else "-"
        fits = [slope(r.samples, attr, w) for w in (warmup, SECOND_HALF)]
        lines.append(f"| {attr} | {a} | {b} | " + " | ".join(f"{s / scale:+.2f} ± {err / scale:.2f} {unit}"
                                                            for s, err in fits) + " |")
    lines += [
        "",
        f"- coordinator exit code {r.exit_code}; rounds logged {len(set(r.logged))}/{r.rounds} (sampled up to "
        f"{rounds_seen}); rounds lost {r.lost}; logged twice {r.twice}; closed short (an agent killed in them) "
        f"{r.short}; not applied and run again {r.reruns}",
        f"- agents that heard FINISHED {r.finished}/{r.agents}; updates refused or not confirmed {r.refused} (a "
        "round closed before they were in: the agent goes on, as edge-agent does); client errors "
        f"{len(r.errors)}",
        f"- coordinator threads at most {max((s.threads for s in r.samples), default=0)} (gRPC's handler pool "
        f"starts one when a call finds none idle, up to {HANDLER_THREADS}, and keeps it: a step, not a slope)",
        f"- staging: at most {r.staged_max} files held at once (upload slots: {UPLOAD_SLOTS}; one kept to reuse); "
        f"{r.staged_at_end} at the last sample; files left in the staging dir after exit {len(r.left_in_staging)}",
    ]
    lines += [f"  - {e}" for e in r.errors[:5]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--kill-every", type=float, default=20.0, help="rounds between kills, on average")
    p.add_argument("--model", default="text-bag")
    p.add_argument("--limit", type=int, default=300, help="tweets used (sets the vocabulary, so the model size)")
    p.add_argument("--seed", type=int, default=0, help="for the kills' rounds, victims and pauses")
    p.add_argument("--round-timeout", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of rounds left out of the slopes")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--probe", type=Path, help="sample the coordinator's heap, threads and Python objects from "
                   "inside it into this file (bench/soak_probe) and print them by windows of rounds")
    p.add_argument("--probe-gc-every", type=int, default=250, help="count Python objects every this many rounds")
    args = p.parse_args()
    r = soak(args.agents, args.rounds, args.kill_every, model=args.model, limit=args.limit, seed=args.seed,
             round_timeout=args.round_timeout, timeout=args.timeout, probe=args.probe,
             probe_gc_every=args.probe_gc_every)
    print(report(r, args.warmup, args.model))
    if args.probe is not None and args.probe.exists():
        print(probe_report(args.probe, r.rounds))
    if args.json is not None:
        attrs = ("rss", "fds", "threads", "connections")
        slopes = {attr: slope(r.samples, attr, args.warmup) for attr in attrs}
        halves = {attr: slope(r.samples, attr, SECOND_HALF) for attr in attrs}
        args.json.write_text(json.dumps({
            "exit_code": r.exit_code, "rounds": r.rounds, "lost": r.lost, "twice": r.twice, "short": r.short,
            "reruns": r.reruns, "kills": r.kills, "finished": r.finished, "refused": r.refused, "agents": r.agents,
            "errors": r.errors,
            "staged_at_end": r.staged_at_end, "staged_max": r.staged_max, "left_in_staging": r.left_in_staging,
            "slopes_per_100_rounds": {k: {"slope": v[0], "two_se": v[1]} for k, v in slopes.items()},
            "second_half_slopes_per_100_rounds": {k: {"slope": v[0], "two_se": v[1]} for k, v in halves.items()},
            "samples": len(r.samples),
            "series": {"columns": ["rounds", "rss", "fds", "threads", "connections", "staged"],
                       "rows": [[s.rounds, s.rss, s.fds, s.threads, s.connections, s.staged] for s in r.samples]},
        }, indent=1))
    ok = r.exit_code == 0 and r.lost == 0 and r.twice == 0 and r.finished == r.agents and not r.errors
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
