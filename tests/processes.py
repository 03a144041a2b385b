"""Worker processes for integration tests: ``mailroute worker STAGE`` (or any other
``mailroute`` command) as real subprocesses.

Takes a configuration file; starts, signals and restarts one process per stage, each logging
to its own file; reads each worker's metrics port from its output and scrapes its counters.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0,
             on_timeout: Callable[[], str] = lambda: "") -> None:
    """Poll ``condition`` (state held by a server: no event to subscribe to) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{on_timeout()}")
        time.sleep(0.1)


class Workers:
    def __init__(self, config: Path, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.generation: dict[str, int] = {}

    def start(self, *stages: str, module: str = "shared.cli",
              env: dict[str, str] | None = None) -> None:
        """Start each stage's worker; ``module`` and ``env`` let fault tests inject faults."""
        for stage in stages:
            self.start_command(stage, "worker", stage, module=module, env=env)

    def start_command(self, name: str, *args: str, module: str = "shared.cli",
                      env: dict[str, str] | None = None) -> None:
        """Start ``mailroute ARGS...`` (``worker STAGE``, ``web``, ``run``) logging to NAME.log."""
        generation = self.generation.get(name, 0) + 1
        self.generation[name] = generation
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - kept open by the child
        log.write(f"--- start {generation}\n".encode())
        log.flush()
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(self.config), *args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # faulthandler: a worker that will not stop is sent SIGABRT, and its log then
            # shows where each of its threads was
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                 **(env or {})})
        log.close()

    def log_path(self, stage: str) -> Path:
        return self.log_dir / f"{stage}.log"

    def wait_exit(self, stage: str, timeout: float = 120) -> int:
        """Wait for ``stage``'s process to end by itself; gives its return code."""
        return self.processes[stage].wait(timeout=timeout)

    def kill(self, stage: str, sig: int = signal.SIGKILL) -> int:
        process = self.processes[stage]
        process.send_signal(sig)
        return process.wait(timeout=60)

    def started(self, stage: str) -> bool:
        """True once the current process of ``stage`` said it runs (its signal handlers are set).

        A SIGTERM before that, while Python is still importing, ends it with -15: expected of
        any Unix process, but not the clean stop the tests check for.
        """
        text = self.log_path(stage).read_text(errors="replace")
        text = text[text.rfind(f"--- start {self.generation[stage]}\n"):]
        return f"worker {stage} running" in text

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for stage, process in self.processes.items():
            wait_for(lambda s=stage, p=process: p.poll() is not None  # type: ignore[misc]
                     or self.started(s), f"{stage} to start before it is stopped", 60)
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for stage, process in self.processes.items():
            try:
                codes[stage] = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGABRT)  # its threads' stacks go to its log
                try:
                    codes[stage] = process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    codes[stage] = process.wait()
        return codes

    def logs(self) -> str:
        parts = []
        for stage in self.processes:
            text = self.log_path(stage).read_text(errors="replace")
            parts.append(f"===== {stage}\n{text[-4000:]}")
        return "\n".join(parts)

    def metrics_port(self, stage: str) -> int | None:
        text = self.log_path(stage).read_text(errors="replace")
        marker = f"--- start {self.generation[stage]}\n"
        text = text[text.rfind(marker):]
        found = re.search(r"metrics: http://[\d.]+:(\d+)/metrics", text)
        return int(found.group(1)) if found else None

    def counter(self, stage: str, name: str, /, **labels: str) -> float:
        """The sum of a counter's samples in ``stage``'s current process (0 if not up yet)."""
        port = self.metrics_port(stage)
        if port is None:
            return 0.0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total
