"""Fault 33 over the whole run: no password, token or key in logs, tracebacks or databases.

A pytest plugin (registered by ``tests/conftest.py``).  The secrets are what the run's
processes were given: every value under a secret-bearing key (``password``,
``master_password``, ``admin_password``, ``keys``, ``client_secret``, ``*token*``) in the YAML
configurations the tests wrote under pytest's base temporary directory, read afresh whenever
a scan runs (values of six characters or more; ``enc:`` values are ciphertext).  Scanned:
each test's captured log, stdout and stderr and its traceback, as each phase ends; each
PostgreSQL test database just before it is dropped (:func:`scan_database`, called by
``tests.db_fixtures``); and at the end every file the run left under the base temporary
directory except the configurations and token files themselves.  Findings go to
``secret-findings.txt`` there (where, never the secret); any finding fails the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

# Not MAILROUTE_*: the configuration loader takes those as settings.
BASETEMP_ENV = "SECRET_SCAN_BASETEMP"
FINDINGS = "secret-findings.txt"
SECRET_KEYS = ("password", "master_password", "admin_password", "keys", "client_secret")
MIN_LENGTH = 6
# Files that hold secrets on purpose: configurations and token or key files tests wrote.
HOLDERS = (".yaml", ".yml", ".pem", ".key")
BINARY_SUFFIXES = (".db", ".db-wal", ".db-shm", ".sqlite", ".png", ".gz", ".zip")


def _is_secret_key(key: str) -> bool:
    key = key.lower()
    return key in SECRET_KEYS or ("token" in key and not key.endswith(("_command", "_file")))


def _values(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str | int) and _is_secret_key(str(key)):
                yield from str(value).split(",") if str(key) == "keys" else [str(value)]
            else:
                yield from _values(value)
    elif isinstance(node, list):
        for item in node:
            yield from _values(item)


class Ledger:
    """The secrets found in the configurations under ``root``, re-read when files change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: dict[Path, float] = {}
        self._secrets: dict[Path, set[str]] = {}

    def secrets(self) -> set[str]:
        for path in self._configs():
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._seen.get(path) == mtime:
                continue
            self._seen[path] = mtime
            try:
                document = yaml.safe_load(path.read_text(errors="replace"))
            except (OSError, yaml.YAMLError):
                continue
            self._secrets[path] = {v.strip() for v in _values(document)
                                   if len(v.strip()) >= MIN_LENGTH
                                   and not v.strip().startswith("enc:")}
        return set().union(*self._secrets.values()) if self._secrets else set()

    def _configs(self) -> Iterator[Path]:
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    yield Path(directory) / name

    def record(self, where: str) -> None:
        with (self.root / FINDINGS).open("a") as out:
            out.write(where + "\n")

    def check(self, text_: str, where: str, secrets: Iterable[str] | None = None) -> None:
        for secret in secrets if secrets is not None else self.secrets():
            if secret in text_:
                self.record(f"{where}: a configured secret ({len(secret)} characters)")


def _ledger() -> Ledger | None:
    root = os.environ.get(BASETEMP_ENV)
    return Ledger(Path(root)) if root else None


def scan_database(engine: Engine, name: str, ledger: Ledger | None = None) -> None:
    """Look for the run's secrets in every value of every table of ``engine`` (PostgreSQL)."""
    ledger = ledger or _ledger()
    secrets = sorted(ledger.secrets()) if ledger is not None else []
    if ledger is None or not secrets:
        return
    with engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            # The whole row as text; the search runs in the server.
            for secret in secrets:
                hit = connection.execute(
                    text(f'SELECT 1 FROM "{table}" AS t WHERE strpos(t::text, :s) > 0 LIMIT 1'),
                    {"s": secret}).first()
                if hit is not None:
                    ledger.record(f"database {name}, table {table}: a configured secret "
                                  f"({len(secret)} characters)")


class SecretScanPlugin:
    def __init__(self, root: Path) -> None:
        self.ledger = Ledger(root)
        self._checked: set[tuple[str, str]] = set()  # a later phase's report repeats sections

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        texts = [(name, content) for name, content in report.sections
                 if (report.nodeid, name) not in self._checked]
        if report.longrepr is not None:
            texts.append((f"traceback ({report.when})", report.longreprtext))
        if not any(content for _name, content in texts):
            return
        secrets = self.ledger.secrets()
        for name, content in texts:
            self._checked.add((report.nodeid, name))
            self.ledger.check(content, f"{report.nodeid}: {name}", secrets)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        secrets = self.ledger.secrets()
        root = self.ledger.root
        for directory, _dirs, files in os.walk(root):
            for name in files:
                path = Path(directory) / name
                if name == FINDINGS or name.endswith(HOLDERS + BINARY_SUFFIXES) or \
                        "token" in name:
                    continue
                try:
                    if path.stat().st_size > 64 * 2**20:
                        continue
                    content = path.read_text(errors="replace")
                except OSError:
                    continue
                self.ledger.check(content, f"file {path.relative_to(root)}", secrets)
        findings_path = root / FINDINGS
        if findings_path.exists():
            findings = findings_path.read_text().splitlines()
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_sep("=", f"fault 33: {len(findings)} secret(s) found", red=True)
                for line in findings[:50]:
                    reporter.write_line(line)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # After the tmp_path plugin's own configure, which makes the factory.
    root = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    os.environ[BASETEMP_ENV] = str(root)
    config.pluginmanager.register(SecretScanPlugin(Path(root)), "mailroute-secret-scan")
