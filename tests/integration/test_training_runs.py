"""Whole trainings: real coordinator, real agent processes pinned to real cores, real gRPC on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from edgetrain.coordinator import checkpoint
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.run import Coordinator, RunResult
from torch.nn import functional as F  # noqa: N812

from edgetrain import metric_names as m
from edgetrain.cores import read_affinity
from edgetrain.datasets import encoded
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.training import batch_plan
from edgetrain.workload import load_workload

CORES = sorted(os.sched_getaffinity(0))


def _threads_of(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def _thread_affinities(pid: int) -> dict[int, list[int]]:
    """Each live thread's cores; a thread that ended between the listing and the read is left out."""
    out = {}
    for tid in _threads_of(pid):
        try:
            out[tid] = read_affinity(tid)
        except FileNotFoundError:
            continue
    return out


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_two_agents_k1_sgd_equal_serial_sgd_on_the_union_of_their_batches(tmp_path: Path, momentum: float) -> None:
    """With momentum too: it is linear, so the mean of the agents' buffers follows serial's buffer (the reason
    docs/benchmarks.md's SGD table can compare K=1 with DDP step for step; Adam is not linear)."""
    spec = RunSpec(dataset="tweets", model="text-bag", optimizer="sgd", lr=0.5, batch_size=16, limit=2000, seed=7,
                   momentum=momentum)
    rounds = 4
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=1, rounds=rounds, local_agents=2, eval_every=100,
                            run_dir=tmp_path, progress=False, round_timeout=120)
    result = Coordinator(cfg).run()
    assert result.completed_rounds == rounds
    parallel = checkpoint.load_model(tmp_path / checkpoint.MODEL)

    wl = load_workload(spec)
    model = wl.new_model()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=momentum)
    x, y = wl.data.train.x, wl.data.train.y
    for r in range(rounds):
        idx = torch.cat([
            batch_plan(wl.shard(rank, 2), seed=spec.seed, rank=rank, start_sample=r * spec.batch_size, steps=1,
                       batch_size=spec.batch_size)[0]
            for rank in (0, 1)
        ])
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    serial = model.state_dict()
    assert serial.keys() == parallel.keys()
    moved = max(float((serial[k] - wl.new_model().state_dict()[k]).abs().max()) for k in serial)
    assert moved > 1e-3  # training really changed the weights
    for k in serial:
        assert torch.allclose(parallel[k], serial[k], atol=1e-5, rtol=0), k


