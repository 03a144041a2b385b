"""bench.pipeline.hop_stats: each stage's share of a message's latency, from the journal's
publish times (a pure function; the benchmark itself is never run by the test suite); and
bench.common.wal_number, which tells whether a latency phase contained a RabbitMQ WAL
roll-over."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.common import wal_number
from bench.pipeline import hop_stats


def test_each_stage_gets_the_time_from_its_queue_to_the_next() -> None:
    sent = {"t-1": 100.000, "t-2": 100.010}
    journal = {"t-1": {"mail.parse": 100.000, "mail.route": 100.002, "mail.persist": 100.005},
               "t-2": {"mail.parse": 100.010, "mail.route": 100.014, "mail.persist": 100.016}}
    finished = {"t-1": 100.006, "t-2": 100.026}
    hops = hop_stats(journal, finished, sent)
    assert hops["parse"]["p50"] == pytest.approx(2.0)
    assert hops["parse"]["p99"] == pytest.approx(4.0)
    assert hops["route"]["p99"] == pytest.approx(3.0)
    assert hops["persist"]["p50"] == pytest.approx(1.0)
    assert hops["persist"]["p99"] == pytest.approx(10.0)


def test_messages_missing_a_hop_are_left_out_and_ms_rounding_never_goes_negative() -> None:
    sent = {"t-1": 100.0004, "t-2": 100.0}
    journal = {"t-1": {"mail.route": 100.000, "mail.persist": 100.001},  # ms-truncated
               "t-2": {"mail.route": 100.001}}  # never reached persist's queue
    hops = hop_stats(journal, {"t-1": 100.002, "t-2": 100.003}, sent)
    assert hops["parse"] == {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    assert hops["persist"]["p50"] == pytest.approx(1.0)
    assert hop_stats({}, {}, sent) == {}


def test_wal_number_is_the_newest_wal_files_number_or_none(tmp_path: Path) -> None:
    node = tmp_path / "mnesia" / "rabbit@host" / "quorum" / "rabbit@host"
    pattern = str(tmp_path / "mnesia" / "*" / "quorum" / "*" / "*.wal")
    assert wal_number(pattern) is None  # no broker here: unknown, not zero
    node.mkdir(parents=True)
    for name in ("00000009.wal", "00000010.wal", "meta.dets", "names.wal"):
        (node / name).touch()
    assert wal_number(pattern) == 10
