"""The coordinator's validated configuration: the CLI parses, this checks (one line per problem)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgetrain.aggregation import AGGREGATORS, MEAN
from edgetrain.cli_util import check_tls_ca, check_tls_pair
from edgetrain.cores import validate_cores
from edgetrain.errors import ConfigError
from edgetrain.grpc_options import is_loopback
from edgetrain.recipes import metric_problem
from edgetrain.spec import DataLocation, RunSpec

from .admission import Limits

# Uploads taken at once (the others wait, sending nothing, until one ends). A streamed update waits in a staging
# file, so each slot costs the coordinator only the parts in flight, ~0.3x the MNIST CNN with agents on loopback
# (less on slow links, whose parts arrive no faster than they are written out; docs/performance.md, "Coordinator
# memory, fifth pass"). More slots let more agents on slow links upload at once.
UPLOAD_SLOTS = 2


@dataclass(frozen=True)
class CoordinatorConfig:
    spec: RunSpec = field(default_factory=RunSpec)
    where: DataLocation = field(default_factory=DataLocation)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    local_steps: int | None = None  # K; None: auto, from the recipe's (edgetrain.recipes) up (coordinator/adapt.py)
    local_steps_auto: bool = False  # set with the recipe's K when local_steps was None (Coordinator._fill_in_recipe)
    update_dtype_auto: bool = False  # True: uploads start in spec.update_dtype and follow the link (adapt.py)
    rounds: int | None = None
    epochs: float | None = None  # with no rounds and no target either: the recipe's
    target_accuracy: float | None = None  # the old name of --target with --metric accuracy
    metric: str = ""  # what decides the run: accuracy, macro-f1, macro-recall, f1:<class> ("": the data set's)
    target: float | None = None  # stop once the metric reaches this on val (on test where there is no val)
    min_agents: int = 0  # 0: the local agents and GPUs started here, or 1 when there are none
    join_timeout: float = 600.0  # wait this long for --min-agents before giving up
    round_timeout: float = 600.0  # a round's deadline: updates after it are refused
    quorum: int = 1  # past their measured deadlines, slow participants are given up on once this many sent
    eval_every: int | None = None  # every N rounds; None (auto): by its measured cost (coordinator/cadence.py)
    aggregator: str = MEAN
    trim: float = 0.2
    balance: bool = False
    # Rounds of about the median agent's time for K steps, not of K steps each (rounds.timed_budget). None: with an
    # auto K, whose K is the coordinator's choice anyway, on IID shards (on skewed ones a faster node's extra samples
    # would pull the model towards its classes), and without --balance; an explicit --local-steps keeps K steps.
    timed_rounds: bool | None = None
    local_agents: int = 0
    local_workers: int = 1  # workers per local agent
    local_devices: tuple[str, ...] = ()  # GPUs as local workers: "cuda:0", ...
    cores: tuple[int, ...] = ()  # the coordinator's own cores (its server, aggregation, evaluation); (): unpinned
    run_dir: Path | None = None
    checkpoint_every: int | None = None  # every N rounds; None (auto): as eval_every
    upload_slots: int = UPLOAD_SLOTS  # uploads taken at once; the others wait their turn before they send
    staging_dir: Path | None = None  # where streamed updates wait until whole (None: the system's temp dir)
    resume: bool = False
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: agents must present a certificate signed by this CA
    insecure: bool = False
    progress: bool = True
    limits: Limits = field(default_factory=Limits)  # what one client may hold (docs/security.md, "Limits")

    @property
    def times_rounds(self) -> bool:
        """Whether rounds are timed: as asked, else with an auto K on IID shards without --balance (`timed_rounds`)."""
        if self.timed_rounds is not None:
            return self.timed_rounds
        return self.local_steps_auto and self.spec.shard_scheme == "iid" and not self.balance

    def __post_init__(self) -> None:
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"--local-steps must be at least 1, got {self.local_steps}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.target_accuracy is not None:  # the old flag: --target on accuracy
            if self.target not in (None, self.target_accuracy):
                raise ConfigError("--target-accuracy is --target with --metric accuracy: give one of them")
            if self.metric not in ("", "accuracy"):
                raise ConfigError(f"--target-accuracy judges accuracy, not --metric {self.metric}: use --target")
            object.__setattr__(self, "target", self.target_accuracy)
            object.__setattr__(self, "metric", "accuracy")
        if self.timed_rounds and self.balance:
            raise ConfigError("--timed-rounds and --balance each size the agents' work: give one of them")
        if self.target is not None and not 0 < self.target <= 1:
            raise ConfigError(f"--target is a fraction in (0, 1], got {self.target}")
        problem = metric_problem(self.metric) if self.metric else None
        if problem:
            raise ConfigError(problem)
        if self.min_agents < 0:
            raise ConfigError(f"--min-agents cannot be negative, got {self.min_agents}")
        if self.min_agents == 0:
            object.__setattr__(self, "min_agents", max(1, self.local_agents + len(self.local_devices)))
        if self.local_agents < 0:
            raise ConfigError(f"--local-agents cannot be negative, got {self.local_agents}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1 or auto, got {self.eval_every}")
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"--trim must be in [0, 0.5), got {self.trim}")
        if self.local_workers < 1:
            raise ConfigError(f"--local-workers must be at least 1, got {self.local_workers}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be at least 1 or auto, got {self.checkpoint_every}")
        if self.cores:
            validate_cores(list(self.cores))  # names the cores outside this process's affinity
        if self.upload_slots < 1:
            raise ConfigError(f"--upload-slots must be at least 1, got {self.upload_slots}")
        if self.staging_dir is not None and not self.staging_dir.is_dir():
            raise ConfigError(f"--staging-dir {self.staging_dir} is not a directory")
        if self.tls_client_ca is not None and (self.local_agents or self.local_devices):
            raise ConfigError(
                "local agents have no client certificate: --tls-client-ca (mutual TLS) needs remote agents")
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"unknown aggregator {self.aggregator!r}; choose from {', '.join(AGGREGATORS)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port} out of range")
        if not self.round_timeout > 0 or not self.join_timeout > 0:
            raise ConfigError("timeouts must be positive")
        if self.quorum < 1:
            raise ConfigError(f"--quorum must be at least 1, got {self.quorum}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tls_key is not None:
            check_tls_pair(self.tls_cert, self.tls_key, "--tls-cert", "--tls-key")
        if self.tls_client_ca is not None:
            check_tls_ca(self.tls_client_ca, "--tls-client-ca")
        if self.resume and self.run_dir is None:
            raise ConfigError("--resume needs --run-dir: the folder of the run to go on with")
        if not is_loopback(self.host) and self.tls_cert is None and not self.insecure:
            raise ConfigError(
                f"refusing to serve on {self.host} without TLS: pass --tls-cert/--tls-key, or --insecure "
                "if the network is trusted"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
