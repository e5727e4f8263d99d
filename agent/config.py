"""The agent's validated configuration: the CLI parses, this checks."""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from edgetrain.cli_util import check_tls_ca, check_tls_pair
from edgetrain.cores import split_cores, validate_cores
from edgetrain.errors import ConfigError
from edgetrain.metric_names import agent_name_problem, device_problem
from edgetrain.spec import DataLocation

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str
    cores: list[int]
    name: str = field(default_factory=socket.gethostname)
    workers: int = 1
    device: str = "cpu"
    where: DataLocation = field(default_factory=DataLocation)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no /metrics
    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    give_up_after: float | None = None  # give up on an unreachable coordinator after N s (None: never)
    throughput: float = 0.0
    auto_workers: bool = False  # --workers auto: measure the split once the run's model is known (edgetrain.split)

    def __post_init__(self) -> None:
        m = _ADDRESS.match(self.coordinator)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(f"coordinator address {self.coordinator!r} is not HOST:PORT")
        problem = agent_name_problem(self.name)
        if problem is not None:
            raise ConfigError(f"agent name {self.name!r}: {problem}")
        validate_cores(self.cores)
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.workers > len(self.cores):
            raise ConfigError(f"--workers {self.workers} needs at least as many cores; --cores gives {len(self.cores)}")
        problem = device_problem(self.device)
        if problem is not None:
            raise ConfigError(f"device {self.device!r}: {problem}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics port {self.metrics_port} out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together (mutual TLS)")
        # gRPC reads these only when it connects, logs lines of its own and then reports the coordinator as
        # unreachable: a bad file is said here, before any of that
        if self.tls_ca is not None:
            check_tls_ca(self.tls_ca, "--tls-ca")
        if self.tls_cert is not None and self.tls_key is not None:
            check_tls_pair(self.tls_cert, self.tls_key, "--tls-cert", "--tls-key")
        if self.give_up_after is not None and not (math.isfinite(self.give_up_after) and self.give_up_after > 0):
            raise ConfigError(f"--give-up-after must be a positive number of seconds, got {self.give_up_after:g}")

    @property
    def core_groups(self) -> list[list[int]]:
        return split_cores(self.cores, self.workers)