def test_local_run_pins_workers_reaches_accuracy_and_cleans_up(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", limit=6000, seed=1)
    # the embedded corpus needs no download: --no-download must reach the local agents all the same
    cfg = CoordinatorConfig(spec=spec, where=DataLocation(cache_dir=tmp_path / "cache", download=False), port=0,
                            local_steps=8, rounds=12, local_agents=2, eval_every=4, run_dir=tmp_path / "run",
                            progress=False, round_timeout=120)
    coord = Coordinator(cfg)
    threads_before = threading.active_count()
    out: list[RunResult] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(coord.run())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    runner = threading.Thread(target=target)
    coord.start()
    # Hold the run at round 6 until the processes below were read: a fast run otherwise ended first (CI saw a
    # worker found, then gone before its affinity was read).
    assert coord.engine is not None
    inspected, open_round = threading.Event(), coord.engine.open_round

    def held_open_round(*args: Any, **kwargs: Any) -> Any:
        assert coord.engine is not None
        if coord.engine.completed_rounds == 6:
            inspected.wait(120)
        return open_round(*args, **kwargs)

    coord.engine.open_round = held_open_round  # type: ignore[method-assign]
    agents = [psutil.Process(p.pid) for p in coord.local_agents]
    for agent in agents:  # where the coordinator found its data, so do its agents, and nowhere else
        # Popen returns once the child's execve has begun, but /proc/PID/cmdline is empty until the kernel has
        # set up the new program's arguments: on a loaded machine psutil read [] here
        end = time.monotonic() + 30
        while not (args := agent.cmdline()) and time.monotonic() < end:
            time.sleep(0.01)
        assert "--no-download" in args and args[args.index("--cache-dir") + 1] == str(tmp_path / "cache"), args
    runner.start()
    seen: dict[int, list[int]] = {}
    workers: set[int] = set()
    family: dict[int, set[int]] = {}
    escaped: list[tuple[int, int, list[int]]] = []
    files = None
    try:
        deadline = time.monotonic() + 120
        # forked workers exist before they are set up and pinned: read them once both agents report ready
        while coord.membership.ready_count() < 2 and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        while time.monotonic() < deadline and len(workers) < 2 and runner.is_alive():
            for agent in agents:  # wait until both workers are up (the agents pinned themselves before that)
                try:
                    # forked by the agent's command before it joined (edgetrain.procs.Prestarted)
                    workers |= {c.pid for c in agent.children() if c.name() == "edge-worker"}
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.2)
        time.sleep(0.5)
        for agent in agents:  # then read every process's and every thread's affinity from /proc
            for proc in [agent, *agent.children(recursive=True)]:
                seen[proc.pid] = read_affinity(proc.pid)
                if proc.pid != agent.pid:
                    family.setdefault(agent.pid, set()).add(proc.pid)
                escaped += [(proc.pid, tid, read_affinity(tid)) for tid in _threads_of(proc.pid)
                            if read_affinity(tid) != seen[proc.pid]]
        while files is None and runner.is_alive() and time.monotonic() < deadline:  # local agents use /dev/shm
            files = coord._svc.transfer.shared_files(create=False) if coord._svc is not None else None
            time.sleep(0.05)
    except BaseException:
        coord.stop.set()  # never leave a run behind a failed check
        raise
    finally:
        inspected.set()
    runner.join(300)
    assert not errors, errors
    assert not escaped, f"threads escaped their process's cores: {escaped}"
    result = out[0]
    expected = [[c] for c in CORES] if len(CORES) >= 2 else [CORES, CORES]
    agent_cores = sorted(seen[a.pid] for a in agents)
    assert agent_cores == sorted(expected[:2])
    assert len(workers) == 2, seen
    assert sorted(seen[w] for w in workers) == agent_cores  # each worker on its agent's cores only
    for agent_pid, kids in family.items():  # every child (workers, multiprocessing's helpers) on the agent's cores
        assert all(seen[k] == seen[agent_pid] for k in kids), (agent_pid, kids, seen)
    assert result.completed_rounds == 12
    assert result.final is not None
    # the evaluation model evaluates the global tensors themselves (no third model-sized copy in the
    # coordinator) and holds none of them afterwards (an old global model is not kept alive between evaluations)
    assert coord.engine is not None and coord._model is not None
    assert all(t.device.type == "meta" for t in coord._model.state_dict().values())
    seen: dict[str, int] = {}
    coord._model.register_forward_pre_hook(lambda m, _: seen.update(
        (k, v.data_ptr()) for k, v in m.state_dict().items()))
    glob = coord.engine.global_state
    assert coord._evaluate(glob)[0].accuracy == result.final.accuracy  # (test, val)
    assert seen == {k: v.data_ptr() for k, v in glob.items()}
    assert all(t.device.type == "meta" for t in coord._model.state_dict().values())
    majority = float(torch.bincount(coord.workload.data.test.y).max()) / len(coord.workload.data.test.y)  # type: ignore[union-attr]
    assert result.final.accuracy > majority + 0.05, (result.final.accuracy, majority)
    assert set(result.nodes) == {"local-0", "local-1"}
    assert all(n.samples == 12 * 8 * 64 for n in result.nodes.values())
    assert (tmp_path / "run" / checkpoint.LATEST).exists() and (tmp_path / "run" / "rounds.jsonl").exists()
    # nothing was fetched: the cache holds only the encoded corpus, which the agents' workers read (one entry)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [encoded.FOLDER]
    assert len(list((tmp_path / "cache" / encoded.FOLDER).iterdir())) == 1
    # the same-host files' directory was used and is gone, every process gone, no thread left behind
    assert files is not None and not files.dir.exists()
    for proc in agents:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    deadline = time.monotonic() + 10
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores for 2 workers")
def test_one_agent_with_two_workers_trains_through_gloo(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", limit=3000, seed=2)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=4, rounds=3, local_agents=1, local_workers=2,
                            eval_every=3, run_dir=tmp_path, progress=False, round_timeout=120)
    result = Coordinator(cfg).run()
    assert result.completed_rounds == 3
    (node,) = result.nodes.values()
    assert node.samples == 3 * 4 * 64 * 2  # both workers' batches count


