"""SIGKILL of workers while mail flows (RELIABILITY.md faults 1, 2 and 3).

About 2,000 messages go from Dovecot through the four worker processes into PostgreSQL while
workers of every kind are SIGKILLed at random moments and restarted; the seed is printed (set
``FAULT_SEED`` to repeat a run, ``FAULT_MESSAGES`` and ``FAULT_KILLS`` to make it longer: the
``make soak`` target does).  Then the three exact crash points: after a stage's outputs are
confirmed but before its ack, after persist's commit but before its ack, after ingest's
confirm but before its cursor is saved.  Each ends with every message recorded exactly once.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.faults.harness import STAGES, Pipeline, postgres_engine
from tests.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def engine() -> Iterator[Engine]:
    with postgres_engine() as engine:
        yield engine


def test_random_sigkills_of_every_worker_kind_lose_and_double_nothing(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    seed = int(os.environ.get("FAULT_SEED", random.randrange(2**32)))
    total = int(os.environ.get("FAULT_MESSAGES", 2000))
    rounds = int(os.environ.get("FAULT_KILLS", 2))  # kills of each worker kind
    print(f"fault seed {seed} (FAULT_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    # ingest's batches small, so that a kill often lands between a confirm and a cursor save
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                        mailbox={"batch_size": 20})
    victims = list(STAGES) * rounds
    rng.shuffle(victims)
    waves = len(victims)
    per_wave = -(-total // waves)
    try:
        pipeline.start()
        for wave, victim in enumerate(victims):
            numbers = range(wave * per_wave, min(total, (wave + 1) * per_wave))
            fetched_before = fetched(pipeline)
            pipeline.send(rng.choice(("alice", "dave")), "kill", numbers)
            # a random moment while this wave flows: after a random share of it is stored
            target = len(pipeline.sent) - len(numbers) + rng.randrange(len(numbers) or 1)
            if victim == "ingest":
                wanted = fetched_before + rng.randrange(1, max(2, len(numbers)))
                wait_for(lambda w=wanted: fetched(pipeline) >= w,  # type: ignore[misc]
                         "ingest to fetch part of a wave")
            else:
                pipeline.wait_persisted(target)
            code = pipeline.workers.kill(victim)
            print(f"wave {wave}: SIGKILL {victim} at {pipeline.persisted()} persisted")
            assert code == -signal.SIGKILL
            pipeline.start(victim)
        pipeline.wait_persisted()
        pipeline.assert_exactly_once()
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def fetched(pipeline: Pipeline) -> float:
    return pipeline.workers.counter("ingest", "mailroute_mailbox_messages_fetched_total")


CRASH_POINTS = {
    "parse": "kill-before-ack",
    "route": "kill-before-ack",
    "persist": "kill-after-commit",
    "ingest": "kill-before-cursor",
}


def test_every_worker_killed_at_its_exact_crash_point_redelivers_and_records_once(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    """All four at once: each worker dies at its first batch, at its own crash point."""
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                        mailbox={"batch_size": 10})
    pipeline.send("alice", "point", range(60))
    try:
        for stage, fault in CRASH_POINTS.items():
            pipeline.start(stage, fault=fault)
        for stage in STAGES:
            # ingest dies at once; each later stage dies once a batch reaches it
            assert pipeline.workers.wait_exit(stage) == -signal.SIGKILL, \
                pipeline.workers.logs()
            assert "fault: SIGKILL" in pipeline.workers.log_path(stage).read_text()
            pipeline.start(stage)
        pipeline.wait_persisted()
        # the batch whose cursor was never saved is fetched a second time
        wait_for(lambda: fetched(pipeline) >= 10, "ingest to fetch the first batch again")
        pipeline.assert_exactly_once()
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()
