"""The ``mailroute`` command as an operator uses it: the embedded demo, status, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from persist.database import create_engine_for
from persist.store import EmailStore

REPO = Path(__file__).resolve().parents[1]


class Running:
    """A ``mailroute`` subprocess whose output lines can be awaited."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float = 120) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            ok = self._changed.wait_for(
                lambda: found() is not None or self.process.poll() is not None, timeout)
            line = found()
        if not ok or line is None:
            raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.lines))
        return line

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of examples/ laid out as `make run` lays it out, in a temp folder."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "examples" / "maildir", tmp_path / "var" / "demo" / "maildir")
    for box in (tmp_path / "var" / "demo" / "maildir").iterdir():
        (box / "cur").mkdir(exist_ok=True)  # git keeps no empty folder; `make run` does this
    env = {**os.environ, "MAILROUTE_METRICS__BASE_PORT": "0", "MAILROUTE_WEB__PORT": "0",
           "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("MAILROUTE_CONFIG", None)
    yield tmp_path, env


def test_run_on_the_embedded_demo_creates_the_expected_records_and_stops_on_sigterm(
        demo: tuple[Path, dict[str, str]]) -> None:
    root, env = demo
    running = Running(["--config", "examples/mailroute.yaml", "run"], root, env)
    try:
        running.wait_for_line("mailroute running: broker memory://")
        running.wait_for_line("metrics: http://127.0.0.1:")
        web = running.wait_for_line("mailroute web: http://127.0.0.1:").split()[-1]
        running.wait_for_line("records: 6 emails, 8 deliveries, 2 queue_items")
        # the operations page in the same process reads that process's own metrics
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(web + "api/overview", timeout=30) as response:
            overview = json.load(response)
        assert overview["persisted_total"] == 6
        assert overview["stages"]["ingest"]["total"] == 8
        assert overview["stages"]["persist"]["total"] == 8
        assert overview["metrics_sources"] == {"up": 1, "of": 1}
    finally:
        code = running.stop()
    assert code == 0, "\n".join(running.lines)
    assert running.lines[-1] == "mailroute stopped"
    store = EmailStore(create_engine_for(f"sqlite:///{root / 'var' / 'mailroute.db'}"))
    assert store.count_rows()["emails"] == 6
    # every demo message left new/: Maildir "seen" moves to cur/, the forward box deletes
    maildir = root / "var" / "demo" / "maildir"
    assert [list((maildir / box / "new").iterdir()) for box in ("alice", "support",
                                                                  "forward")] == [[], [], []]
    assert list((maildir / "forward" / "cur").iterdir()) == []

    status = subprocess.run([sys.executable, "-m", "shared.cli", "--config",
                             "examples/mailroute.yaml", "status"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split()[2] for line in status.stdout.splitlines()[1:4]}
    assert rows == {"alice": "success", "support": "success", "forward": "success"}
    assert "mail.parse.dead" in status.stdout


def test_bad_configuration_is_one_clear_line_and_exit_status_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("users:\n  - name: x\n    address: not-an-address\n    mailbox: nope\n")
    result = subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(config),
                             "status"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "users.x.address: 'not-an-address' is not an email address" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_named_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "MAILROUTE_DATABASE__URL":
           "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    result = subprocess.run([sys.executable, "-m", "shared.cli", "db", "upgrade"], cwd=tmp_path,
                            env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("Error: database:")
    assert "Traceback" not in result.stderr


def test_a_database_error_inside_a_command_is_one_line_without_a_traceback(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'damaged.db'}"
    env = {**os.environ, "MAILROUTE_DATABASE__URL": url, "PYTHONPATH": str(REPO)}
    upgraded = subprocess.run([sys.executable, "-m", "shared.cli", "db", "upgrade"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert upgraded.returncode == 0, upgraded.stderr
    with create_engine_for(url).begin() as connection:  # a schema damaged by hand
        connection.exec_driver_sql("DROP TABLE mailbox_leases")
    result = subprocess.run([sys.executable, "-m", "shared.cli", "mailbox", "list"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no such table: mailbox_leases" in result.stderr.splitlines()[-1]
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr


def test_help_explains_every_command() -> None:
    result = subprocess.run([sys.executable, "-m", "shared.cli", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("run", "worker", "db", "status"):
        assert f"  {command} " in result.stdout
