"""Secrets: the redacting wrapper, Fernet at rest with key rotation, settings that decrypt."""

from __future__ import annotations

import copy
import logging
import pickle
import traceback
from pathlib import Path

import pytest

from shared.secrets import Keyring, Secret, SecretError
from shared.settings import ConfigError, load_settings

PLAIN = "hunter2-very-secret"


def test_a_secret_never_shows_its_value() -> None:
    secret = Secret(PLAIN)
    assert repr(secret) == "***"
    assert str(secret) == "***"
    assert f"{secret} {secret!r} {secret:>30}" .count(PLAIN) == 0
    assert "%s %r" % (secret, secret) == "*** ***"  # noqa: UP031 - the %-style logging uses
    assert secret.reveal() == PLAIN
    assert Secret(PLAIN) == secret and Secret("other") != secret
    assert copy.deepcopy(secret) is secret
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_a_secret_is_redacted_in_logs_and_traceback_locals(
        caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret(PLAIN)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").debug("logging in with %s / %r", secret, {"password": secret})
    assert PLAIN not in caplog.text and "***" in caplog.text
    try:
        raise RuntimeError("failed")
    except RuntimeError as exc:
        rendered = "".join(traceback.TracebackException.from_exception(
            exc, capture_locals=True).format())
    assert PLAIN not in rendered


def test_keyring_encrypts_with_the_newest_key_and_decrypts_with_any() -> None:
    old, new = Keyring.new_key(), Keyring.new_key()
    stored = Keyring([old]).encrypt(PLAIN)
    assert stored.startswith("enc:") and PLAIN not in stored
    rotated_ring = Keyring([new, old])
    assert rotated_ring.decrypt(stored) == PLAIN
    rotated = rotated_ring.rotate(stored)
    assert Keyring([new]).decrypt(rotated) == PLAIN
    with pytest.raises(SecretError) as refused:
        Keyring([new]).decrypt(stored)
    assert PLAIN not in str(refused.value)


def test_no_key_or_a_bad_key_is_a_clear_error() -> None:
    with pytest.raises(SecretError, match="no encryption key"):
        Keyring.load(None, None)
    with pytest.raises(SecretError, match="not a Fernet key"):
        Keyring(["not-a-key"])


def _config(tmp_path: Path, password: str, key_file: Path | None = None) -> Path:
    secrets = f"secrets: {{key_file: {key_file}}}\n" if key_file else ""
    path = tmp_path / "c.yaml"
    path.write_text(f"""{secrets}servers:
  - {{name: corp, host: imap.example.com, master_user: admin, master_password: "{password}"}}
mailboxes:
  - {{name: alice, server: corp, username: alice, password: "{password}"}}
""")
    return path


def test_settings_decrypt_enc_values_with_a_key_from_the_environment(tmp_path: Path) -> None:
    key = Keyring.new_key()
    stored = Keyring([key]).encrypt(PLAIN)
    settings = load_settings(_config(tmp_path, stored),
                             environ={"MAILROUTE_SECRETS__KEYS": f"{key}"})
    box = settings.mailbox("alice")
    assert box.password is not None and box.password.reveal() == PLAIN
    profile = settings.server("corp")
    assert profile.master_password is not None and profile.master_password.reveal() == PLAIN
    assert PLAIN not in repr(settings) and key not in repr(settings)


def test_settings_decrypt_with_a_rotated_key_file(tmp_path: Path) -> None:
    old, new = Keyring.new_key(), Keyring.new_key()
    stored = Keyring([old]).encrypt(PLAIN)
    key_file = tmp_path / "keys"
    key_file.write_text(f"# newest first\n{new}\n{old}\n")
    settings = load_settings(_config(tmp_path, stored, key_file), environ={})
    assert settings.mailbox("alice").password == Secret(PLAIN)


def test_settings_refuse_an_enc_value_without_a_key_naming_the_key(tmp_path: Path) -> None:
    stored = Keyring([Keyring.new_key()]).encrypt(PLAIN)
    with pytest.raises(ConfigError, match="secrets: no encryption key"):
        load_settings(_config(tmp_path, stored), environ={})
    with pytest.raises(ConfigError, match=r"mailboxes\.alice\.password: cannot decrypt"):
        load_settings(_config(tmp_path, stored),
                      environ={"MAILROUTE_SECRETS__KEYS": Keyring.new_key()})