def test_int8_updates_with_error_feedback_train_and_send_a_quarter_of_the_bytes(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", limit=6000, seed=1, update_dtype="int8")
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=8, rounds=8, local_agents=2, eval_every=8,
                            run_dir=tmp_path, progress=False, round_timeout=120)
    coord = Coordinator(cfg)
    result = coord.run()
    assert result.completed_rounds == 8 and result.final is not None
    model_bytes = sum(v.numel() * v.element_size() for v in coord.engine.global_state.values())  # type: ignore[union-attr]
    per_update = [n.bytes for r in result.history for n in r.nodes.values()]
    assert all(b < 0.3 * model_bytes for b in per_update), (per_update[:2], model_bytes)
    majority = float(torch.bincount(coord.workload.data.test.y).max()) / len(coord.workload.data.test.y)  # type: ignore[union-attr]
    assert result.final.accuracy > majority + 0.05


def test_checkpoints_every_n_rounds_and_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = RunSpec(dataset="tweets", limit=1000, seed=3)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=1, rounds=5, local_agents=1, eval_every=1000,
                            checkpoint_every=2, upload_slots=1, run_dir=tmp_path, progress=False, round_timeout=120)
    saved: list[int] = []
    original = Coordinator._checkpoint

    def spy(self: Coordinator, state: dict[str, torch.Tensor], snap: dict[str, Any]) -> None:
        saved.append(snap["completed_rounds"])
        assert self._svc is not None and self._svc.upload_slots == 1  # the option reached the servicer
        original(self, state, snap)

    monkeypatch.setattr(Coordinator, "_checkpoint", spy)
    coord = Coordinator(cfg)
    assert coord.run().completed_rounds == 5
    assert saved == [2, 4, 5]  # every 2nd round, and the last one whatever its number
    assert checkpoint.load(tmp_path).completed_rounds == 5


def test_text_ngram_trains_over_the_wire_on_hashed_features(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", model="text-ngram", lr=0.1, class_weighting="balanced", limit=6000, seed=1)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=16, rounds=6, local_agents=2, eval_every=6,
                            run_dir=tmp_path, progress=False, round_timeout=120)
    coord = Coordinator(cfg)
    result = coord.run()
    assert result.completed_rounds == 6 and result.final is not None
    data = coord.workload.data  # type: ignore[union-attr]
    assert data.train.x.dtype == torch.int32  # the agents got the same encoding: fingerprints matched
    assert result.final.macro_recall > 0.45, result.final  # majority class: 1/3


def test_an_epochs_run_logs_its_final_evaluation(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", limit=1000, seed=3)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=4, epochs=1.0, local_agents=2, eval_every=1000,
                            run_dir=tmp_path, progress=False, round_timeout=120)
    result = Coordinator(cfg, keep_history=False).run()  # as the CLI runs it: a run of days must not grow
    assert result.stopped_by == "epochs" and result.completed_rounds == 2  # 1,000 samples, 512 per round
    logged = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in logged] == [0, 1]
    assert [r.round for r in result.history] == [1]  # the log has every round, memory the last one only
    assert "accuracy" not in logged[0]  # eval_every=1000: only the last round is evaluated
    assert result.final is not None and logged[-1]["accuracy"] == result.final.accuracy
    # `coordinator report` on this real log (its own tests use hand-made records: they must have a real log's shape)
    from edgetrain.coordinator.report import write_report

    from tests.unit.test_report import assert_sensible_png, make_records

    made = make_records()
    evaluated = {"accuracy", "loss", "macro_f1", "macro_recall", "metric"}
    evaluated |= {f"val_{name}" for name in evaluated}
    assert set(made[-1]) == set(logged[-1]) and set(made[0]) - set(logged[0]) <= evaluated
    assert set(made[0]["nodes"]["agent-a"]) == set(logged[0]["nodes"]["local-0"])
    paths = write_report(tmp_path, tmp_path / "report")
    assert [p.name for p in paths] == ["accuracy.png", "round_time.png", "confusion.png"]  # the run's result.json
    for path in paths:
        assert_sensible_png(path)


