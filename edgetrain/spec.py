"""The run spec: everything both sides need to build the same data and model, and its wire form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from edgetrain.errors import ConfigError
from edgetrain.models import default_lr
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.recipes import LR_DECAY
from edgetrain.serde import UPDATE_DTYPES
from edgetrain.training import OPTIMIZERS, TrainConfig

SHARD_SCHEMES = ("iid", "dirichlet")
CLASS_WEIGHTINGS = ("none", "balanced", "auto")  # auto: balanced when the train labels are skewed (recipes)


@dataclass(frozen=True)
class RunSpec:
    """Data set, model and hyper-parameters of one training run; validated on construction."""

    dataset: str = "tweets"
    model: str = ""  # "" = the data set's default
    data_fingerprint: str = ""
    seed: int = 0
    batch_size: int = 64
    # None: the model's own (models.default_lr), filled in on construction, or once the data set names its default
    # model (workload.resolve_spec) when the model is "" too
    lr: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    shard_scheme: str = "iid"
    dirichlet_alpha: float = 0.5
    max_len: int = 64
    limit: int = 0  # 0 = the whole data set
    update_dtype: str = "float32"
    # learning rate x this per epoch (LR_DECAY); None: the recipe's (edgetrain.recipes.lr_decay), filled in once
    # the data is loaded (workload.resolve_spec)
    lr_decay: float | None = LR_DECAY
    class_weighting: str = "none"  # "balanced": weigh the loss by inverse class frequency (for macro-recall)

    def __post_init__(self) -> None:
        if self.lr is None and self.model:  # the value itself travels: every node builds the same optimizer
            object.__setattr__(self, "lr", default_lr(self.model))
        if self.lr is not None:
            self.train_config()  # validates batch size, lr, optimizer, momentum
        elif self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        for name in ("seed", "batch_size", "max_len"):  # int32 on the wire
            if not 0 <= getattr(self, name) < 2**31:
                raise ConfigError(f"{name.replace('_', ' ')} must be in 0..{2**31 - 1}, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:  # pragma: no cover - train_config raised already
            raise ConfigError(f"unknown optimizer {self.optimizer!r}")
        if self.shard_scheme not in SHARD_SCHEMES:
            raise ConfigError(f"unknown shard scheme {self.shard_scheme!r}; choose from {', '.join(SHARD_SCHEMES)}")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr decay per epoch must be in (0, 1], got {self.lr_decay}")
        if not self.dirichlet_alpha > 0:
            raise ConfigError(f"Dirichlet alpha must be positive, got {self.dirichlet_alpha}")
        if self.max_len < 1:
            raise ConfigError(f"max length must be at least 1, got {self.max_len}")
        if self.limit < 0:
            raise ConfigError(f"limit must be 0 (everything) or positive, got {self.limit}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ConfigError(
                f"unknown class weighting {self.class_weighting!r}; choose from {', '.join(CLASS_WEIGHTINGS)}")
        if self.update_dtype not in UPDATE_DTYPES:
            raise ConfigError(f"unknown update dtype {self.update_dtype!r}; choose from {', '.join(UPDATE_DTYPES)}")

    def lr_at(self, epoch: int) -> float:
        """The learning rate in (0-based) epoch `epoch` of a node's data: lr x lr_decay per completed epoch."""
        assert self.lr is not None and self.lr_decay is not None  # filled in by workload.resolve_spec at the latest
        return self.lr * self.lr_decay**epoch

    def train_config(self) -> TrainConfig:
        assert self.lr is not None  # filled in by __post_init__ or workload.resolve_spec
        return TrainConfig(
            batch_size=self.batch_size,
            lr=self.lr,  # the first epoch's: lr_at(0)
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )

    def with_(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)

    def to_proto(self) -> pb.RunSpec:
        return pb.RunSpec(**asdict(self))

    @classmethod
    def from_proto(cls, msg: pb.RunSpec) -> RunSpec:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DataLocation:
    """Where this node finds its data (never sent: each node has its own paths)."""

    data_dir: Path | None = None
    data_path: Path | None = None
    cache_dir: Path | None = None
    download: bool = True
    test_path: Path | None = None  # csv/tsv: the own test file (else a random split of data_path)
    val_path: Path | None = None  # csv/tsv: the own val file
