"""What every benchmark shares: figures and their JSON, progress lines, private servers.

Takes nothing global.  Gives :class:`Figure` (a value with the ceiling it is compared to),
:func:`write_report` (``var/bench/<name>.json``), :func:`progress` (stderr), percentiles, and
two context managers that give a benchmark servers of its own and clean up whatever happens:
:func:`private_vhost` (a RabbitMQ vhost made and deleted through the management API) and
:func:`private_database` (a PostgreSQL database created, migrated, and dropped ``WITH
(FORCE)``).  Fails with :class:`BenchError` (a one-line message) when a server is missing.
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
REPORT_DIR = REPO / "var" / "bench"
MANAGEMENT_URL = os.environ.get("MAILROUTE_BENCH_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP_HOST = os.environ.get("MAILROUTE_BENCH_AMQP_HOST", "127.0.0.1:5672")
POSTGRES_ADMIN_URL = os.environ.get(
    "MAILROUTE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


class BenchError(RuntimeError):
    """A benchmark cannot run or did not finish correctly; the message says why."""


@dataclass
class Figure:
    """One measured figure and the ceiling measured in the same run.

    ``higher_is_better`` decides the ratio: value/ceiling for rates, ceiling/value for
    latencies, so a ratio of 1.0 always means "as good as the ceiling".
    """

    name: str
    value: float
    unit: str
    ceiling: float | None
    higher_is_better: bool = True
    target: str = ""
    meets_target: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    reference: str = "ceiling"  # what the ceiling is called when printed

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None or self.ceiling == 0 or self.value == 0:
            return None
        return self.value / self.ceiling if self.higher_is_better else self.ceiling / self.value

    def line(self) -> str:
        ratio = self.ratio
        text = f"{self.name:<34} {_number(self.value):>10} {self.unit:<6}"
        if self.ceiling is not None:
            text += (f"  {self.reference} {_number(self.ceiling):>9}  ratio {ratio:.2f}"
                     if ratio else "")
        if self.target:
            verdict = {True: "met", False: "MISSED", None: ""}[self.meets_target]
            text += f"  target {self.target} {verdict}".rstrip()
        return text

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def _number(value: float) -> str:
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries the figures)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [float(v) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": load_average()}


def write_report(name: str, figures: Sequence[Figure], settings: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Path:
    """``var/bench/<name>.json``: the headline figure (the first) at the top level, then all."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    head = figures[0]
    report = {
        "name": name,
        "value": head.value,
        "unit": head.unit,
        "ceiling": head.ceiling,
        "ratio": head.ratio,
        "figures": {f.name: f.as_json() for f in figures},
        "settings": settings,
        "machine": machine(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    path = REPORT_DIR / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty sequence."""
    if not values:
        raise BenchError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


# -- RabbitMQ --------------------------------------------------------------------------------
def management(method: str, path: str, body: Any = None) -> Any:
    token = base64.b64encode(b"guest:guest").decode()
    request = urllib.request.Request(
        MANAGEMENT_URL + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Basic {token}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


@dataclass(frozen=True)
class Vhost:
    name: str
    url: str


@contextmanager
def private_vhost(label: str) -> Iterator[Vhost]:
    """A fresh vhost for the guest user, deleted afterwards (with all its queues)."""
    name = f"mailroute-bench-{label}-{secrets.token_hex(4)}"
    quoted = urllib.parse.quote(name, safe="")
    try:
        management("PUT", f"/api/vhosts/{quoted}", {})
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"RabbitMQ management API on {MANAGEMENT_URL} not reachable ({exc}); "
                         "run `make services`") from exc
    try:
        management("PUT", f"/api/permissions/{quoted}/guest",
                   {"configure": ".*", "write": ".*", "read": ".*"})
        yield Vhost(name, f"amqp://guest:guest@{AMQP_HOST}/{quoted}")
    finally:
        try:
            management("DELETE", f"/api/vhosts/{quoted}")
        except (urllib.error.URLError, OSError) as exc:
            progress(f"could not delete vhost {name}: {exc}")


# -- PostgreSQL ------------------------------------------------------------------------------
@contextmanager
def private_database(label: str) -> Iterator[str]:
    """A new PostgreSQL database migrated to the newest revision; gives its URL."""
    from sqlalchemy import text

    from persist.database import create_engine_for, normalise_url, upgrade

    admin_url = normalise_url(POSTGRES_ADMIN_URL)
    name = f"mailroute_bench_{label}_{secrets.token_hex(4)}"
    admin = create_engine_for(admin_url)
    try:
        try:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:
            raise BenchError(f"PostgreSQL at {admin_url.render_as_string()} unusable "
                             f"({type(exc).__name__}: {exc}); run `make services`") from exc
        url = admin_url.set(database=name).render_as_string(hide_password=False)
        try:
            engine = create_engine_for(url)
            try:
                upgrade(engine)
            finally:
                engine.dispose()
            yield url
        finally:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# -- the broker's quorum-queue log ----------------------------------------------------------
RABBITMQ_WAL_GLOB = os.environ.get("MAILROUTE_BENCH_RABBITMQ_WAL_GLOB",
                                   "/var/lib/rabbitmq/mnesia/*/quorum/*/*.wal")


def wal_number(pattern: str = RABBITMQ_WAL_GLOB) -> int | None:
    """The number of the local RabbitMQ's newest quorum-queue WAL file, or None where it
    cannot be read.  It grows by one at each WAL roll-over, when the broker writes what the
    last WAL holds into each queue's segment files: a burst of broker CPU and disk writes,
    which a latency phase that contains it shows in its p99 (bench/README.md)."""
    numbers = [int(path.stem) for path in Path("/").glob(pattern.lstrip("/"))
               if path.stem.isdigit()]
    return max(numbers) if numbers else None


# -- the kernel's writeback ------------------------------------------------------------------
WRITEBACK_KEYS = ("dirty_background_bytes", "dirty_background_ratio",
                  "dirty_expire_centisecs", "dirty_writeback_centisecs")


def kernel_writeback() -> dict[str, int | None]:
    """The kernel's writeback settings (``/proc/sys/vm``), None where one cannot be read.

    With the defaults (expire after 30 s, no byte threshold) the journal stream's unsynced
    writes leave the page cache in one burst every 30 s, and the broker's WAL fdatasync waits
    behind it; deploy/sysctl/60-mailroute-writeback.conf is what `make services` sets."""
    values: dict[str, int | None] = {}
    for key in WRITEBACK_KEYS:
        try:
            values[key] = int(Path(f"/proc/sys/vm/{key}").read_text())
        except (OSError, ValueError):
            values[key] = None
    return values


def rabbitmq_wal_max_bytes() -> int | None:
    """The local RabbitMQ node's quorum-queue WAL size (``raft.wal_max_size_bytes``), None
    where ``rabbitmqctl`` cannot tell.  deploy/rabbitmq/60-mailroute.conf sets 16 MB; at the
    default 512 MB each roll-over stalls the broker for 100-160 ms at 300 mails/s."""
    try:
        answer = subprocess.run(
            ["rabbitmqctl", "--quiet", "eval", "application:get_env(ra, wal_max_size_bytes)."],
            capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.fullmatch(r"\{ok,\s*(\d+)\}", answer.strip())
    return int(match.group(1)) if match else None


def writeback_is_bursty(values: dict[str, int | None]) -> bool:
    """True where dirty pages wait 30 s or more with no byte threshold to flush them sooner."""
    return not values.get("dirty_background_bytes") and (
        values.get("dirty_expire_centisecs") or 0) >= 3000


# -- CPU accounting --------------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_named(command: str) -> list[int]:
    """Processes whose command name (``/proc/PID/comm``) is ``command``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class CpuTimes(NamedTuple):
    """Clock ticks of all CPUs so far (``/proc/stat``'s ``cpu`` line): busy is user, nice,
    system, irq and softirq; total adds idle, iowait and steal; steal is the time the
    hypervisor gave this machine's vCPUs to someone else while they had work."""

    busy: int
    total: int
    steal: int


def machine_cpu_times(stat: str | None = None) -> CpuTimes | None:
    """The machine's :class:`CpuTimes` now, or None where they cannot be read."""
    try:
        text = stat if stat is not None else Path("/proc/stat").read_text()
        fields = [int(value) for value in text.splitlines()[0].split()[1:9]]
    except (OSError, IndexError, ValueError):
        return None
    if len(fields) < 8:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return CpuTimes(busy, busy + idle + iowait + steal, steal)


def busy_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share of the machine's CPU time that was busy between two readings."""
    return _share_of_ticks(before, after, "busy")


def steal_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share of the machine's CPU time the hypervisor took between two readings: on a
    shared host, work measured then ran on less than the machine's cores."""
    return _share_of_ticks(before, after, "steal")


def _share_of_ticks(before: CpuTimes | None, after: CpuTimes | None,
                    part: str) -> float | None:
    if before is None or after is None or after.total <= before.total:
        return None
    return (getattr(after, part) - getattr(before, part)) / (after.total - before.total)


class CpuMeter:
    """CPU seconds used by named groups of processes between :meth:`start` and :meth:`stop`.

    Groups are given as pids, or as command names looked up at each reading (PostgreSQL
    starts a process per connection).  A process that exits in between is not counted.
    :attr:`machine_busy` is the whole machine's :func:`busy_share` over the same span, and
    :attr:`machine_stolen` its :func:`steal_share`.
    """

    def __init__(self, groups: dict[str, list[int] | str]) -> None:
        self.groups = groups
        self._before: dict[str, dict[int, float]] = {}
        self._machine_before: CpuTimes | None = None
        self.used: dict[str, float] = {}
        self.machine_busy: float | None = None
        self.machine_stolen: float | None = None

    def _read(self) -> dict[str, dict[int, float]]:
        readings = {}
        for name, members in self.groups.items():
            pids = pids_named(members) if isinstance(members, str) else members
            readings[name] = {pid: process_cpu_seconds(pid) for pid in pids}
        return readings

    def start(self) -> None:
        self._before = self._read()
        self._machine_before = machine_cpu_times()

    def stop(self) -> dict[str, float]:
        after = self._read()
        machine = machine_cpu_times()
        self.machine_busy = busy_share(self._machine_before, machine)
        self.machine_stolen = steal_share(self._machine_before, machine)
        self.used = {
            name: sum(value - self._before.get(name, {}).get(pid, 0.0)
                      for pid, value in readings.items())
            for name, readings in after.items()}
        return self.used
