"""edgetrain.eager: optimizers without importing torch's compiler, and the compiler whole when asked for.

Each case runs in a fresh interpreter: whether `torch._dynamo` is imported is a fact of the whole process, and
pytest's own may have imported it already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_TRAIN = """
import json, sys, torch
from edgetrain.training import TrainConfig, make_optimizer
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
for name in ("adam", "sgd", "adadelta"):
    opt = make_optimizer(model, TrainConfig(lr=0.01, optimizer=name, momentum=0.9 if name == "sgd" else 0.0))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
from edgetrain.eager import compiler_loaded
print(json.dumps({"loaded": compiler_loaded(), "sympy": "sympy" in sys.modules,
                  "weights": [p.detach().double().sum().item() for p in model.parameters()]}))
"""


def _run(code: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_training_with_every_optimizer_leaves_the_compiler_unimported_and_the_weights_the_same() -> None:
    deferred = _run(_TRAIN)
    assert deferred["loaded"] is False and deferred["sympy"] is False
    real = _run("import torch._dynamo\n" + _TRAIN)  # imported first: make_optimizer leaves the real one alone
    assert real["loaded"] is True
    assert deferred["weights"] == real["weights"]  # bit for bit: the stand-in's no-ops are eager mode's


def test_anything_more_than_the_optimizers_calls_gets_the_one_real_compiler() -> None:
    out = _run("""
        import json, sys, torch
        from edgetrain.eager import compiler_loaded, defer_compiler
        from edgetrain.training import TrainConfig, make_optimizer
        model = torch.nn.Linear(4, 2)
        opt = make_optimizer(model, TrainConfig(optimizer="adam"))  # defers, then asks the stand-in to disable
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert defer_compiler() and not compiler_loaded()  # idempotent
        import torch._dynamo.utils as utils  # a submodule first: through the stand-in's finder
        import torch._dynamo.config as config
        from torch._dynamo import eval_frame
        try:
            import torch._dynamo.no_such_module
            missing = "imported"
        except ModuleNotFoundError:
            missing = "refused"
        opt.zero_grad()  # asks the real compiler to disable it now
        raw = torch.optim.Optimizer.zero_grad.__wrapped__
        double = torch.compile(lambda t: t * 2, backend="eager")
        print(json.dumps({
            "loaded": compiler_loaded(), "one_config": utils.config is config is eval_frame.config,
            "attribute": torch._dynamo.config is config, "spec": config.__spec__.origin == config.__file__,
            "finder_gone": not any(type(f).__module__ == "edgetrain.eager" for f in sys.meta_path),
            "missing": missing, "redisabled": raw.__dict__.get("__dynamo_disable") not in (None, raw),
            "compiled": double(torch.ones(2)).tolist(), "again": defer_compiler()}))
    """)
    assert out == {"loaded": True, "one_config": True, "attribute": True, "spec": True, "finder_gone": True,
                   "missing": "refused", "redisabled": True, "compiled": [2.0, 2.0], "again": False}


def test_an_attribute_first_loads_the_real_package_once() -> None:
    out = _run("""
        import json, sys, torch
        from edgetrain.eager import compiler_loaded, defer_compiler
        defer_compiler()
        config = torch._dynamo.config  # an attribute: the stand-in loads the real package
        import torch._dynamo.config as again
        from torch._dynamo import utils
        print(json.dumps({"loaded": compiler_loaded(), "same": config is again is utils.config
                          is sys.modules["torch._dynamo.config"]}))
    """)
    assert out == {"loaded": True, "same": True}
