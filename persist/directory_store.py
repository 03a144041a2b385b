"""Contacts and accounts in the database: the part of the directory edited at runtime.

Takes names and addresses from the CLI, a CSV file, the configuration (copied in by
:meth:`DirectoryStore.sync_config`, marked ``source='config'`` and refused for removal by the
CLI: the configuration file is where they are edited) or from persist itself (unknown
senders, ``source='auto'``).  Gives lookups by address -- exact, without the plus tag, then
the account of the domain -- and listings.  Addresses are checked with
``route.directory.strict_address``; a bad one is a :class:`DirectoryError` naming it.
Fails with ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import (
    ColumnElement,
    String,
    Text,
    any_,
    bindparam,
    delete,
    literal_column,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from persist.database import translate_errors
from persist.tables import Tables, build_tables
from route.directory import address_keys, domain_of, strict_address
from shared.settings import Settings

CSV_COLUMNS = ("kind", "name", "address", "account", "domain")


class DirectoryError(ValueError):
    """An entry that cannot be stored; the message names it."""


@dataclass(frozen=True)
class PartyRef:
    kind: str  # contact or account
    id: int
    name: str
    account_id: int | None = None


def _address(text: str, where: str) -> str:
    address = strict_address(text)
    if address is None:
        raise DirectoryError(f"{where}: {text!r} is not one unambiguous email address")
    return address


def resolve_parties(connection: Connection, tables: Tables,
                    addresses: Iterable[str]) -> dict[str, PartyRef]:
    """Each address's contact, else account (own address, then domain); unknown ones absent."""
    wanted = {a: address_keys(a) for a in addresses}
    if not wanted:
        return {}
    # one statement for both (persist resolves a whole batch's parties at once)
    rows = connection.execute(party_statement(tables, connection.dialect.name),
                              party_parameters(wanted)).all()
    return match_parties(wanted, rows)


def party_statement(tables: Tables, dialect_name: str) -> Any:
    """The contacts and accounts whose address is one of ``keys`` or whose address or domain
    is one of ``values`` (parameters, see :func:`party_parameters`); rows of (kind, value,
    id, name, account_id), kind ``contact`` or the account address's kind."""
    contact_addresses, contacts = tables.contact_addresses, tables.contacts
    account_addresses, accounts_table = tables.account_addresses, tables.accounts
    return union_all(
        select(literal_column("'contact'", String).label("kind"),
               contact_addresses.c.address.label("value"), contacts.c.id, contacts.c.name,
               contacts.c.account_id)
        .join(contacts, contacts.c.id == contact_addresses.c.contact_id)
        .where(_one_of(dialect_name, contact_addresses.c.address, "keys")),
        select(account_addresses.c.kind, account_addresses.c.value, accounts_table.c.id,
               accounts_table.c.name, null().label("account_id"))
        .join(accounts_table, accounts_table.c.id == account_addresses.c.account_id)
        .where(_one_of(dialect_name, account_addresses.c.value, "values")))


def party_parameters(wanted: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """The parameters of :func:`party_statement` for addresses and their lookup keys."""
    keys = {k for ks in wanted.values() for k in ks}
    return {"keys": sorted(keys), "values": sorted(keys | {domain_of(a) for a in wanted})}


def match_parties(wanted: dict[str, tuple[str, ...]], rows: Iterable[Any]) -> dict[str, PartyRef]:
    """Each wanted address's contact, else account, from :func:`party_statement`'s rows."""
    rows = list(rows)
    contacts_found = {row[1]: PartyRef("contact", row[2], row[3], row[4])
                      for row in rows if row[0] == "contact"}
    accounts = {(row[0], row[1]): PartyRef("account", row[2], row[3])
                for row in rows if row[0] != "contact"}
    found: dict[str, PartyRef] = {}
    for address, address_key_list in wanted.items():
        match = next((contacts_found[k] for k in address_key_list if k in contacts_found),
                     None)
        match = match or next((accounts[("address", k)] for k in address_key_list
                               if ("address", k) in accounts), None)
        match = match or accounts.get(("domain", domain_of(address)))
        if match is not None:
            found[address] = match
    return found


def _one_of(dialect_name: str, column: Any, name: str) -> ColumnElement[bool]:
    # On PostgreSQL one array parameter, so the statement's text is the same every time: an
    # IN list of a parameter per value was rendered and parsed anew for each batch.
    if dialect_name == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(Text)))
    return column.in_(bindparam(name, expanding=True))


