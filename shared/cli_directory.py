"""``mailroute directory list|add|remove|import``: users, queues, contacts and accounts.

Users and queues, and the contacts and accounts of the configuration file, are read-only
here (edit the file); contacts and accounts added from the command line or a CSV file live in
the database, where route and persist find them at once.  Exit 2 on a bad configuration or a
bad entry (named), 1 when the database cannot be reached.
"""

from __future__ import annotations

from typing import Any

import click

from shared.cli_support import ConfigProblem, Context, connect_or_fail, open_engine


def _store(obj: Context) -> Any:
    settings = obj.load()
    from persist.directory_store import DirectoryStore

    engine = connect_or_fail("database", lambda: open_engine(settings))
    store = DirectoryStore(engine)
    connect_or_fail("database", lambda: store.sync_config(settings))
    return store


def _edit(action: Any) -> Any:
    from persist.directory_store import DirectoryError

    try:
        return connect_or_fail("database", action)
    except click.ClickException as exc:
        if isinstance(exc.__cause__, DirectoryError):
            raise ConfigProblem(str(exc.__cause__)) from exc.__cause__
        raise


@click.group()
def directory() -> None:
    """Users, queues, contacts and accounts, and their addresses."""


@directory.command("list")
@click.pass_obj
def list_directory(obj: Context) -> None:
    """Every user, queue, contact and account with its addresses and where it is defined."""
    settings = obj.load()
    store = _store(obj)
    click.echo(f"{'KIND':<8} {'NAME':<24} {'SOURCE':<7} {'TRACK':<9} ADDRESSES")
    for kind, group in (("user", settings.users), ("queue", settings.queues)):
        for p in group:
            via = f"mailbox {p.mailbox}" if p.mailbox else f"forward {p.forward}"
            click.echo(f"{kind:<8} {p.name:<24} {'config':<7} {p.track:<9} {p.address} ({via})")
    for account in connect_or_fail("database", store.accounts):
        values = account["addresses"] + [f"*@{d}" for d in account["domains"]]
        click.echo(f"{'account':<8} {account['name']:<24} {account['source']:<7} {'':<9} "
                   f"{', '.join(values)}")
    for contact in connect_or_fail("database", store.contacts):
        extra = f" (account {contact['account']})" if contact["account"] else ""
        click.echo(f"{'contact':<8} {contact['name']:<24} {contact['source']:<7} {'':<9} "
                   f"{', '.join(contact['addresses'])}{extra}")


@directory.group("add")
def add() -> None:
    """Add a contact or an account (stored in the database)."""


@add.command("contact")
@click.argument("name")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--account", help="The account (organisation) the contact belongs to.")
@click.pass_obj
def add_contact(obj: Context, name: str, addresses: tuple[str, ...],
                account: str | None) -> None:
    """Add contact NAME with one or more ADDRESSES (or add addresses to it)."""
    store = _store(obj)
    contact_id = _edit(lambda: store.add_contact(name, addresses, account))
    click.echo(f"contact {contact_id} {name}: {', '.join(addresses)}")


@add.command("account")
@click.argument("name")
@click.option("--address", "addresses", multiple=True, help="An address of the account.")
@click.option("--domain", "domains", multiple=True,
              help="A domain: every sender at it belongs to the account.")
@click.pass_obj
def add_account(obj: Context, name: str, addresses: tuple[str, ...],
                domains: tuple[str, ...]) -> None:
    """Add account NAME with its addresses and domains."""
    store = _store(obj)
    account_id = _edit(lambda: store.add_account(name, addresses, domains))
    click.echo(f"account {account_id} {name}")


@directory.group("remove")
def remove() -> None:
    """Remove a contact or an account added from the command line or a CSV file."""


@remove.command("contact")
@click.argument("address")
@click.pass_obj
def remove_contact(obj: Context, address: str) -> None:
    """Remove the contact that has ADDRESS (with all its addresses)."""
    store = _store(obj)
    name = _edit(lambda: store.remove_contact(address))
    click.echo(f"removed contact {name}")


@remove.command("account")
@click.argument("name")
@click.pass_obj
def remove_account(obj: Context, name: str) -> None:
    """Remove account NAME (its contacts stay, without an account)."""
    store = _store(obj)
    _edit(lambda: store.remove_account(name))
    click.echo(f"removed account {name}")


@directory.command("import")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@click.pass_obj
def import_csv(obj: Context, csv_file: Any) -> None:
    """Import contacts and accounts from CSV_FILE (header: kind,name,address,account,domain).

    One row per address or domain; rows of one name are one contact or account.  All rows
    are imported or, on a bad row (named by its line), none.
    """
    store = _store(obj)
    accounts, contacts = _edit(lambda: store.import_csv(csv_file))
    click.echo(f"imported {accounts} account(s) and {contacts} contact(s)")
