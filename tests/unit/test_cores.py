import os

import pytest

from edgetrain.cores import format_cores, parse_cores, read_affinity, split_cores, validate_cores
from edgetrain.errors import CoresError


@pytest.mark.parametrize(
    ("text", "cores"),
    [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-3,8", [0, 1, 2, 3, 8]), ("0-10:2", [0, 2, 4, 6, 8, 10]),
     ("3,1,1", [1, 3]), (" 0-1 ", [0, 1]), ("0, 2", [0, 2]), ("1-7:3,0", [0, 1, 4, 7])],
)
def test_parse_cores_reads_taskset_lists(text: str, cores: list[int]) -> None:
    assert parse_cores(text) == cores


@pytest.mark.parametrize("text", ["", "a", "3-1", "0-4:0", "1,,2", "-1", "0-", "0 - 1"])
def test_parse_cores_refuses_bad_lists(text: str) -> None:
    with pytest.raises(CoresError):
        parse_cores(text)


def test_format_is_the_inverse_of_parse() -> None:
    for cores in ([0, 1, 2, 3, 8], [5], [0, 2, 4], list(range(16))):
        assert parse_cores(format_cores(cores)) == cores
    assert format_cores([0, 1, 2, 3, 8]) == "0-3,8"


def test_cores_outside_affinity_are_refused_with_what_is_allowed() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    with pytest.raises(CoresError, match=rf"not available.*\({len(allowed)} cores\)"):
        validate_cores([max(allowed) + 1], allowed)
    assert validate_cores(allowed) == allowed


def test_split_cores_gives_disjoint_near_equal_groups() -> None:
    assert split_cores([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(CoresError):
        split_cores([0], 2)


def test_read_affinity_matches_the_kernel() -> None:
    assert read_affinity(os.getpid()) == sorted(os.sched_getaffinity(0))
