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
from datetime import UTC, datetime
from typing import Any

import click

from shared.cli_support import ConfigProblem, Context, connect_or_fail, open_engine
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
    from persist.mailbox_leases import LeaseStore
    from persist.mailbox_state import MailboxStateStore

    states = {(s.mailbox, s.folder): s for s in MailboxStateStore(engine).all_states()}
    leases = {lease.mailbox: lease for lease in LeaseStore(engine).all()}
    now = datetime.now(UTC)
    lines = [f"{'MAILBOX':<20} {'KIND':<7} {'STATUS':<9} {'FAIL':>4} {'LAST SUCCESS':<20} "
             f"{'POLLED BY':<24} {'NEXT DUE':<9} LAST ERROR"]
    for box in settings.mailboxes:
        state = states.get((box.name, box.folder))
        lease = leases.get(box.name)
        status = state.status if state else "not-run"
        if lease is not None and lease.disabled_reason:
            status = "disabled"
        success = state.last_success_at.strftime("%Y-%m-%d %H:%M:%S") \
            if state and state.last_success_at else "-"
        owner = "-"
        due = "-"
        if lease is not None:
            if lease.owner and lease.lease_until and lease.lease_until >= now:
                owner = lease.owner + (" (idle)" if box.push else "")
            seconds = (lease.due_at - now).total_seconds()
            due = "now" if seconds <= 0 else f"{seconds:.0f}s"
        error = (lease.disabled_reason if lease is not None and lease.disabled_reason
                 else (state.last_error if state and status == "failing" else "")) or ""
        failures = state.consecutive_failures if state else 0
        lines.append(f"{box.name:<20} {box.kind:<7} {status:<9} {failures:>4} {success:<20} "
                     f"{owner[:24]:<24} {due:<9} {error[:120]}")
    return lines


@mailbox.command("test")
@click.argument("name")
@click.pass_obj
def test_mailbox(obj: Context, name: str) -> None:
    """Connect to mailbox NAME, log in and look at its folder (fetches and changes nothing).

    Exit status 0 when it works, 1 when the server cannot be reached or refuses the login.
    """
    from ingest.errors import MailboxError
    from ingest.imap_source import ImapSource
    from ingest.maildir_source import MaildirSource
    from ingest.pop3_source import Pop3Source

    settings = obj.load()
    box = _box(settings, name)
    try:
        if box.kind == "maildir":
            with MaildirSource(box) as maildir:
                count = sum(len(b.messages) for b in maildir.batches())
            click.echo(f"ok: {box.name}: Maildir {box.path}: {count} new message(s)")
            return
        profile = settings.server(box.server or "")
        where = f"{profile.host}:{profile.port} ({profile.tls}" + \
            (", certificate NOT verified)" if not profile.verify_tls else ")")
        source = ImapSource(box, profile) if box.kind == "imap" else \
            Pop3Source(box, profile, set())
        with source:
            summary = source.summary()
    except MailboxError as exc:
        raise click.ClickException(f"{box.name}: {exc}") from None
    auth = profile.auth if not profile.master_user else f"master user ({profile.master_mode})"
    click.echo(f"ok: {box.name}: connected to {where}, logged in as {box.username!r} "
               f"with {auth}, {summary}")


@mailbox.command("enable")
@click.argument("name")
@click.pass_obj
def enable_mailbox(obj: Context, name: str) -> None:
    """Poll mailbox NAME again (after it was disabled: refused login, UIDVALIDITY resets)."""
    from persist.mailbox_leases import LeaseStore
    from persist.mailbox_state import MailboxStateStore

    settings = obj.load()
    box = _box(settings, name)
    engine = connect_or_fail("database", lambda: open_engine(settings))
    leases = LeaseStore(engine)
    leases.ensure([box.name])
    lease = leases.get(box.name)
    was = lease.disabled_reason if lease else None
    leases.enable(box.name)
    MailboxStateStore(engine).mark_enabled(box.name)
    if was:
        click.echo(f"{box.name}: enabled (was disabled: {was}); due now")
    else:
        click.echo(f"{box.name}: was not disabled; due now")


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
