"""Model registry: name -> nn.Module factory. Each data set names its default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgetrain.datasets.registry import TEXT_FEATURES
from edgetrain.datasets.text import NGRAM_BUCKETS
from edgetrain.errors import ConfigError


@dataclass(frozen=True)
class ModelInput:
    """What a factory needs to know about the data."""

    num_classes: int
    vocab_size: int = 0  # text models only
    ngram_buckets: int = NGRAM_BUCKETS  # text-ngram: hash buckets of its features (the data set's)
    ngram_dim: int = 0  # text-ngram: width of its feature embeddings (0, the default: the linear model alone)
    # text-ngram: [buckets, classes] scale of each feature's row per class (``log_count_ratios`` of the train
    # split); None: no scaling
    ngram_scale: torch.Tensor | None = field(default=None, compare=False, repr=False)


class MnistCNN(nn.Module):
    """PyTorch's MNIST example network: conv 32, conv 64 (3x3), max-pool, dropout, 9216 -> 128 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        logits: torch.Tensor = self.fc2(x)
        return logits


class TextCNN(nn.Module):
    """Kim-style text CNN: embeddings, parallel 1-D convolutions (widths 3/4/5), max-over-time, dropout.

    With a 20k vocabulary and 64-d embeddings it holds about 1.4 M parameters, mostly in the embedding
    table: big enough that a round's compute outweighs shipping the weights, small enough for edge CPUs.
    """

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64, filters: int = 100) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, k) for k in (3, 4, 5))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x).transpose(1, 2)  # [B, dim, L]
        pooled = [F.relu(conv(e)).amax(dim=2) for conv in self.convs]
        logits: torch.Tensor = self.fc(self.dropout(torch.cat(pooled, dim=1)))
        return logits


