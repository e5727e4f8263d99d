import pytest
import torch

from edgetrain.models import ModelInput, build_model, count_parameters
from edgetrain.training import (
    TrainConfig,
    batch_plan,
    classification_scores,
    evaluate,
    make_optimizer,
    train_steps,
)


def test_batch_plan_is_deterministic_and_continues_across_rounds() -> None:
    shard = torch.arange(10, 20)
    whole = batch_plan(shard, seed=3, rank=1, start_sample=0, steps=6, batch_size=4)
    again = batch_plan(shard, seed=3, rank=1, start_sample=0, steps=6, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))
    first = batch_plan(shard, seed=3, rank=1, start_sample=0, steps=2, batch_size=4)
    rest = batch_plan(shard, seed=3, rank=1, start_sample=8, steps=4, batch_size=4)
    assert torch.equal(torch.cat(first + rest), torch.cat(whole))
    epoch0 = torch.cat(whole)[:10]
    assert sorted(epoch0.tolist()) == list(range(10, 20))  # each epoch visits the shard once
    other = batch_plan(shard, seed=3, rank=2, start_sample=0, steps=1, batch_size=10)
    assert not torch.equal(other[0], epoch0)


def test_batch_plan_with_kept_shuffles_gives_the_same_batches_round_after_round() -> None:
    shard = torch.arange(10, 20)
    whole = batch_plan(shard, seed=3, rank=1, start_sample=0, steps=12, batch_size=3)
    perms: dict[int, torch.Tensor] = {}
    rounds = [batch_plan(shard, seed=3, rank=1, start_sample=3 * r, steps=1, batch_size=3, perms=perms)[0]
              for r in range(12)]
    assert torch.equal(torch.cat(rounds), torch.cat(whole))
    assert set(perms) == {2, 3}  # epochs 0-3 were visited; only the last two are kept


def test_macro_scores_by_hand() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    f1, recall = classification_scores(pred, target, 3)
    # recalls 1/2, 1, 1/2 ; precisions 1/2, 2/3, 1 ; f1 1/2, 4/5, 2/3
    assert abs(recall - (0.5 + 1 + 0.5) / 3) < 1e-9
    assert abs(f1 - (0.5 + 0.8 + 2 / 3) / 3) < 1e-9


def test_training_reduces_loss_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()

    def run() -> tuple[float, torch.Tensor]:
        model = build_model("mnist-mlp", ModelInput(2), seed=1)
        opt = make_optimizer(model, TrainConfig(lr=0.05, optimizer="sgd"))
        plan = batch_plan(torch.arange(256), seed=0, rank=0, start_sample=0, steps=40, batch_size=32)
        train_steps(model, opt, x, y, plan, seed=5)
        return evaluate(model, x, y, 2).loss, model.fc1.weight.detach().clone()

    loss_a, w_a = run()
    loss_b, w_b = run()
    assert torch.equal(w_a, w_b)
    untrained = build_model("mnist-mlp", ModelInput(2), seed=1)
    assert loss_a < evaluate(untrained, x, y, 2).loss * 0.8


