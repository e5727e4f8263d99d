"""Why the tweet model is what it is: compute per round against communication per round, per model.

Data parallelism pays when a round's compute dwarfs shipping the weights both ways. For each text model:
parameters, bytes per update, median compute and communication seconds per round (2 local agents, K local
steps of batch 64), their ratio, and the global test accuracy after the same number of rounds.

    python bench/model_choice.py --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.coordinator.config import CoordinatorConfig  # noqa: E402
from edgetrain.coordinator.run import Coordinator  # noqa: E402

from edgetrain.models import count_parameters  # noqa: E402
from edgetrain.spec import RunSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--models", default="text-bag,text-cnn,text-gru,text-ngram")
    args = p.parse_args()
    print(f"{'model':10} {'params':>9} {'MB/update':>9} {'compute s':>9} {'comm s':>7} {'ratio':>6} {'round s':>7} "
          f"{'accuracy':>8} {'macro-F1':>8}")
    for name in args.models.split(","):
        spec = RunSpec(dataset="tweets", model=name, seed=0)  # each model at its own default learning rate
        cfg = CoordinatorConfig(spec=spec, port=0, local_steps=args.local_steps, rounds=args.rounds, local_agents=2,
                                eval_every=args.rounds, progress=False, round_timeout=600)
        coord = Coordinator(cfg)
        result = coord.run()
        assert coord.workload is not None and result.final is not None
        params = count_parameters(coord.workload.new_model())
        hist = result.history[1:]
        nodes = [n for r in hist for n in r.nodes.values()]
        compute = statistics.median(n.compute_seconds for n in nodes)
        comm = statistics.median(n.communication_seconds for n in nodes)
        mb = statistics.median(n.bytes for n in nodes) / 1e6
        round_s = statistics.median(r.duration_seconds for r in hist)
        print(f"{name:10} {params:9,d} {mb:9.2f} {compute:9.3f} {comm:7.3f} {compute / comm:6.1f} {round_s:7.3f} "
              f"{result.final.accuracy:8.4f} {result.final.macro_f1:8.4f}", flush=True)


if __name__ == "__main__":
    main()
