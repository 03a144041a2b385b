"""The processes a benchmark runs: mailroute workers and bare-chain hops, stopped for sure.

Takes a working folder for logs.  :class:`StageWorkers` starts ``python -m shared.cli
--config X worker STAGE`` processes, finds each one's metrics port in its output, waits for
``/readyz`` and scrapes ``/metrics``; :class:`ChainHops` starts ``python -m bench.chain`` hops
and waits for their ``ready`` line.  Both stop their processes with SIGTERM (SIGKILL after a
grace period) on :meth:`stop_all`, which their ``with`` blocks always call.  Fails with
:class:`~bench.common.BenchError`, quoting the log's tail, when a process dies or never
becomes ready.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlencode

from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO, BenchError

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class _Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop_all()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name.replace('.', '-')}.log"

    def _spawn(self, name: str, argv: list[str], stdout: int | None = None) -> None:
        number = self.starts.get(name, 0) + 1
        self.starts[name] = number
        with open(self.log_path(name), "ab") as log:
            log.write(f"--- start {number}\n".encode())
            log.flush()
            self.processes[name] = subprocess.Popen(
                [sys.executable, *argv], cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=log if stdout is None else stdout,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def current_log(self, name: str) -> str:
        text = self.log_path(name).read_text(errors="replace")
        return text[text.rfind(f"--- start {self.starts[name]}\n"):]

    def tails(self) -> str:
        return "\n".join(f"===== {name}\n{self.current_log(name)[-3000:]}"
                         for name in self.processes)

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items()
                if p.poll() is not None}
        if dead:
            raise BenchError(f"process(es) ended unexpectedly: {dead}\n{self.tails()}")

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def stop(self, *names: str) -> dict[str, int]:
        chosen = {n: self.processes[n] for n in names if n in self.processes}
        for process in chosen.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in chosen.items():
            try:
                codes[name] = process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
            if process.stdout is not None:
                process.stdout.close()
            del self.processes[name]
        return codes

    def stop_all(self) -> dict[str, int]:
        return self.stop(*list(self.processes))


class StageWorkers(_Processes):
    """``mailroute worker STAGE`` processes on one configuration file."""

    def __init__(self, config: Path, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.config = config
        self.ports: dict[str, int] = {}

    def start(self, *stages: str) -> None:
        for stage in stages:
            self.ports.pop(stage, None)
            self._spawn(stage, ["-m", "shared.cli", "--config", str(self.config),
                                "worker", stage])

    def wait_ready(self, *stages: str, poll: float = 0.02) -> float:
        """Wait until every stage answers /readyz with 200; gives the time.time() it did."""
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = list(stages)
        while waiting:
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{', '.join(waiting)} not ready within {READY_TIMEOUT:g}s\n"
                                 f"{self.tails()}")
            waiting = [s for s in waiting if not self._ready(s)]
            if waiting:
                time.sleep(poll)
        return time.time()

    def port(self, stage: str) -> int | None:
        if stage not in self.ports:
            found = re.search(r"metrics: http://[\d.]+:(\d+)/metrics", self.current_log(stage))
            if found is None:
                return None
            self.ports[stage] = int(found.group(1))
        return self.ports[stage]

    def _get(self, stage: str, path: str) -> tuple[int, str]:
        port = self.port(stage)
        if port is None:
            return 0, ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def _ready(self, stage: str) -> bool:
        return self._get(stage, "/readyz")[0] == 200

    def samples(self, stage: str, names: Sequence[str] = ()
                ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``stage``'s /metrics samples, all or those ``names``: (name, sorted labels) ->
        value.  Asking for names keeps a frequent poll from costing the worker much."""
        query = "?" + urlencode([("name[]", name) for name in names]) if names else ""
        status, text = self._get(stage, "/metrics" + query)
        if status != 200:
            return {}
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found


class ChainHops(_Processes):
    """``python -m bench.chain`` hops; :meth:`start` returns once the hop consumes."""

    def start(self, name: str, arguments: list[str]) -> float:
        """Start one hop; gives the time.time() its ``ready`` line arrived."""
        self._spawn(name, ["-m", "bench.chain", *arguments], stdout=subprocess.PIPE)
        process = self.processes[name]
        assert process.stdout is not None
        line = process.stdout.readline()  # the hop prints "ready" or dies
        if line.strip() != b"ready":
            process.wait(timeout=STOP_TIMEOUT)
            raise BenchError(f"chain hop {name} did not start\n{self.tails()}")
        return time.time()