def test_a_step_budget_stops_at_the_step_nearest_it() -> None:
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    model = build_model("mnist-mlp", ModelInput(10), seed=1)
    opt = make_optimizer(model, TrainConfig(lr=0.01, optimizer="sgd"))
    plan = batch_plan(torch.arange(64), seed=0, rank=0, start_sample=0, steps=200, batch_size=8)
    times: list[float] = []
    all_of_them = train_steps(model, opt, x, y, plan[:20], after_step=lambda _i, s: times.append(s))
    assert all_of_them.samples == 160  # no budget: every batch
    step = sorted(times)[len(times) // 2]
    # a budget of ~10 steps: far fewer than the 200 planned, and never none
    timed = train_steps(model, opt, x, y, plan, budget_seconds=10 * step)
    assert 1 <= timed.samples // 8 < 200, timed.samples  # ~10 steps on a quiet machine
    assert train_steps(model, opt, x, y, plan, budget_seconds=1e-9).samples == 8  # at least one step


def test_registered_models_have_the_documented_sizes() -> None:
    assert count_parameters(build_model("mnist-cnn", ModelInput(10))) == 1_199_882
    n = count_parameters(build_model("text-cnn", ModelInput(3, 20_000)))
    assert 1_000_000 < n < 2_000_000


def test_balanced_class_weights_by_hand() -> None:
    from edgetrain.training import balanced_class_weights

    w = balanced_class_weights(torch.tensor([0, 0, 0, 1]), 2)
    # n / (k * count): 4 / (2*3) and 4 / (2*1)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))


def test_text_ngram_is_a_mean_over_features_that_ignores_padding() -> None:
    from edgetrain.datasets.text import NGRAM_BUCKETS, encode_ngrams, tokenize
    from edgetrain.models import input_features

    assert input_features("text-ngram") == "ngrams"
    assert input_features("text-cnn") == input_features("mnist-cnn") == input_features("") == "tokens"
    model = build_model("text-ngram", ModelInput(3, 2))
    assert count_parameters(model) == NGRAM_BUCKETS * 3 + 3
    with torch.no_grad():
        model.weight.weight.copy_(torch.randn(NGRAM_BUCKETS, 3, generator=torch.Generator().manual_seed(0)))
        model.weight.weight[0] = 0.0
    x = encode_ngrams([tokenize("good day"), tokenize("a much longer tweet than the first one")])
    alone = model(x[:1, : int((x[0] != 0).sum())])
    assert torch.allclose(model(x)[:1], alone, atol=1e-6)  # padding does not dilute the mean
    ids = x[0][x[0] != 0].long()
    assert torch.allclose(alone[0], model.weight.weight[ids].mean(0) + model.bias, atol=1e-6)


def test_text_ngram_with_embeddings_adds_a_mean_embedding_path_that_ignores_padding() -> None:
    from edgetrain.datasets.text import encode_ngrams, tokenize
    from edgetrain.models import TextNgram

    buckets, dim = 4096, 8
    linear = build_model("text-ngram", ModelInput(3, 2, buckets))
    assert isinstance(linear, TextNgram) and linear.embedding is None  # dim 0: the linear model, unchanged
    assert sorted(linear.state_dict()) == ["bias", "weight.weight"]
    model = build_model("text-ngram", ModelInput(3, 2, buckets, ngram_dim=dim))
    assert isinstance(model, TextNgram) and model.embedding is not None and model.out is not None
    assert count_parameters(model) == buckets * 3 + 3 + buckets * dim + dim * 3
    with torch.no_grad():
        model.weight.weight.normal_()
        model.weight.weight[0] = 0.0
    x = encode_ngrams([tokenize("good day"), tokenize("a much longer tweet than the first one")], buckets=buckets)
    alone = model(x[:1, : int((x[0] != 0).sum())])
    assert torch.allclose(model(x)[:1], alone, atol=1e-6)  # padding dilutes neither mean
    ids = x[0][x[0] != 0].long()
    want = model.weight.weight[ids].mean(0) + model.bias + model.out(model.embedding.weight[ids].mean(0))
    assert torch.allclose(alone[0], want, atol=1e-6)
    # the same seed, the same start on every node; the embedding path is trained, not a fixed projection
    again = build_model("text-ngram", ModelInput(3, 2, buckets, ngram_dim=dim))
    assert torch.equal(again.embedding.weight, model.embedding.weight)  # type: ignore[union-attr]
    assert torch.equal(again.out.weight, model.out.weight)  # type: ignore[union-attr]
    before = again.embedding.weight.detach().clone()  # type: ignore[union-attr]
    opt = make_optimizer(again, TrainConfig(lr=0.1, optimizer="adam"))
    train_steps(again, opt, x, torch.tensor([0, 2]), [torch.tensor([0, 1])], seed=0)
    moved = (again.embedding.weight.detach() - before).abs().sum(1) > 0  # type: ignore[union-attr]
    assert moved[ids].all() and not moved[0]  # the rows of the features seen moved; padding's did not


def test_log_count_ratios_by_hand() -> None:
    from edgetrain.models import log_count_ratios

    # feature 1 only in class 0's texts, 2 only in class 1's, 3 in both alike; 4 never occurs; 0 pads
    x = torch.tensor([[1, 3, 0], [1, 0, 0], [2, 3, 0]], dtype=torch.int32)
    y = torch.tensor([0, 0, 1])
    r = log_count_ratios(x, y, 2, 5, alpha=1.0)
    counts = torch.tensor([[0, 0], [2, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float64)
    p = (counts + 1) / (counts + 1).sum(0)
    q = (counts.flip(1) + 1) / (counts.flip(1) + 1).sum(0)  # two classes: the rest of one is the other
    raw = (p / q).log()
    want = raw / raw[1:4].abs().mean()
    want[0] = 0.0
    assert torch.allclose(r.double(), want, atol=1e-6)
    assert r[1, 0] > 0 > r[1, 1] and r[2, 1] > 0 > r[2, 0]  # a class's own feature scales up for it
    assert r[0].abs().sum() == 0 and r[1:4].abs().mean() == pytest.approx(1.0)


def test_text_ngram_scaled_by_log_count_ratios_keeps_its_state_and_learns_per_weight() -> None:
    from edgetrain.datasets.text import encode_ngrams, tokenize
    from edgetrain.errors import ConfigError
    from edgetrain.models import TextNgram

    buckets = 4096
    scale = torch.rand(buckets, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scale[:, 2] = 0.0  # class 2's rows are scaled to nothing
    model = build_model("text-ngram", ModelInput(3, 2, buckets, ngram_scale=scale))
    assert isinstance(model, TextNgram)
    # the scale is fixed and derived alike on every node: it does not travel, the state is the unscaled model's
    assert sorted(model.state_dict()) == ["bias", "weight.weight"] and count_parameters(model) == buckets * 3 + 3
    with torch.no_grad():
        model.weight.weight.normal_()
    x = encode_ngrams([tokenize("good day"), tokenize("a much longer tweet than the first one")], buckets=buckets)
    alone = model(x[:1, : int((x[0] != 0).sum())])
    assert torch.allclose(model(x)[:1], alone, atol=1e-6)  # padding does not dilute the mean
    ids = x[0][x[0] != 0].long()
    want = (model.weight.weight[ids] * scale[ids]).mean(0) + model.bias
    assert torch.allclose(alone[0], want, atol=1e-6)
    # parked on "meta" and given its state again, as the coordinator's evaluation model is: the scale stays
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to("meta").load_state_dict(state, assign=True)
    assert torch.allclose(model(x[:1, : len(ids)]), alone, atol=1e-6)
    before = model.weight.weight.detach().clone()
    opt = make_optimizer(model, TrainConfig(lr=0.1, optimizer="adam"))
    train_steps(model, opt, x, torch.tensor([0, 2]), [torch.tensor([0, 1])], seed=0)
    moved = (model.weight.weight.detach() - before).abs() > 0
    assert moved[ids, :2].all() and not moved[:, 2].any()  # a zero ratio freezes its weight
    with pytest.raises(ConfigError, match="scale has shape"):
        build_model("text-ngram", ModelInput(3, 2, buckets, ngram_scale=scale[:, :2]))


def test_text_ngram_learns_a_keyword_rule_with_a_large_step() -> None:
    from edgetrain.datasets.text import encode_ngrams

    words = ["good", "great", "happy", "bad", "awful", "sad", "the", "a", "day", "movie", "was", "is"]
    g = torch.Generator().manual_seed(0)
    texts = [[words[int(i)] for i in torch.randint(len(words), (5,), generator=g)] for _ in range(400)]
    y = torch.tensor([int(sum(w in ("good", "great", "happy") for w in t) > sum(w in ("bad", "awful", "sad")
                                                                                   for w in t)) for t in texts])
    x = encode_ngrams(texts)
    model = build_model("text-ngram", ModelInput(2, 2))
    opt = make_optimizer(model, TrainConfig(lr=0.1, optimizer="adam"))
    plan = batch_plan(torch.arange(300), seed=0, rank=0, start_sample=0, steps=60, batch_size=32)
    train_steps(model, opt, x, y, plan, seed=0)
    assert evaluate(model, x[300:], y[300:], 2).accuracy > 0.85


def test_default_learning_rates() -> None:
    from edgetrain.models import DEFAULT_LR, default_lr
    from edgetrain.spec import RunSpec

    assert default_lr("text-ngram") == 0.1
    assert default_lr("") == default_lr("text-cnn") == DEFAULT_LR == RunSpec(model="text-cnn").lr
    assert RunSpec().lr is None  # no model named: the data set's default model gives it (workload.resolve_spec)
    assert RunSpec(model="text-ngram").lr == 0.1  # a spec built in Python gets the model's rate, as the CLI does
    assert RunSpec(model="text-ngram", lr=0.003).lr == 0.003
    wire = RunSpec(model="text-ngram").to_proto()
    assert wire.lr == 0.1 and RunSpec.from_proto(wire).lr == 0.1  # the value travels, not "the default"
    assert RunSpec(lr=0.01, lr_decay=0.5).lr_at(2) == 0.0025


@pytest.mark.parametrize("dim", [0, 4])
def test_text_ngram_scores_alike_with_and_without_gradients(dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation's faster bag (a sum over every id, over the count of non-padding ones) is the training mean."""
    from edgetrain.models import TextNgram

    torch.manual_seed(0)
    buckets, classes = 64, 3
    scale = torch.rand(buckets, classes) + 0.5
    scale[0] = 0.0  # as log_count_ratios leaves the padding id
    model = TextNgram(classes, buckets=buckets, dim=dim, scale=scale)
    with torch.no_grad():
        model.weight.weight.normal_()
        if model.embedding is not None:
            model.embedding.weight[1:].normal_()
    x = torch.randint(1, buckets, (6, 10))
    x[0, 3:] = 0  # padded
    x[1] = 0  # an empty text: the bias alone
    modes: list[tuple[bool, str]] = []
    bag = torch.nn.functional.embedding_bag

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        modes.append((torch.is_grad_enabled(), str(kwargs.get("mode"))))
        return bag(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "embedding_bag", recording)
    trained = model(x)  # with gradients: EmbeddingBag's padding path
    trained.sum().backward()
    assert model.weight.weight.grad is not None and not model.weight.weight.grad[0].any()  # padding: never trained
    with torch.no_grad():
        evaluated = model(x)
    assert {mode for grad, mode in modes if grad} == {"mean"} and {mode for grad, mode in modes if not grad} == {"sum"}
    assert torch.allclose(trained, evaluated, atol=1e-6)
    assert torch.allclose(evaluated[1], model.bias)
    unscaled = TextNgram(classes, buckets=buckets)
    with torch.no_grad():
        unscaled.weight.weight.normal_()  # a padding row that is not zero: the sum would count it
        assert unscaled.weight.weight[0].abs().sum() > 0
        assert torch.allclose(unscaled(x), unscaled.weight(x) + unscaled.bias)  # so the padding path serves
