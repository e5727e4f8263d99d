"""csv/tsv files the user brings: both kinds, header detection, every error names file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from edgetrain.datasets import DatasetFormatError, load_dataset
from edgetrain.datasets.tabular import read_table
from edgetrain.errors import DatasetError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def text_rows(n: int) -> str:
    labels = ["spam", "ham", "eggs"]
    return "".join(f'{labels[i % 3]},"text number {i}, with a comma"\n' for i in range(n))


def image_row(label: str, value: int = 0) -> str:
    return ",".join([label] + [str(value)] * 784) + "\n"


def test_text_csv_with_header_and_quotes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'label,text\npos,"multi\nline, quoted"\nneg,plain\n')
    table = read_table(path, delimiter=",")
    assert table.kind == "text" and table.classes == ("neg", "pos")
    assert table.texts == ["multi\nline, quoted", "plain"] and table.labels == [1, 0]


def test_text_csv_without_header(tmp_path: Path) -> None:
    table = read_table(write(tmp_path / "d.csv", "b,x\na,y\n\nb,z\n"), delimiter=",")
    assert table.classes == ("a", "b") and table.labels == [1, 0, 1] and table.texts == ["x", "y", "z"]


def test_tsv_has_no_quoting(tmp_path: Path) -> None:
    table = read_table(write(tmp_path / "d.tsv", 'label\ttext\nneg\t"quoted" start\n'), delimiter="\t")
    assert table.texts == ['"quoted" start']


def test_numeric_labels_sorted_numerically(tmp_path: Path) -> None:
    table = read_table(write(tmp_path / "d.csv", "10,a\n2,b\n1,c\n"), delimiter=",")
    assert table.classes == ("1", "2", "10") and table.labels == [2, 1, 0]


def test_image_csv(tmp_path: Path) -> None:
    header = "label," + ",".join(f"pixel{i}" for i in range(784)) + "\n"
    path = write(tmp_path / "d.csv", header + image_row("3", 255) + image_row("7", 0))
    table = read_table(path, delimiter=",")
    assert table.kind == "image" and table.classes == ("3", "7") and table.labels == [0, 1]
    assert table.pixels is not None and table.pixels.shape == (2, 784) and int(table.pixels[0, 0]) == 255


def test_gzipped_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(b"a,x\nb,y\n"))
    assert read_table(path, delimiter=",").texts == ["x", "y"]


def test_classes_side_file_and_integer_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "positive,good\n0,bad\n1,so so\n")
    write(tmp_path / "d.csv.classes.txt", "negative\nneutral\npositive\n")
    table = read_table(path, delimiter=",")
    assert table.classes == ("negative", "neutral", "positive") and table.labels == [2, 0, 1]
    write(path, "positive,good\nmixed,hmm\n")
    with pytest.raises(DatasetFormatError, match=r"d.csv: line 2: unknown label 'mixed' \(classes: negative"):
        read_table(path, delimiter=",")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "file is empty"),
        ("\n  \n", "file is empty"),
        ("label,text\n", r"no data rows \(only a header\)"),
        ("a,b,c\n", "line 1: 3 columns; expected 2 .* or 785"),
        ("a,x\nb,y\nc\n", "line 3: 1 columns, expected 2"),
        ('a,"x\ny"\nb,y,z\n', "line 3: 3 columns, expected 2"),  # line counted across a quoted newline
        ("a,x\n,y\n", "line 2: empty label"),
        ('a,x\nb,"unterminated\n', "line 2: unexpected end of data"),
        (
            image_row("1") + image_row("2", 256),
            r"line 2: pixel 0 \(column 2\) is '256', not an integer in 0..255",
        ),
        (image_row("1") + image_row("2").replace(",0,", ",x,", 1), "line 2: pixel 0 .* is 'x'"),
        (image_row("1") + image_row("2").replace(",0\n", ",-1\n"), "line 2: pixel 783 .* is '-1'"),
        (image_row("1") + "2,0\n", "line 2: 2 columns, expected 785"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(DatasetFormatError, match=match) as info:
        read_table(path, delimiter=",")
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_not_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"a,x\nb,caf\xe9\n")
    with pytest.raises(DatasetFormatError, match="line 2: not valid UTF-8"):
        read_table(path, delimiter=",")


def test_load_text_csv_end_to_end(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", text_rows(90) + text_rows(9))  # 9 exact duplicates
    data = load_dataset("csv", data_path=path, max_len=8)
    assert data.kind == "text" and data.default_model == "text-ngram" and data.classes == ("eggs", "ham", "spam")
    assert data.val is not None
    assert len(data.train) + len(data.val) + len(data.test) == 90  # duplicates removed
    assert len(data.test) == 9  # 10% of each class (30 each -> 3 each)
    assert data.test.y.bincount().tolist() == [3, 3, 3]
    assert data.val.y.bincount().tolist() == [3, 3, 3]  # then 10% of each class of the 27 left (3 each)
    assert data.train.x.shape == (72, 8) and data.vocab is not None


def test_load_image_tsv_end_to_end(tmp_path: Path) -> None:
    rows = "".join(image_row(str(i % 2), i).replace(",", "\t") for i in range(40))
    data = load_dataset("tsv", data_path=write(tmp_path / "d.tsv", rows))
    assert data.kind == "image" and data.train.x.shape == (36, 1, 28, 28) and len(data.test) == 4
    assert data.train.x.dtype == torch.float32 and data.vocab is None


def test_csv_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="csv needs data_path"):
        load_dataset("csv")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("tsv", data_path=tmp_path / "nope.tsv")


def test_too_small_to_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"csv: 3 examples are too few for a 10% test split"):
        load_dataset("csv", data_path=write(tmp_path / "d.csv", "a,x\nb,y\na,z\n"))


def test_a_header_it_does_not_know_is_not_read_as_a_class(tmp_path: Path) -> None:
    rows = "".join(f"{'neg' if i % 2 else 'pos'},text {i}\n" for i in range(40))
    path = write(tmp_path / "h.csv", "tweet_sentiment,tweet_text\n" + rows)
    with pytest.raises(DatasetFormatError, match=r"h.csv: line 1: label 'tweet_sentiment' occurs on no other line; "
                                                 r"if this line is a header, name its first column 'label'"):
        read_table(path, delimiter=",")
    assert read_table(write(tmp_path / "ok.csv", "label,text\n" + rows), delimiter=",").classes == ("neg", "pos")


def test_a_file_with_the_label_last_is_refused(tmp_path: Path) -> None:
    rows = "".join(f"text {i},{'neg' if i % 2 else 'pos'}\n" for i in range(40))
    path = write(tmp_path / "last.csv", "text 0,neg\n" + rows)  # its first "label" occurs twice: no header
    with pytest.raises(DatasetFormatError, match=r"40 different labels in 41 rows: the label must be the first column"):
        read_table(path, delimiter=",")


def test_an_unclosed_quote_is_reported_where_its_record_starts(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "a,x\nb,\"oops\n" + "c,y\n" * 50)
    with pytest.raises(DatasetFormatError, match=r"q.csv: line 2: unexpected end of data"):
        read_table(path, delimiter=",")