def test_agent_leaves_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    spec = RunSpec(dataset="tweets", limit=2000, seed=5)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=2, rounds=10_000, min_agents=1, eval_every=10_000,
                            progress=False, round_timeout=60)
    coord = Coordinator(cfg)
    coord.start()
    runner = threading.Thread(target=coord.run)
    runner.start()
    agent = subprocess.Popen([sys.executable, "-m", "edgetrain.agent", "start", "--coordinator",
                              f"127.0.0.1:{coord.port}",
                              "--cores", str(CORES[0]), "--name", "leaver", "--give-up-after", "30"])
    try:
        assert coord.engine is not None
        deadline = time.monotonic() + 90
        while coord.engine.completed_rounds < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert coord.engine.completed_rounds >= 2
        value = coord.registry.get_sample_value
        assert value(m.AGENTS_CONNECTED) == 1
        assert value(m.NODE_THROUGHPUT, {m.NODE: "leaver"}) > 0
        children = psutil.Process(agent.pid).children(recursive=True)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while len(coord.membership) and time.monotonic() < deadline:  # it said Leave
            time.sleep(0.1)
        assert len(coord.membership) == 0
        # the metrics say so: nobody connected, and its last round's figures are no longer claimed as current
        assert value(m.AGENTS_CONNECTED) == 0
        for gauge in (m.NODE_THROUGHPUT, m.NODE_COMPUTE, m.NODE_COMMUNICATION, m.NODE_LOSS, m.NODE_ACCURACY):
            assert value(gauge, {m.NODE: "leaver"}) is None, gauge
        # no series of it is left at all (agents coming and going under new names grew /metrics without bound)
        left = [s for f in coord.registry.collect() for s in f.samples if s.labels.get(m.NODE) == "leaver"]
        assert left == []
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive  # its workers went with it
    finally:
        if agent.poll() is None:
            agent.kill()
        coord.stop.set()
        runner.join(60)


def test_evaluation_off_the_critical_path_gives_todays_figures_of_each_rounds_model(tmp_path: Path) -> None:
    """The after-work thread evaluates, logs and checkpoints while the next round trains: each record's figures are
    those `evaluate` gives the model of that round (the kept one and the last one, read back from disk), exactly."""
    from edgetrain.training import evaluate

    spec = RunSpec(dataset="tweets", model="text-ngram", lr=0.1, limit=3000, seed=5)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=4, rounds=4, local_agents=2, eval_every=1,
                            run_dir=tmp_path, progress=False, round_timeout=120)
    coord = Coordinator(cfg)
    result = coord.run()
    logged = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in logged] == [0, 1, 2, 3] and all("val_metric" in r for r in logged)
    data = coord.workload.data  # type: ignore[union-attr]
    model = coord.workload.new_model()  # type: ignore[union-attr]

    def figures(path: Path) -> tuple[Any, Any]:
        model.load_state_dict(checkpoint.load_model(path) if path.name == checkpoint.MODEL
                              else checkpoint.load(path.parent).state)
        assert data.val is not None
        return (evaluate(model, data.test.x, data.test.y, data.num_classes),
                evaluate(model, data.val.x, data.val.y, data.num_classes))

    test, val = figures(tmp_path / checkpoint.LATEST)  # the last round's model
    last = logged[-1]
    assert (last["accuracy"], last["loss"], last["macro_f1"], last["macro_recall"]) == (
        test.accuracy, test.loss, test.macro_f1, test.macro_recall)
    assert (last["val_accuracy"], last["val_loss"]) == (val.accuracy, val.loss)
    kept = json.loads((tmp_path / "result.json").read_text())
    test, val = figures(tmp_path / checkpoint.MODEL)  # the round chosen on val
    chosen = logged[kept["round"] - 1]
    assert kept["val"]["value"] == max(r["val_metric"] for r in logged) == chosen["val_metric"]
    assert (kept["test"]["accuracy"], kept["test"]["confusion"]) == (test.accuracy, [list(r) for r in test.confusion])
    assert (chosen["accuracy"], chosen["val_accuracy"]) == (test.accuracy, val.accuracy)
    # the run's training share and start-up: in the records, result.json and the summary's figures
    assert all(0 < r["training_share"] <= 1 for r in logged)
    assert 0 < result.training_share <= 1 and kept["training_share"] == result.training_share
    assert 0 < result.startup_seconds == kept["startup_seconds"] < 300


