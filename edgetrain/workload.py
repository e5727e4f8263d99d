"""Build the data and the model a run spec names: the one place both sides do it, so both get the same."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgetrain.datasets import Dataset, load_dataset, shard_indices
from edgetrain.errors import ConfigError
from edgetrain.models import ModelInput, build_model, input_features
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.training import balanced_class_weights


@dataclass(frozen=True)
class Workload:
    spec: RunSpec
    data: Dataset

    @property
    def model_name(self) -> str:
        return self.spec.model or self.data.default_model

    def model_input(self) -> ModelInput:
        vocab = len(self.data.vocab) if self.data.vocab is not None else 0
        return ModelInput(num_classes=self.data.num_classes, vocab_size=vocab)

    def new_model(self) -> nn.Module:
        """The run's initial model: the same weights on every node (seeded by the spec)."""
        return build_model(self.model_name, self.model_input(), seed=self.spec.seed)

    def class_weights(self) -> torch.Tensor | None:
        """Loss weights per class when the spec asks for them, from the whole train split (same on every node)."""
        if self.spec.class_weighting == "balanced":
            return balanced_class_weights(self.data.train.y, self.data.num_classes)
        return None

    def shard(self, rank: int, world: int) -> torch.Tensor:
        return shard_indices(
            self.data.train.y, rank, world, self.spec.seed, self.spec.shard_scheme, self.spec.dirichlet_alpha
        )


def load_workload(spec: RunSpec, where: DataLocation | None = None, *, progress: bool = False) -> Workload:
    """Load the data set, check its fingerprint against the spec's (when the spec has one)."""
    where = where or DataLocation()
    data = load_dataset(
        spec.dataset,
        data_dir=where.data_dir,
        data_path=where.data_path,
        cache_dir=where.cache_dir,
        download=where.download,
        seed=spec.seed,
        max_len=spec.max_len,
        limit=spec.limit or None,
        progress=progress,
        text_features=input_features(spec.model),
    )
    if spec.data_fingerprint and data.fingerprint != spec.data_fingerprint:
        raise ConfigError(
            f"data set {spec.dataset!r} here has fingerprint {data.fingerprint[:12]}, the coordinator's is "
            f"{spec.data_fingerprint[:12]}: different files, version or preprocessing"
        )
    return Workload(spec=spec if spec.data_fingerprint else spec.with_(data_fingerprint=data.fingerprint), data=data)
