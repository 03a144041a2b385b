"""Settings: YAML plus MAILROUTE_* overrides into one frozen object; clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.settings import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]

VALID = """
servers:
  - {name: corp, host: imap.example.com}
mailboxes:
  - {name: alice, server: corp, username: alice, password: s3cret}
  - {name: fwd, server: corp, username: fwd, forward: true, after: delete}
users:
  - {name: alice, address: alice@example.com, mailbox: alice}
  - {name: bob, address: bob@example.com, forward: fwd}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailroute.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file_are_the_embedded_demo() -> None:
    settings = load_settings(None, environ={})
    assert settings.broker.url == "memory://"
    assert settings.database.url.startswith("sqlite:///")
    assert settings.mailboxes == ()


def test_file_and_environment_overrides_make_one_frozen_object(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID), environ={
        "MAILROUTE_BROKER__URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
        "MAILROUTE_BROKER__PREFETCH": "100",
        "MAILROUTE_RETRY__MAX_DELAY": "5",
        "MAILROUTE_LOG_FORMAT": "json",
        "OTHER_VARIABLE": "ignored",
    })
    assert settings.broker.url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert settings.broker.prefetch == 100
    assert settings.retry.max_delay == 5.0
    assert settings.retry.startup_wait == 300.0  # the default: 5 minutes for a server to come
    assert settings.log_format == "json"
    assert settings.mailbox("fwd").forward is True
    assert settings.server("corp").port == 993 and settings.server("corp").verify_tls
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.broker = settings.broker  # type: ignore[misc]


def test_password_is_not_in_the_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID), environ={})
    assert "s3cret" not in repr(settings)


def test_maildir_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    text = ("mailboxes:\n  - {name: a, kind: maildir, path: boxes/a}\n"
            "users:\n  - {name: a, address: a@example.com, mailbox: a}\n")
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.mailbox("a").path == str(tmp_path / "boxes" / "a")


@pytest.mark.parametrize("text, message", [
    ("brokr: {}", "configuration: unknown key(s) brokr"),
    ("broker: {prefetch: many}", "broker.prefetch: expected int, got 'many'"),
    ("mailboxes:\n  - {name: a, server: nowhere, username: u}",
     "mailboxes.a.server: no server profile named 'nowhere'"),
    ("mailboxes:\n  - {name: a, kind: maildir, path: x, after: move, move_to: y}",
     "mailboxes.a.after: move is for IMAP folders"),
    ("mailboxes:\n  - {name: a, kind: pop}", "mailboxes[0].kind: 'pop' is not one of"),
    ("users:\n  - {name: u, address: u@example.com}",
     "users.u: set exactly one of mailbox or forward"),
    ("mailboxes:\n  - {name: a, kind: maildir, path: x}\n"
     "users:\n  - {name: u, address: u@example.com, forward: a}",
     "users.u.forward: no forward mailbox named 'a'"),
    ("mailboxes:\n  - {name: a, kind: maildir, path: x}\n"
     "users:\n  - {name: u, address: u@example.com, mailbox: a}\n"
     "queues:\n  - {name: q, address: U@Example.com, mailbox: a}",
     "queues.q.address: U@Example.com is used by another user or queue"),
    ("retry: {startup_wait: -1}", "retry.startup_wait: -1.0 must be 0 or more"),
    ("retry: {startup_wait: soon}", "retry.startup_wait: expected float, got 'soon'"),
    ("[1, 2]", "the top level must be a mapping"),
    ("a: [", "not valid YAML"),
])
def test_bad_configuration_names_the_key_and_the_problem(tmp_path: Path, text: str,
                                                         message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(error.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_settings(tmp_path / "absent.yaml", environ={})


@pytest.mark.parametrize("name", ["mailroute.yaml", "production.yaml"])
def test_shipped_examples_load(name: str) -> None:
    assert isinstance(load_settings(REPO / "examples" / name, environ={}), Settings)