class DirectoryStore:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._tables = build_tables()
        self._clock = clock or (lambda: datetime.now(UTC))

    # -- writing ------------------------------------------------------------------------
    def add_account(self, name: str, addresses: Iterable[str] = (),
                    domains: Iterable[str] = (), source: str = "cli") -> int:
        with translate_errors(), self._engine.begin() as connection:
            return self._add_account(connection, name, addresses, domains, source)

    def add_contact(self, name: str, addresses: Iterable[str], account: str | None = None,
                    source: str = "cli") -> int:
        with translate_errors(), self._engine.begin() as connection:
            return self._add_contact(connection, name, addresses, account, source)

    def remove_contact(self, address: str, allow_config: bool = False) -> str:
        """Remove the contact owning ``address`` (all its addresses); gives its name."""
        t = self._tables
        key = _address(address, "contact")
        with translate_errors(), self._engine.begin() as connection:
            row = connection.execute(
                select(t.contacts.c.id, t.contacts.c.name, t.contacts.c.source)
                .join(t.contact_addresses, t.contact_addresses.c.contact_id == t.contacts.c.id)
                .where(t.contact_addresses.c.address == key)).first()
            if row is None:
                raise DirectoryError(f"no contact with address {key}")
            if row.source == "config" and not allow_config:
                raise DirectoryError(f"contact {row.name!r} comes from the configuration file; "
                                     "remove it there")
            connection.execute(delete(t.contacts).where(t.contacts.c.id == row.id))
            return str(row.name)

    def remove_account(self, name: str, allow_config: bool = False) -> None:
        t = self._tables
        with translate_errors(), self._engine.begin() as connection:
            row = connection.execute(select(t.accounts.c.id, t.accounts.c.source)
                                     .where(t.accounts.c.name == name)).first()
            if row is None:
                raise DirectoryError(f"no account named {name!r}")
            if row.source == "config" and not allow_config:
                raise DirectoryError(f"account {name!r} comes from the configuration file; "
                                     "remove it there")
            connection.execute(delete(t.accounts).where(t.accounts.c.id == row.id))

    def import_csv(self, stream: IO[str]) -> tuple[int, int]:
        """Rows ``kind,name,address,account,domain`` (header required); gives (accounts,
        contacts) added or extended.  All rows or none: a bad row names its line."""
        reader = csv.DictReader(stream)
        missing = {"kind", "name"} - set(reader.fieldnames or ())
        if missing:
            raise DirectoryError(f"CSV header needs the columns {', '.join(CSV_COLUMNS)}; "
                                 f"missing {', '.join(sorted(missing))}")
        accounts: dict[str, tuple[list[str], list[str]]] = {}
        contacts: dict[str, tuple[list[str], str | None]] = {}
        for line, row in enumerate(reader, start=2):
            kind = (row.get("kind") or "").strip().lower()
            name = (row.get("name") or "").strip()
            address = (row.get("address") or "").strip()
            if not name:
                raise DirectoryError(f"line {line}: no name")
            if kind == "account":
                entry = accounts.setdefault(name, ([], []))
                if address:
                    entry[0].append(_address(address, f"line {line}"))
                if (domain := (row.get("domain") or "").strip().lower()):
                    entry[1].append(domain)
            elif kind == "contact":
                if not address:
                    raise DirectoryError(f"line {line}: a contact needs an address")
                contact = contacts.setdefault(name, ([], (row.get("account") or "").strip()
                                                     or None))
                contact[0].append(_address(address, f"line {line}"))
            else:
                raise DirectoryError(f"line {line}: kind must be contact or account, "
                                     f"not {kind!r}")
        with translate_errors(), self._engine.begin() as connection:
            for name, (addresses, domains) in accounts.items():
                self._add_account(connection, name, addresses, domains, "csv")
            for name, (addresses, account) in contacts.items():
                self._add_contact(connection, name, addresses, account, "csv")
        return len(accounts), len(contacts)

    def sync_config(self, settings: Settings) -> None:
        """Copy the configuration's accounts and contacts in (idempotent; never removes)."""
        if not settings.accounts and not settings.contacts:
            return
        with translate_errors(), self._engine.begin() as connection:
            for account in settings.accounts:
                self._add_account(connection, account.name, account.addresses,
                                  account.domains, "config")
            for contact in settings.contacts:
                self._add_contact(connection, contact.name, contact.addresses,
                                  contact.account, "config")

    def ensure_contact(self, connection: Connection, address: str, name: str) -> PartyRef:
        """The contact of ``address``, created (source ``auto``) when there is none."""
        found = resolve_parties(connection, self._tables, [address]).get(address)
        if found is not None and found.kind == "contact":
            return found
        contact_id = self._add_contact(connection, name or address, [address], None, "auto")
        return PartyRef("contact", contact_id, name or address)

    def _add_account(self, connection: Connection, name: str, addresses: Iterable[str],
                     domains: Iterable[str], source: str) -> int:
        t = self._tables
        name = name.strip()
        if not name:
            raise DirectoryError("an account needs a name")
        account_id = connection.execute(
            select(t.accounts.c.id).where(t.accounts.c.name == name)).scalar()
        if account_id is None:
            account_id = connection.execute(t.accounts.insert().values(
                name=name, source=source, created_at=self._clock())).inserted_primary_key[0]  # type: ignore[index]
        values = [("address", _address(a, f"account {name}")) for a in addresses]
        values += [("domain", d.strip().lower().lstrip("@")) for d in domains if d.strip()]
        for kind, value in values:
            owner = connection.execute(select(t.account_addresses.c.account_id)
                                       .where(t.account_addresses.c.value == value)).scalar()
            if owner is None:
                connection.execute(t.account_addresses.insert().values(
                    value=value, kind=kind, account_id=account_id))
            elif owner != account_id:
                raise DirectoryError(f"account {name}: {value} belongs to another account")
        return int(account_id)

    def _add_contact(self, connection: Connection, name: str, addresses: Iterable[str],
                     account: str | None, source: str) -> int:
        t = self._tables
        keys = list(dict.fromkeys(_address(a, f"contact {name}") for a in addresses))
        if not keys:
            raise DirectoryError(f"contact {name}: needs at least one address")
        account_id = None
        if account:
            account_id = connection.execute(
                select(t.accounts.c.id).where(t.accounts.c.name == account)).scalar()
            if account_id is None:
                raise DirectoryError(f"contact {name}: no account named {account!r}")
        owners = {row.address: row.contact_id for row in connection.execute(
            select(t.contact_addresses).where(t.contact_addresses.c.address.in_(keys)))}
        contact_ids = set(owners.values())
        if len(contact_ids) > 1:
            raise DirectoryError(f"contact {name}: its addresses belong to different contacts")
        if contact_ids:
            contact_id = contact_ids.pop()
            if account_id is not None:
                connection.execute(t.contacts.update().where(t.contacts.c.id == contact_id)
                                   .values(account_id=account_id))
        else:
            contact_id = connection.execute(t.contacts.insert().values(
                name=name.strip() or keys[0], account_id=account_id, source=source,
                created_at=self._clock())).inserted_primary_key[0]  # type: ignore[index]
        for key in keys:
            if key not in owners:
                connection.execute(t.contact_addresses.insert().values(
                    address=key, contact_id=contact_id))
        return int(contact_id)

    # -- reading ------------------------------------------------------------------------
    def contacts(self) -> list[dict[str, Any]]:
        t = self._tables
        query = (select(t.contacts.c.id, t.contacts.c.name, t.contacts.c.source,
                        t.accounts.c.name.label("account"), t.contact_addresses.c.address)
                 .join(t.contact_addresses, t.contact_addresses.c.contact_id == t.contacts.c.id)
                 .outerjoin(t.accounts, t.accounts.c.id == t.contacts.c.account_id)
                 .order_by(t.contacts.c.name, t.contact_addresses.c.address))
        return self._group(query, "address", "addresses")

    def accounts(self) -> list[dict[str, Any]]:
        t = self._tables
        query = (select(t.accounts.c.id, t.accounts.c.name, t.accounts.c.source,
                        t.account_addresses.c.kind, t.account_addresses.c.value)
                 .outerjoin(t.account_addresses,
                            t.account_addresses.c.account_id == t.accounts.c.id)
                 .order_by(t.accounts.c.name, t.account_addresses.c.value))
        with translate_errors(), self._engine.connect() as connection:
            rows = connection.execute(query).all()
        result: dict[int, dict[str, Any]] = {}
        for row in rows:
            entry = result.setdefault(row.id, {"id": row.id, "name": row.name,
                                               "source": row.source, "addresses": [],
                                               "domains": []})
            if row.value is not None:
                entry["addresses" if row.kind == "address" else "domains"].append(row.value)
        return list(result.values())

    def _group(self, query: Any, column: str, into: str) -> list[dict[str, Any]]:
        with translate_errors(), self._engine.connect() as connection:
            rows = connection.execute(query).all()
        result: dict[int, dict[str, Any]] = {}
        for row in rows:
            mapping = dict(row._mapping)
            value = mapping.pop(column)
            result.setdefault(mapping["id"], {**mapping, into: []})[into].append(value)
        return list(result.values())