@pytest.mark.skipif(len(CORES) < 2, reason="the coordinator and its local agent on cores of their own need two")
def test_coordinator_cores_pin_the_coordinator_and_leave_the_other_cores_to_its_local_agents(tmp_path: Path) -> None:
    """`coordinator run --cores C`: every thread of the coordinator on C (its gRPC server's, evaluation's and
    torch's included), its local agent and the agent's workers on the host's other cores, none on C. A real
    process: pinning this test's own process would pin every test after it."""
    import signal
    import subprocess
    import sys

    from tests.integration.test_faults import wait_for

    own, rest = CORES[:1], CORES[1:]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgetrain.coordinator", "run", "--cores", str(own[0]), "--dataset", "tweets",
           "--model", "text-bag", "--limit", "2000", "--local-agents", "1", "--rounds", "100000", "--local-steps",
           "2", "--eval-every", "1", "--run-dir", str(run_dir), "--port", "0", "--no-progress", "--no-download",
           "--cache-dir", str(tmp_path / "cache"), "--round-timeout", "60"]
    coord = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: run_dir.joinpath("rounds.jsonl").is_file()
                 and len(run_dir.joinpath("rounds.jsonl").read_text().splitlines()) >= 2, 120,
                 "two logged rounds (evaluated: evaluation's threads exist)")
        me = psutil.Process(coord.pid)
        kids = me.children(recursive=True)
        assert kids, "no local agent"
        # the command forks its agent, which forks its worker (edgetrain.procs): no process imported torch again
        assert sorted(k.name() for k in kids) == ["edge-agent", "edge-worker"], [k.cmdline() for k in kids]
        threads = _thread_affinities(coord.pid)
        assert len(threads) > 5 and all(c == own for c in threads.values()), threads
        for kid in kids:  # the agent and its training worker: the other cores, every thread
            assert read_affinity(kid.pid) == rest, (kid.cmdline(), read_affinity(kid.pid))
            assert all(c == rest for c in _thread_affinities(kid.pid).values()), kid.cmdline()
    finally:
        coord.send_signal(signal.SIGTERM)
        _, err = coord.communicate(timeout=90)
    assert coord.returncode == 0, err.decode(errors="replace")


# Stops and continues process argv[1] every 4 ms: it runs at most half the time, whatever else runs. A process of
# its own, not a thread of the test's: there the coordinator's threads hold the GIL at times, and the stops came late.
_HALF_SPEED = """
import os, signal, sys, time
pid = int(sys.argv[1])
try:
    while True:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.004)
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.004)
except ProcessLookupError:
    pass
"""


def test_timed_rounds_give_a_slowed_agent_fewer_steps_so_neither_waits(tmp_path: Path) -> None:
    """One agent's worker runs half the time: in timed rounds it trains fewer samples in about the same time."""
    spec = RunSpec(dataset="tweets", model="text-ngram", limit=6000, seed=1)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=16, rounds=10, local_agents=2, eval_every=1000,
                            run_dir=tmp_path, progress=False, round_timeout=120, timed_rounds=True)
    coord = Coordinator(cfg)
    coord.start()
    command = list(coord.local_agents[1].args)  # spawned: a coordinator in a test's process does not fork
    assert command[command.index("--name") + 1] == "local-1"
    agent = psutil.Process(coord.local_agents[1].pid)
    deadline = time.monotonic() + 120

    def workers() -> list[psutil.Process]:  # not multiprocessing's resource tracker
        return [p for p in agent.children() if "resource_tracker" not in " ".join(p.cmdline())]

    while not workers() and time.monotonic() < deadline:  # its worker starts once it has joined
        time.sleep(0.05)
    worker = workers()[0].pid
    slower = psutil.Popen([sys.executable, "-c", _HALF_SPEED, str(worker)])
    try:
        result = coord.run()
    finally:
        slower.kill()
        slower.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert result.completed_rounds == 10
    first, *timed = [r.nodes for r in result.history if set(r.nodes) == {"local-0", "local-1"}]
    assert first["local-0"].samples == first["local-1"].samples == 16 * 64  # unmeasured: K steps each
    samples = sorted(r["local-0"].samples / r["local-1"].samples for r in timed[1:])
    compute = sorted(r["local-0"].compute_seconds / r["local-1"].compute_seconds for r in timed[1:])
    # K steps each would give exactly 1.0 and compute ratios ~0.5
    assert samples[len(samples) // 2] > 1.15, samples  # the full-speed agent trains more (~2x)...
    assert 0.7 < compute[len(compute) // 2] < 1.43, compute  # ...in about the time the loaded one takes (~1.0)
    assert max(r[n].samples for r in timed for n in r) <= 2 * 16 * 64  # never more than 2K steps