class TextGRU(nn.Module):
    """Bidirectional GRU over embeddings, mean+max pooled: the sequential alternative to TextCNN."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Packed, so the backward direction starts at each tweet's last real token instead of running
        # through the padding first (which washes out what it read).
        lengths = (x != 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(x), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        mask = (x != 0).unsqueeze(-1).to(out.dtype)
        mean = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        peak = out.masked_fill(mask == 0, -1e4).amax(1)
        logits: torch.Tensor = self.fc(self.dropout(torch.cat([mean, peak], dim=1)))
        return logits


class TextNgram(nn.Module):
    """fastText-style classifier over hashed word, word-bigram and character 2-5-gram features.

    Logits are the mean of one learned row per feature of a text (``encode_ngrams``), plus a bias: a
    convex model (multinomial logistic regression over n-gram indicators) with 786k parameters for
    2^18 buckets: the strongest of our tweet models on TweetEval sentiment (docs/accuracy.md), cheap to
    compute, so give it many local steps per round. It learns fast only with a large step: its
    default learning rate is 0.1 (Adam; see ``default_lr``).

    With ``dim`` > 0 it also learns a ``dim``-wide embedding per feature: the mean embedding of a text,
    through a linear layer, adds to the logits (fastText's own model, beside the linear one). Measured on
    the small TweetEval tasks' val splits it did not earn its 3.5-15x training time (docs/accuracy.md), so
    no recipe turns it on; ``bench/text_recipes.py sweep --dims`` measures it.

    With ``scale`` (``[buckets, classes]``, the train split's ``log_count_ratios``) each feature's row is
    multiplied by it per class before the mean, as in NBSVM: the model learns ``v`` of ``r * v``, so a feature
    whose counts tell the classes apart moves its logits fast and an uninformative one hardly (under Adam the
    scale acts as a per-weight step size). The scale is fixed, computed alike on every node from the train
    split, and no part of the state that travels.
    """

    def __init__(self, num_classes: int, buckets: int = NGRAM_BUCKETS, dim: int = 0,
                 scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.EmbeddingBag(buckets, num_classes, mode="mean", padding_idx=0)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        if scale is not None and tuple(scale.shape) != (buckets, num_classes):
            raise ConfigError(f"text-ngram scale has shape {tuple(scale.shape)}, want ({buckets}, {num_classes})")
        # A plain attribute, not a buffer: no part of the state, and left where it is when the module moves (the
        # coordinator parks its model on "meta" between evaluations); `forward` brings it to the weights' device.
        self.scale = None if scale is None else scale.detach().float().clone()
        self.embedding: nn.EmbeddingBag | None = None
        self.out: nn.Linear | None = None
        if dim > 0:
            self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean", padding_idx=0)
            nn.init.uniform_(self.embedding.weight, -1.0 / dim, 1.0 / dim)
            with torch.no_grad():
                self.embedding.weight[0] = 0.0
            self.out = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.weight.weight
        if self.scale is not None:
            if self.scale.device != table.device:
                self.scale = self.scale.to(table.device)
            table = table * self.scale
        logits = _bag_mean(x, table) + self.bias
        if self.embedding is not None and self.out is not None:
            logits = logits + self.out(_bag_mean(x, self.embedding.weight))
        return logits


def _bag_mean(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The mean of `table`'s rows for each row of ids in `x`, id 0 (padding) left out.

    Without gradients (evaluation), and while the padding row is zero, as training keeps it: the sum over
    every id divided by the count of the others. EmbeddingBag's `padding_idx` path is ~15x slower on CPU (9.3
    against 0.6 ms for 1,024 tweets of 484 ids): it made text-ngram's evaluation of test and val ~70 ms. With
    gradients the padding path stays: a plain sum would train the padding row where no scale zeroes it, and a
    whole training step measured no faster with it (3.4-3.8 against 3.6-3.8 ms; the backward pass dominates).
    """
    if not torch.is_grad_enabled() and x.dim() == 2 and not bool(table[0].any()):
        count = (x != 0).sum(1, keepdim=True).clamp(min=1)
        return F.embedding_bag(x, table, mode="sum") / count
    return F.embedding_bag(x, table, mode="mean", padding_idx=0)


def log_count_ratios(x: torch.Tensor, y: torch.Tensor, num_classes: int, buckets: int,
                     alpha: float = 1.0) -> torch.Tensor:
    """NBSVM's log-count ratios of hashed n-gram features, one class against the rest: ``[buckets, classes]``.

    ``r[f, c] = log(p[f, c] / q[f, c])``: p is the share of feature f among the features of class c's texts,
    q among the other classes' texts, each count plus ``alpha`` (Wang & Manning, "Baselines and Bigrams", ACL
    2012). Divided by the mean |r| of the features that occur, so the scaled model keeps its learning rate;
    the padding row (id 0) is 0. `x` holds each text's distinct feature ids (``encode_ngrams``), padded with 0.
    """
    # in x's own integer type (buckets x classes < 2^31), padding included and zeroed after: no int64 copy of x and
    # no masked copy (a third of the time; every process computes this before its first round)
    pairs = (x * num_classes + y.to(x.dtype)[:, None]).reshape(-1)
    counts = torch.bincount(pairs, minlength=buckets * num_classes).reshape(buckets, num_classes).double()
    counts[0] = 0.0  # the padding id's
    rest = counts.sum(1, keepdim=True) - counts
    p = (counts + alpha) / (counts + alpha).sum(0)
    q = (rest + alpha) / (rest + alpha).sum(0)
    r = (p / q).log()
    seen = counts.sum(1) > 0
    if bool(seen.any()):
        r = r / r[seen].abs().mean().clamp(min=1e-12)
    r[0] = 0.0
    return r.float()


class MLP(nn.Module):
    """A tiny deterministic network (no dropout): for exactness tests and protocol load tests."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(1)
        logits: torch.Tensor = self.fc2(torch.tanh(self.fc1(x)))
        return logits


def _text_mlp(inp: ModelInput) -> nn.Module:
    return nn.Sequential(nn.EmbeddingBag(inp.vocab_size, 32, mode="mean"), nn.Linear(32, inp.num_classes))


DEFAULT_LR = 1e-3
TOKENS, NGRAMS = TEXT_FEATURES


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the product needs to know of a registered model, in one place."""

    build: Callable[[ModelInput], nn.Module]
    # The learning rate a run starts from when the user gives none.
    lr: float = DEFAULT_LR
    # How text is encoded for it: "tokens" (ids; also what images ignore) or "ngrams" (hashed n-gram ids,
    # see edgetrain.datasets.TEXT_FEATURES).
    features: str = TOKENS


MODELS: dict[str, ModelInfo] = {
    "mnist-cnn": ModelInfo(lambda inp: MnistCNN(inp.num_classes)),
    "mnist-mlp": ModelInfo(lambda inp: MLP(28 * 28, inp.num_classes)),
    "text-cnn": ModelInfo(lambda inp: TextCNN(inp.vocab_size, inp.num_classes)),
    "text-gru": ModelInfo(lambda inp: TextGRU(inp.vocab_size, inp.num_classes)),
    # A mean over hundreds of sparse features moves each logit by lr / (features per text) per step, so the
    # linear model needs a larger learning rate than the rest.
    "text-ngram": ModelInfo(lambda inp: TextNgram(inp.num_classes, inp.ngram_buckets, inp.ngram_dim,
                                                  inp.ngram_scale), lr=0.1, features=NGRAMS),
    "text-bag": ModelInfo(_text_mlp),
}


def default_lr(name: str) -> float:
    """The learning rate a run of model ``name`` (``""``: a data set's default model) starts from."""
    return MODELS[name].lr if name in MODELS else DEFAULT_LR


def input_features(name: str) -> str:
    """How text must be encoded for model ``name``: ``"ngrams"`` or ``"tokens"`` (also for images)."""
    return MODELS[name].features if name in MODELS else TOKENS


def build_model(name: str, inp: ModelInput, *, seed: int = 0) -> nn.Module:
    """Build a registered model with weights drawn from `seed` (so every node starts identically)."""
    info = MODELS.get(name)
    if info is None:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    if name.startswith("text-") and inp.vocab_size < 2:
        raise ConfigError(f"model {name!r} needs a text data set (vocabulary size {inp.vocab_size})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return info.build(inp)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
