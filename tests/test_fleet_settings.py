"""Fleet settings and operator commands that need no mail server: intervals, validation,
``mailroute secret`` and ``mailroute mailbox enable``/``list`` on SQLite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from persist.database import create_engine_for, upgrade
from persist.mailbox_leases import LeaseStore
from persist.mailbox_state import MailboxStateStore
from shared.secrets import Keyring
from shared.settings import ConfigError, load_settings
from tests.processes import REPO

BASE = """servers:
  - {name: corp, host: 127.0.0.1, port: 1, timeout: 5, interval: 30%s}
mailboxes:
"""


def config(tmp_path: Path, boxes: str, profile: str = "") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(BASE % profile + boxes +
                    f"database: {{url: 'sqlite:///{tmp_path / 'db.sqlite'}'}}\n")
    return path


def test_interval_comes_from_the_mailbox_then_the_profile_then_60(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path, """  - {name: a, server: corp, username: a}
  - {name: b, server: corp, username: b, interval: 5}
  - {name: c, kind: maildir, path: m}
"""), environ={})
    assert [settings.interval_of(settings.mailbox(n)) for n in "abc"] == [30.0, 5.0, 60.0]


@pytest.mark.parametrize(("boxes", "profile", "message"), [
    ("  - {name: p, kind: pop3, server: corp, username: p, push: true}\n", "",
     r"mailboxes\.p\.push"),
    ("  - {name: p, kind: pop3, server: corp, username: p, after: move, move_to: X}\n", "",
     r"mailboxes\.p\.after"),
    ("  - {name: a, server: corp, username: a, since: last-week}\n", "",
     r"mailboxes\.a\.since"),
    ("  - {name: a, server: corp, username: a}\n", ", auth: xoauth2",
     r"mailboxes\.a: auth xoauth2 needs"),
    ("  - {name: a, server: corp, username: a}\n", ", master_user: admin",
     r"servers\.corp\.master_password"),
    ("  - {name: a, server: corp, username: a}\n", ", idle_refresh: 1800",
     r"servers\.corp\.idle_refresh"),
    ("  - {name: a, server: corp, username: a}\n", ", max_connections: 0",
     r"servers\.corp\.max_connections: must be at least 1"),
])
def test_unusable_fleet_settings_name_the_key(tmp_path: Path, boxes: str, profile: str,
                                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(config(tmp_path, boxes, profile), environ={})


def test_an_oauth2_token_is_fetched_again_when_it_expires(tmp_path: Path) -> None:
    from ingest.credentials import TokenSource

    now = [1000.0]
    token_file = tmp_path / "token"
    token_file.write_text('{"access_token": "first", "expires_in": 120}')
    tokens = TokenSource("u", None, str(token_file), clock=lambda: now[0])
    assert tokens.token().reveal() == "first"
    token_file.write_text('{"access_token": "second", "expires_in": 120}')
    now[0] += 30
    assert tokens.token().reveal() == "first"  # cached while valid
    now[0] += 40  # a minute before expiry counts as expired
    assert tokens.token().reveal() == "second" and tokens.fetches == 2
    assert tokens.token(refresh=True).reveal() == "second" and tokens.fetches == 3


def cli(path: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(path), *args],
                          cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)


def test_secret_commands_encrypt_and_rotate_without_showing_the_value(tmp_path: Path) -> None:
    path = config(tmp_path, "  - {name: a, server: corp, username: a}\n")
    old, new = Keyring.new_key(), Keyring.new_key()
    made = cli(path, "secret", "encrypt", stdin="s3cret-value\n",
               env={"MAILROUTE_SECRETS__KEYS": old})
    assert made.returncode == 0, made.stderr
    stored = made.stdout.strip()
    assert stored.startswith("enc:") and "s3cret-value" not in made.stdout + made.stderr
    rotated = cli(path, "secret", "rotate", stdin=stored + "\n",
                  env={"MAILROUTE_SECRETS__KEYS": f"{new},{old}"})
    assert rotated.returncode == 0, rotated.stderr
    assert Keyring([new]).decrypt(rotated.stdout.strip()) == "s3cret-value"
    no_key = cli(path, "secret", "encrypt", stdin="x\n")
    assert no_key.returncode == 2 and "no encryption key" in no_key.stderr


def test_enable_brings_a_disabled_mailbox_back_and_list_shows_it(tmp_path: Path) -> None:
    path = config(tmp_path, "  - {name: a, server: corp, username: a}\n"
                            "  - {name: b, server: corp, username: b}\n")
    engine = create_engine_for(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    leases, state = LeaseStore(engine), MailboxStateStore(engine)
    leases.ensure(["a", "b"])
    leases.disable("a", "mailbox a: plain login as 'a' refused")
    state.mark_disabled("a", "INBOX", "mailbox a: plain login as 'a' refused")
    listing = cli(path, "mailbox", "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert rows["a"].split()[2] == "disabled" and "refused" in rows["a"]
    assert rows["b"].split()[2] == "not-run"
    enabled = cli(path, "mailbox", "enable", "a")
    assert enabled.returncode == 0 and "was disabled" in enabled.stdout
    lease = leases.get("a")
    assert lease is not None and lease.disabled_reason is None
    assert {s.mailbox: s.status for s in state.all_states()}["a"] == "not-run"
    assert cli(path, "mailbox", "enable", "zzz").returncode == 2
    refused = cli(path, "mailbox", "test", "a")  # nothing listens on port 1
    assert refused.returncode == 1 and refused.stderr.startswith("Error: a: ")
    engine.dispose()
