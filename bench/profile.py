"""Sampling profiles of running worker processes with py-spy, and their summary.

Takes a folder and a mapping of name -> pid; :meth:`PySpy.start` attaches ``py-spy record``
(non-blocking sampling, raw collapsed stacks, idle threads left out) to each process and
:meth:`PySpy.stop` ends the recordings, leaving ``<folder>/<name>.txt``.  :func:`summarise`
turns one such file into the functions with the most samples, on their own and including
what they call.  py-spy is a development tool, not a mailroute dependency: without it the
benchmark fails with :class:`~bench.common.BenchError` saying how to install it.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError

SAMPLE_RATE = 250
# Frames on nearly every stack (thread start-up), left out of the "total" list.
_GENERIC = ("(threading.py)", "(concurrent/futures/thread.py)")
# "function (file:line)" -> "function (file)"; lines split one function into many rows.
_LINE = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class PySpy:
    def __init__(self, folder: Path | None, pids: dict[str, int]) -> None:
        self.folder = folder or Path(".")
        self.pids = pids
        self.recorders: dict[str, subprocess.Popen[bytes]] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.txt"

    def start(self) -> None:
        executable = py_spy()
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            self.recorders[name] = subprocess.Popen(
                [executable, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE),
                 "--nonblocking", "--threads", "--format", "raw", "--output",
                 str(self.path(name))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for recorder in self.recorders.values():
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)
        for recorder in self.recorders.values():
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()


# Where a sample's time goes, decided by the first rule whose frame is on its stack.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("codec decode (marshmallow load + json)", ("Codec.decode ",)),
    ("codec encode (marshmallow dump + validate + json)", ("Codec.encode ",)),
    ("stage work", ("ParseStage.handle ", "RouteStage.handle ", "RouteStage.handle_batch ",
                    "PersistStage.handle_batch ")),
    ("publish + wait for confirms", ("Publisher.publish_envelopes ", "Publisher.send ",
                                     "Publisher.wait ")),
    ("acks (kombu, OwedAcks)", ("Message.ack ", "OwedAcks.pay ", "StageRunner._ack ")),
    ("metrics", ("prometheus_client", "MetricsServer", "_SocketWriter")),
    ("receive deliveries (kombu drain_events)", ("drain_events ", "StageRunner._poll ",
                                                 "StageRunner._take_arrived ")),
    ("keepalive thread (heartbeats while a handler runs)", ("HeartbeatsWhileBusy.",)),
)


def categorise(path: Path) -> list[tuple[str, float]]:
    """Share of samples in each of :data:`CATEGORIES` (plus "other"), largest first."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_frame(f) + " " for f in stack.split(";")]
        category = next((name for name, markers in CATEGORIES
                         if any(frame.startswith(markers) or
                                any(m in frame for m in markers if not m.endswith(" "))
                                for frame in frames)), "other")
        counts[category] += int(count_text)
    total = sum(counts.values()) or 1
    return [(name, n / total) for name, n in counts.most_common()]


@dataclass
class Summary:
    samples: int
    own: list[tuple[str, float]]  # share of samples with the function on top
    total: list[tuple[str, float]]  # share of samples with the function anywhere


def _frame(raw: str) -> str:
    match = _LINE.match(raw.strip())
    if not match:
        return raw.strip()
    function, where = match.groups()
    where = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", where)
    where = re.sub(r"^/work/main/", "", where)
    return f"{function} ({where})"


def summarise(path: Path, top: int = 15) -> Summary:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            if not name.endswith(_GENERIC):
                total[name] += count
    if not samples:
        return Summary(0, [], [])
    return Summary(samples,
                   [(name, n / samples) for name, n in own.most_common(top)],
                   [(name, n / samples) for name, n in total.most_common(top * 2)])
