"""bench.persist: the pure parts (shares of the documents among writers, the combined rate,
the figures), and the two-writer measurement itself on 200 records through the real
PostgreSQL (the full benchmark is never run by the test suite)."""

from __future__ import annotations

import pytest

from bench.common import BenchError
from bench.persist import (
    PersistSettings,
    WriterTiming,
    check_settings,
    combined_rate,
    run,
    split_among,
    writers_figure,
)


@pytest.mark.parametrize(("count", "writers"), [(20_000, 2), (3001, 2), (7, 3), (5, 1)])
def test_each_record_goes_to_exactly_one_writer(count: int, writers: int) -> None:
    shares = split_among(count, writers)
    assert len(shares) == writers
    assert sorted(index for share in shares for index in share) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_rate_spans_the_first_start_to_the_last_end() -> None:
    timings = [WriterTiming(900, started=10.0, ended=10.5),
               WriterTiming(1100, started=10.1, ended=11.0)]
    assert combined_rate(timings) == pytest.approx(2000 / 1.0)
    assert combined_rate([WriterTiming(500, 2.0, 2.25)]) == pytest.approx(2000.0)


def test_only_the_figures_of_several_writers_carry_the_target() -> None:
    one = writers_figure(1, [5000.0, 4800.0, 5100.0], [5000.0, 5000.0, 5000.0])
    two = writers_figure(2, [8400.0], [9000.0])
    assert one.name == "persist records/s (PostgreSQL)"
    assert (one.value, one.target, one.meets_target) == (5000.0, "", None)
    assert two.name == "persist records/s, 2 writers (PostgreSQL)"
    assert (two.target, two.meets_target, two.ceiling) == (">= 8,000", True, 9000.0)
    assert two.detail == {"writers": 2, "rounds": [8400.0], "ceiling_rounds": [9000.0]}


def test_a_writer_needs_a_timed_batch_after_its_warm_up() -> None:
    with pytest.raises(BenchError, match="not more than one batch"):
        check_settings(PersistSettings(records=100, batch_size=50, writers=(1, 2)))
    check_settings(PersistSettings(records=202, batch_size=50, writers=(1, 2)))


def test_two_writers_store_every_record_once_as_plain_sqlalchemy_does() -> None:
    # run() fails unless ours stored all 200 emails and both databases hold the same rows
    (figure,) = run(PersistSettings(records=200, batch_size=20, rounds=1, writers=(2,)))
    assert figure.name == "persist records/s, 2 writers (PostgreSQL)"
    assert figure.value > 0 and figure.ceiling is not None and figure.ceiling > 0
    assert len(figure.detail["rounds"]) == len(figure.detail["ceiling_rounds"]) == 1
