"""The memory benchmark: each worker's resident memory, at steady state and for a big mail.

Takes :class:`MemorySettings`; gives figures.  Runs the four worker processes (``mailroute
worker``) on a private Dovecot, a private RabbitMQ vhost and a fresh PostgreSQL database (the
fault tests' pipeline harness), sends ``messages`` mails of about 4 KB through them and reads
each worker's resident set (``VmRSS``) once all are stored: the steady state.  Then one
message with a ``attachment_mb`` attachment: each worker's peak (``VmHWM``) minus its resident
set before, against the raw message's size.  Then ``run_of`` more such messages delivered
while ingest is stopped, a backlog it finds in one poll: each worker's peak since the steady
state, against one message's size (a run must go through one message at a time, nothing of
one still held while the next is handled).
Targets: every worker under 150 MB at steady state; no worker growing by more than 5 times
the message size, for one message or a run.  There is no ceiling to
measure in the same run: these are absolute figures.  Fails with
:class:`~bench.common.BenchError` when a worker dies or mail is not stored.
"""

from __future__ import annotations

import base64
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, Figure, private_database, private_vhost, progress
from persist.database import create_engine_for
from tests import hostile_mail
from tests.dovecot import DovecotServer
from tests.faults.harness import STAGES, Pipeline
from tests.processes import wait_for

STEADY_TARGET_MB = 150.0
GROWTH_TARGET = 5.0


@dataclass(frozen=True)
class MemorySettings:
    messages: int = 2000
    attachment_mb: int = 25
    run_of: int = 4


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"memory: no {field} for process {pid}")


def big_message(megabytes: int, number: int = 0) -> bytes:
    payload = base64.encodebytes(os.urandom(megabytes * 1024 * 1024))
    return hostile_mail.with_attachment(b"big.bin", payload).replace(
        b"<hostile@example.org>", f"<big-attachment-{number}@example.org>".encode())


def _growth(pids: dict[str, int], steady: dict[str, float]) -> dict[str, float]:
    """Each worker's peak resident set (``VmHWM``) above its steady state, in MB."""
    return {stage: max(0.0, status_kb(pid, "VmHWM") / 1024 - steady[stage])
            for stage, pid in pids.items()}


def run(settings: MemorySettings) -> list[Figure]:
    dovecot = DovecotServer(tls=False)
    with tempfile.TemporaryDirectory(prefix="mailroute-memory-") as work, \
            private_vhost("memory") as vhost, private_database("memory") as database:
        engine = create_engine_for(database)
        pipeline: Pipeline | None = None
        try:
            dovecot.start()
            pipeline = Pipeline(Path(work), dovecot, vhost.url, engine)
            progress(f"memory: {settings.messages} messages of ~4 KB through four workers")
            pipeline.send("alice", "memory", range(settings.messages), body="x" * 3500)
            pipeline.start()
            pipeline.wait_persisted(timeout=1800)
            pids = {stage: pipeline.workers.processes[stage].pid for stage in STAGES}
            steady = {stage: status_kb(pid, "VmRSS") / 1024 for stage, pid in pids.items()}
            progress(f"memory: steady state {steady}; now one {settings.attachment_mb} MB "
                     "attachment")
            raw = big_message(settings.attachment_mb)
            dovecot.deliver("alice", raw)
            wait_for(lambda: pipeline is not None and
                     pipeline.persisted() >= settings.messages + 1,
                     "the big message to be stored", timeout=1800,
                     on_timeout=pipeline.workers.logs)
            growth = _growth(pids, steady)
            progress(f"memory: growth {growth}; now {settings.run_of} more at once")
            # Delivered while ingest is stopped: a backlog, which it finds in one poll, and
            # which reaches the other stages at once.  The restarted ingest is measured
            # against the steady state of the one before (the same code and settings).
            pipeline.workers.kill("ingest", signal.SIGTERM)
            for number in range(1, settings.run_of + 1):
                dovecot.deliver("alice", big_message(settings.attachment_mb, number))
            pipeline.workers.start("ingest")
            pids["ingest"] = pipeline.workers.processes["ingest"].pid
            wait_for(lambda: pipeline is not None and
                     pipeline.persisted() >= settings.messages + 1 + settings.run_of,
                     "the run of big messages to be stored", timeout=1800,
                     on_timeout=pipeline.workers.logs)
            run_growth = _growth(pids, steady)
            if any(p.poll() is not None for p in pipeline.workers.processes.values()):
                raise BenchError(f"memory: a worker died\n{pipeline.workers.logs()}")
        finally:
            if pipeline is not None:
                pipeline.stop()
            engine.dispose()
            dovecot.stop()
    size_mb = len(raw) / (1024 * 1024)
    worst = max(growth.values()) / size_mb
    worst_run = max(run_growth.values()) / size_mb
    biggest = max(steady.values())
    return [
        Figure("worker RSS at steady state (max)", biggest, "MB", None,
               higher_is_better=False, target=f"< {STEADY_TARGET_MB:g} MB each",
               meets_target=biggest < STEADY_TARGET_MB, detail={"rss_mb": steady}),
        Figure("worker growth / message size (max)", worst, "x", None,
               higher_is_better=False, target=f"<= {GROWTH_TARGET:g}x",
               meets_target=worst <= GROWTH_TARGET,
               detail={"growth_mb": growth, "message_mb": size_mb}),
        Figure(f"worker growth / message size, {settings.run_of} more at once (max)",
               worst_run, "x", None, higher_is_better=False, target=f"<= {GROWTH_TARGET:g}x",
               meets_target=worst_run <= GROWTH_TARGET,
               detail={"growth_mb": run_growth, "message_mb": size_mb}),
    ]
