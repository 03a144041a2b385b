"""Unit tests of the operations pieces that need no server: trace ids in log lines, the queue
depth collector, journal settings, replay times and filters, and the CLI's refusals."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from prometheus_client import generate_latest

from shared.cli_replay import parse_time, resume_command
from shared.dead_letters import describe
from shared.logs import _JsonFormatter, _TextFormatter, traced
from shared.metrics import Metrics
from shared.queue_metrics import CACHE_SECONDS, QueueDepthCollector
from shared.replay import ReplayRequest, Simulated, Simulator, normalise_message_id
from shared.settings import ConfigError, load_settings
from shared.topology import Topology
from tests import documents
from tests.processes import REPO


def record(message: str, **extra: Any) -> logging.LogRecord:
    entry = logging.LogRecord("mailroute.test", logging.INFO, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(entry, key, value)
    return entry


def test_json_log_lines_carry_the_trace_id_and_named_fields() -> None:
    line = _JsonFormatter().format(record("handled\nforged", **traced("abc123", stage="parse")))
    entry = json.loads(line)
    assert entry["trace_id"] == "abc123" and entry["stage"] == "parse"
    assert entry["msg"] == "handled\nforged" and "\n" not in line
    assert "trace_id" not in json.loads(_JsonFormatter().format(record("plain")))


def test_text_log_lines_end_with_the_trace_and_stay_one_line() -> None:
    formatter = _TextFormatter("%(levelname)s %(message)s")
    line = formatter.format(record("dead-lettered\r\nFAKE", **traced("t-9")))
    assert line == "INFO dead-lettered\\r\\nFAKE trace=t-9"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_queue_depths_are_exported_per_queue_and_cached_between_scrapes() -> None:
    calls: list[list[str]] = []

    def fetch(queues: list[str]) -> dict[str, tuple[int, int]]:
        calls.append(queues)
        return {"mail.parse": (12, 2), "mail.route.dead": (3, 0)}

    clock = FakeClock()
    metrics = Metrics()
    metrics.watch(QueueDepthCollector(Topology(), fetch, clock))
    text = generate_latest(metrics.registry).decode()
    assert 'mailroute_queue_depth{kind="input",queue="mail.parse",stage="parse"} 12.0' in text
    assert 'mailroute_queue_depth{kind="dead",queue="mail.route.dead",stage="route"} 3.0' in text
    assert 'mailroute_queue_consumers{kind="input",queue="mail.parse",stage="parse"} 2.0' in text
    assert "mailroute_queue_depth_up 1.0" in text
    assert len(calls[0]) == 6
    generate_latest(metrics.registry)
    assert len(calls) == 1
    clock.now += CACHE_SECONDS + 1
    generate_latest(metrics.registry)
    assert len(calls) == 2


def test_an_unreachable_broker_gives_depth_up_zero_not_a_failed_scrape() -> None:
    def fetch(queues: list[str]) -> dict[str, tuple[int, int]]:
        raise ConnectionError("refused")

    metrics = Metrics()
    metrics.watch(QueueDepthCollector(Topology(), fetch))
    text = generate_latest(metrics.registry).decode()
    assert "mailroute_queue_depth_up 0.0" in text
    assert "mailroute_queue_depth{" not in text


def test_journal_retention_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("broker:\n  journal:\n    max_age: 12h\n")
    assert load_settings(config).broker.journal.max_age == "12h"
    with pytest.raises(ConfigError, match=r"broker\.journal\.max_age"):
        load_settings(config, environ={"MAILROUTE_BROKER__JOURNAL__MAX_AGE": "a week"})
    with pytest.raises(ConfigError, match=r"broker\.journal"):
        load_settings(config, environ={"MAILROUTE_BROKER__JOURNAL__SEGMENT_SIZE_BYTES": "0"})


def test_replay_times_absolute_relative_and_naive_as_utc() -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now, "--since") == now - timedelta(hours=2)
    assert parse_time("now", now, "--until") == now
    assert parse_time("2026-11-27T10:00", now, "--since") == datetime(2026, 11, 27, 10,
                                                                      tzinfo=UTC)
    assert parse_time("2026-11-27T10:00+01:00", now, "--since").hour == 10
    with pytest.raises(click.BadParameter):
        parse_time("yesterday", now, "--since")


def test_a_replay_request_has_a_stable_key_and_an_exact_resume_command() -> None:
    since = datetime(2026, 11, 27, 10, tzinfo=UTC)
    request = ReplayRequest("route", since, since + timedelta(hours=1), user="bob o'neil")
    assert request.key() == ReplayRequest("route", since, since + timedelta(hours=1),
                                          user="bob o'neil").key()
    assert request.key() != ReplayRequest("route", since, since + timedelta(hours=2)).key()
    command = resume_command(request)
    assert "--since 2026-11-27T10:00:00+00:00" in command and "--user 'bob o'\"'\"'neil'" in \
        command


def test_the_simulator_runs_route_from_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("mailboxes:\n  - {name: alice, kind: maildir, path: x}\n"
                      "users:\n  - {name: alice, address: alice@example.com, mailbox: alice}\n")
    simulator = Simulator(load_settings(config), None)
    routed = simulator.downstream("route", documents.parsed(mailbox="alice")).routed
    assert [d["principal"] for d in routed[0]["deliveries"]] == ["alice"]
    unknown = simulator.downstream("route", documents.parsed(mailbox="nobody"))
    assert unknown.routed == [] and unknown.dead_reason is not None
    assert simulator.downstream("persist", {"x": 1}) == Simulated([{"x": 1}])
    assert normalise_message_id(" <Abc@X> ") == "abc@x"


def test_broker_dead_lettered_messages_are_described_from_x_death() -> None:
    letter = describe("parse", {"x-death": [{"reason": "delivery_limit", "queue": "mail.parse",
                                             "count": 1}], "x-delivery-count": 5}, b"{}")
    assert letter.reason == "delivery-limit" and letter.attempts == 5
    assert "mail.parse" in letter.detail
    mine = describe("route", {"x-mailroute-reason": "untrusted-forwarder",
                              "x-mailroute-attempts": 1}, b"not json")
    assert mine.reason == "untrusted-forwarder" and mine.summary() == "(not a JSON document)"
    assert mine.id != describe("route", {"x-mailroute-reason": "other"}, b"not json").id


@pytest.mark.parametrize("args", [
    ["replay", "--stage", "parse", "--since", "1h"],
    ["dead", "list"],
])
def test_operations_commands_refuse_the_in_process_broker_with_exit_2(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "MAILROUTE_BROKER__URL": "memory://"})
    assert result.returncode == 2, result.stderr
    assert "memory://" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_broker_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "dead", "list", "--stage", "parse"], cwd=REPO,
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MAILROUTE_BROKER__URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("Error: broker:")
    assert "Traceback" not in result.stderr


def test_help_lists_the_operations_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "shared.cli", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert "  replay " in result.stdout and "  dead " in result.stdout
