"""Build the data and the model a run spec names: the one place both sides do it, so both get the same."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from edgetrain import recipes
from edgetrain.datasets import Dataset, default_cache_dir, load_dataset, shard_indices
from edgetrain.datasets.encoded import cached
from edgetrain.errors import ConfigError
from edgetrain.models import ModelInput, build_model, default_lr, input_features, log_count_ratios
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
        if self.data.ngram_buckets:
            return ModelInput(self.data.num_classes, vocab, self.data.ngram_buckets, ngram_scale=self.ngram_scale)
        return ModelInput(num_classes=self.data.num_classes, vocab_size=vocab)

    @functools.cached_property
    def ngram_scale(self) -> torch.Tensor | None:
        """text-ngram's feature scaling (recipes.NGRAM_SCALING), from the whole train split: the same on every node."""
        if not self.data.ngram_buckets or recipes.NGRAM_SCALING != "log-count-ratio":
            return None
        train = self.data.train
        return log_count_ratios(train.x, train.y, self.data.num_classes, self.data.ngram_buckets,
                                alpha=recipes.NGRAM_SCALING_ALPHA)

    def new_model(self) -> nn.Module:
        """The run's initial model: the same weights on every node (seeded by the spec)."""
        return build_model(self.model_name, self.model_input(), seed=self.spec.seed)

    def class_weights(self) -> torch.Tensor | None:  # (the spec's weighting is resolved: never "auto" here)
        """Loss weights per class when the spec asks for them, from the whole train split (same on every node)."""
        if self.spec.class_weighting == "balanced":
            return balanced_class_weights(self.data.train.y, self.data.num_classes)
        return None

    def shard(self, rank: int, world: int) -> torch.Tensor:
        return shard_indices(
            self.data.train.y, rank, world, self.spec.seed, self.spec.shard_scheme, self.spec.dirichlet_alpha
        )


def load_workload(
    spec: RunSpec, where: DataLocation | None = None, *, metric: str = "", progress: bool = False
) -> Workload:
    """Load the data set, check its fingerprint against the spec's (when the spec has one).

    What the spec leaves to the defaults (model "", lr or lr decay None, class weighting "auto") is filled in
    from the data (and the run's `metric`, "" for the data set's) by the rules of `edgetrain.recipes`: the
    returned workload's spec names everything.
    """
    where = where or DataLocation()
    cache = where.cache_dir.expanduser() if where.cache_dir is not None else default_cache_dir()
    features = input_features(spec.model or recipes.TEXT_MODEL)  # text as the model takes it (the default's)

    def build() -> Dataset:
        return load_dataset(
            spec.dataset, data_dir=where.data_dir, data_path=where.data_path, test_path=where.test_path,
            val_path=where.val_path, cache_dir=where.cache_dir, download=where.download, seed=spec.seed,
            max_len=spec.max_len, limit=spec.limit or None, progress=progress, text_features=features,
        )

    # Encoded once per machine (edgetrain.datasets.encoded): the coordinator's load fills the cache its local
    # agents' workers read, instead of each tokenising the text again.
    options: dict[str, object] = {"seed": spec.seed, "max_len": spec.max_len, "limit": spec.limit,
                                  "features": features, "where": [str(where.data_dir), str(where.data_path),
                                                                  str(where.test_path), str(where.val_path)]}
    data = cached(spec.dataset, data_dir=where.data_dir, data_path=where.data_path, test_path=where.test_path,
                  val_path=where.val_path, cache_dir=cache, options=options, build=build)
    if spec.data_fingerprint and data.fingerprint != spec.data_fingerprint:
        raise ConfigError(
            f"data set {spec.dataset!r} here has fingerprint {data.fingerprint[:12]}, the coordinator's is "
            f"{spec.data_fingerprint[:12]}: different files, version or preprocessing"
        )
    spec = resolve_spec(spec, data, metric)
    return Workload(spec=spec if spec.data_fingerprint else spec.with_(data_fingerprint=data.fingerprint), data=data)


def label_counts(data: Dataset) -> list[int]:
    """Examples of each class in the train split."""
    return torch.bincount(data.train.y, minlength=data.num_classes).tolist()


def resolve_spec(spec: RunSpec, data: Dataset, metric: str = "") -> RunSpec:
    """Fill in what the spec leaves to the recipe (edgetrain.recipes): model, lr, lr decay, class weighting."""
    model = spec.model or data.default_model
    weighting = spec.class_weighting
    if weighting == "auto":
        counts = label_counts(data)
        weighting = recipes.class_weighting(counts, metric or recipes.default_metric(data.name, data.classes, counts))
    filled = {"model": model, "class_weighting": weighting,
              "lr": spec.lr if spec.lr is not None else default_lr(model),
              "lr_decay": spec.lr_decay if spec.lr_decay is not None else recipes.lr_decay(model, len(data.train))}
    if all(getattr(spec, k) == v for k, v in filled.items()):
        return spec
    return spec.with_(**filled)
