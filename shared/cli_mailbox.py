"""``mailroute mailbox ...`` and ``mailroute secret ...``: the operator's tools for the fleet.

Takes the settings (``--config``) and the database; gives ``mailbox list`` (every mailbox with
its health and lease), ``mailbox test NAME`` (connect, log in and look at the folder, fetching
nothing and changing nothing), ``mailbox enable NAME`` (after a disable: polled again at once),
``secret new-key`` / ``secret encrypt`` / ``secret rotate`` (Fernet values for the
configuration file).  Fails with exit status 2 on a configuration problem or an unknown
mailbox, 1 when a server cannot be reached or refuses the login; never prints a password.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from shared.cli_support import ConfigProblem, Context, connect_or_fail, open_engine
from shared.fleet_ops import MailboxTestFailed, check_mailbox, fleet_rows
from shared.fleet_ops import enable_mailbox as enable
from shared.secrets import Keyring, SecretError
from shared.settings import MailboxSettings, Settings


@click.group("mailbox")
def mailbox() -> None:
    """Inspect and manage the mailboxes that ingest polls."""


def _box(settings: Settings, name: str) -> MailboxSettings:
    for box in settings.mailboxes:
        if box.name == name:
            return box
    raise ConfigProblem(f"mailboxes: no mailbox named {name!r} in the configuration")


@mailbox.command("list")
@click.pass_obj
def list_mailboxes(obj: Context) -> None:
    """Every configured mailbox: status, failures, last success, who polls it, next due."""
    settings = obj.load()
    for line in fleet_lines(settings, connect_or_fail("database", lambda: open_engine(settings))):
        click.echo(line)


def fleet_lines(settings: Settings, engine: Any) -> list[str]:
    """The fleet table shown by ``mailbox list`` and ``status``."""
    lines = [f"{'MAILBOX':<20} {'KIND':<7} {'STATUS':<9} {'FAIL':>4} {'LAST SUCCESS':<20} "
             f"{'POLLED BY':<24} {'NEXT DUE':<9} LAST ERROR"]
    for row in fleet_rows(settings, engine):
        success = row.last_success_at.strftime("%Y-%m-%d %H:%M:%S") \
            if row.last_success_at else "-"
        due = "-" if row.due_in is None else "now" if row.due_in <= 0 else f"{row.due_in:.0f}s"
        lines.append(f"{row.name:<20} {row.kind:<7} {row.status:<9} {row.failures:>4} "
                     f"{success:<20} {row.owner[:24]:<24} {due:<9} {row.error[:120]}")
    return lines


@mailbox.command("test")
@click.argument("name")
@click.pass_obj
def test_mailbox(obj: Context, name: str) -> None:
    """Connect to mailbox NAME, log in and look at its folder (fetches and changes nothing).

    Exit status 0 when it works, 1 when the server cannot be reached or refuses the login.
    """
    settings = obj.load()
    box = _box(settings, name)
    try:
        click.echo(check_mailbox(settings, box))
    except MailboxTestFailed as exc:
        raise click.ClickException(str(exc)) from None


@mailbox.command("enable")
@click.argument("name")
@click.pass_obj
def enable_mailbox(obj: Context, name: str) -> None:
    """Poll mailbox NAME again (after it was disabled: refused login, UIDVALIDITY resets)."""
    settings = obj.load()
    box = _box(settings, name)
    engine = connect_or_fail("database", lambda: open_engine(settings))
    click.echo(enable(settings, engine, box.name))


@click.group("secret")
def secret() -> None:
    """Encrypted values for the configuration file (``enc:...``, Fernet).

    Keys: secrets.keys (MAILROUTE_SECRETS__KEYS, comma-separated, newest first) or
    secrets.key_file (one key per line, newest first).
    """


@secret.command("new-key")
def new_key() -> None:
    """Print a new Fernet key (put it first in the key list; keep the old ones to decrypt)."""
    click.echo(Keyring.new_key())


def _keyring(obj: Context) -> Keyring:
    settings = obj.load()
    try:
        return Keyring.load(settings.secrets.keys, settings.secrets.key_file)
    except SecretError as exc:
        raise ConfigProblem(f"secrets: {exc}") from None


@secret.command("encrypt")
@click.pass_obj
def encrypt(obj: Context) -> None:
    """Read a password or token on stdin (prompted, not echoed); print its enc: value."""
    keyring = _keyring(obj)
    if sys.stdin.isatty():
        plain = click.prompt("secret", hide_input=True, confirmation_prompt=True)
    else:
        plain = sys.stdin.readline().rstrip("\r\n")
    if not plain:
        raise ConfigProblem("nothing to encrypt")
    click.echo(keyring.encrypt(plain))


@secret.command("rotate")
@click.pass_obj
def rotate(obj: Context) -> None:
    """Read enc: values (one a line) on stdin; print each re-encrypted with the newest key."""
    keyring = _keyring(obj)
    for line in sys.stdin:
        value = line.strip()
        if not value:
            continue
        try:
            click.echo(keyring.rotate(value))
        except SecretError as exc:
            raise ConfigProblem(str(exc)) from None
