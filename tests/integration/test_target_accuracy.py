"""`--target-accuracy`: the run stops at the first evaluation that reaches the target on val, and says when.

A real coordinator (in-process, gRPC on loopback, port 0) and a real local agent process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from edgetrain.coordinator import checkpoint
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.run import LOG, Coordinator, RunResult

from edgetrain.spec import RunSpec
from edgetrain.training import evaluate
from edgetrain.workload import load_workload

# text-ngram on 2,000 tweets, 4 local steps a round: the untrained model says "negative" to everything (the
# majority class) and the first rounds climb, not monotonically. The target is taken from a first run without
# one, so a torch build or CPU whose numbers differ a little still gives a target that is reached, and not in
# round 0. It is judged on val (test never decides anything).
SPEC = RunSpec(dataset="tweets", model="text-ngram", limit=2000, seed=3)
SCOUT = 8  # rounds of the first run
BUDGET = 100  # rounds: far more than the target needs, and a bound on how long a broken stop runs


def _run(run_dir: Path, rounds: int, target: float | None) -> RunResult:
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=4, rounds=rounds, target_accuracy=target,
                            local_agents=1, eval_every=1, run_dir=run_dir, progress=False, round_timeout=120)
    return Coordinator(cfg).run()


def test_the_run_stops_at_the_first_evaluation_that_reaches_the_target(tmp_path: Path) -> None:
    wl = load_workload(SPEC)
    val = wl.data.val
    assert val is not None
    majority = float(torch.bincount(val.y).max()) / len(val.y)
    untrained = evaluate(wl.new_model(), val.x, val.y, wl.data.num_classes).accuracy
    scouted = _run(tmp_path / "scout", SCOUT, None).history
    scout = [r.val.accuracy for r in scouted if r.val is not None]
    assert len(scout) == len(scouted)  # every round evaluated on val
    # the best accuracy after round 0 that is a new high: reached by training, and not at the first evaluation
    TARGET = max(scout[1:])  # noqa: N806
    assert TARGET > max(majority, untrained, scout[0]), scout

    run_dir = tmp_path / "run"
    result = _run(run_dir, BUDGET, TARGET)

    assert result.stopped_by == "target", result.stopped_by
    logged = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    assert [r["round"] for r in logged] == list(range(result.completed_rounds))
    assert 2 <= result.completed_rounds < BUDGET  # some evaluation before the last one did not reach it
    accuracies = [r["val_accuracy"] for r in logged]  # every round was evaluated
    assert all(a < TARGET for a in accuracies[:-1]), accuracies  # no earlier round reached it ...
    assert accuracies[-1] >= TARGET, accuracies  # ... and the run stopped at the first that did
    assert result.final is not None and result.final.accuracy == logged[-1]["accuracy"]  # (test)
    assert result.choice is not None and result.choice.round == result.completed_rounds  # the best val: the last

    # time to target: the elapsed seconds logged for the round that reached it, within the run's wall time
    assert result.time_to_target is not None
    assert result.time_to_target == logged[-1]["elapsed_seconds"] == result.history[-1].elapsed_seconds
    assert logged[-2]["elapsed_seconds"] < result.time_to_target <= result.wall_seconds

    # the stop is checkpointed like any end of a run: the round that reached the target included
    assert checkpoint.load(run_dir).completed_rounds == result.completed_rounds
    assert (run_dir / checkpoint.MODEL).exists()
