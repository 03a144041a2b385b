"""The whole-run secret scan (fault 33) finds a configured secret in a log, a file or a database."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from persist.database import create_engine_for
from tests.db_fixtures import fresh_postgres_database
from tests.secret_scan import FINDINGS, Ledger, scan_database

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]

LEAKING_TESTS = '''
import logging
from pathlib import Path


def test_config_and_a_leak(tmp_path: Path) -> None:
    (tmp_path / "mailroute.yaml").write_text(
        "mailboxes:\\n  - {name: a, username: a, password: leaky-pass-4Rw}\\n"
        "secrets: {keys: 'key-one-abcdef,key-two-ghijkl'}\\n")
    logging.getLogger("t").warning("logging in with leaky-pass-4Rw")


def test_a_worker_log_with_a_key(tmp_path: Path) -> None:
    (tmp_path / "worker.log").write_text("loaded key-two-ghijkl\\n")
'''


def run_scanned(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    result = pytester.runpytest_subprocess("-p", "tests.secret_scan", "-q")
    # The leaks above are on purpose: keep them out of this run's own scan.
    shutil.rmtree(pytester.path, ignore_errors=True)
    pytester.path.mkdir()
    return result


def test_a_secret_in_a_log_or_a_left_file_fails_the_session(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_leaks=LEAKING_TESTS)
    result = run_scanned(pytester, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*fault 33: 2 secret(s) found*",
        "*test_config_and_a_leak: Captured log call: a configured secret (14 characters)",
        "file *worker.log: a configured secret (14 characters)",
    ])
    assert "leaky-pass-4Rw" not in result.stdout.str().split("fault 33")[1]


def test_without_leaks_the_session_passes(pytester: pytest.Pytester,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_clean='''
def test_config_only(tmp_path):
    (tmp_path / "c.yaml").write_text("servers: [{name: s, master_password: quiet-pass-9Zx}]\\n")
''')
    assert run_scanned(pytester, monkeypatch).ret == 0


def test_the_ledger_reads_secret_keys_and_skips_ciphertext_and_short_values(
        tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "servers: [{name: s, master_password: master-pw-1, oauth2_token_file: /x/token}]\n"
        "mailboxes: [{name: b, password: 'enc:gAAAAAB-cipher'}, {name: c, password: pw}]\n"
        "extra: {client_secret: client-sec-2, access_token: tok-value-3}\n")
    assert Ledger(tmp_path).secrets() == {
        "master-pw-1", "client-sec-2", "tok-value-3"}


def test_a_secret_in_a_postgresql_row_is_found_before_the_database_is_dropped(
        tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("mailboxes: [{name: b, password: row-secret-8Kd}]\n")
    ledger = Ledger(tmp_path)
    with fresh_postgres_database() as url:
        engine = create_engine_for(url)
        try:
            with engine.begin() as connection:
                connection.execute(text("CREATE TABLE clean (v text)"))
                connection.execute(text("CREATE TABLE leaky (n int, v text)"))
                connection.execute(text("INSERT INTO clean VALUES ('nothing here')"))
                connection.execute(text("INSERT INTO leaky VALUES (1, 'pw=row-secret-8Kd')"))
            scan_database(engine, "db", ledger)
            with engine.begin() as connection:  # the leak was on purpose: not for the run's scan
                connection.execute(text("DROP TABLE leaky"))
        finally:
            engine.dispose()
    findings = (tmp_path / FINDINGS).read_text().splitlines()
    assert findings == ["database db, table leaky: a configured secret (14 characters)"]
