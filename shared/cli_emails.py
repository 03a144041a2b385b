"""``mailroute emails list|show``: the stored emails, and for each who received it and why.

Takes the configuration (for the database URL); prints, per email, its deliveries (receiving
mailbox, accepting user or queue, method and evidence, tracked or why not, the rule that
fired), its correlation (method and what it linked to), its case, parties, attachments and
notes.  Exit 2 on a bad configuration, 1 when the database cannot be reached, 1 with a
message for an email that does not exist.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import click

from shared.cli_support import Context, connect_or_fail, open_engine

_DELIVERY_SHOWN = {"id", "email_id", "principal_kind", "principal", "address", "mailbox",
                   "method", "evidence", "tracked", "untracked_reason", "rule", "trace_id",
                   "created_at", "source_mailbox", "source_folder", "source_uidvalidity",
                   "source_uid"}


def _store(obj: Context) -> Any:
    settings = obj.load()
    from persist.blobs import blob_store_for
    from persist.store import EmailStore

    engine = connect_or_fail("database", lambda: open_engine(settings))
    return EmailStore(engine, blobs=blob_store_for(settings.attachments))


@click.group()
def emails() -> None:
    """Stored emails: who each was delivered to, and why."""


@emails.command("list")
@click.option("-n", "--limit", default=20, show_default=True, help="How many, newest first.")
@click.pass_obj
def list_emails(obj: Context, limit: int) -> None:
    """The newest emails with their recipients, tracking and correlation."""
    store = _store(obj)
    rows = connect_or_fail("database", lambda: store.list_emails(limit))
    click.echo(f"{'ID':>6} {'FIRST SEEN':<20} {'TRACKED':<7} {'LINKED BY':<12} "
               f"{'DELIVERED TO':<28} {'FROM':<28} SUBJECT")
    for row in rows:
        deliveries = connect_or_fail("database", partial(store.deliveries_for, row["id"]))
        who = ",".join(f"{d['principal_kind'][0]}:{d['principal']}"
                       + ("" if d["tracked"] else "(untracked)") for d in deliveries)
        seen = row["first_seen_at"].strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{row['id']:>6} {seen:<20} {'yes' if row['tracked'] else 'no':<7} "
                   f"{row['correlation_method'] or 'none':<12} {who:<28} "
                   f"{(row['from_address'] or '-'):<28} {row['subject']}")


@emails.command("show")
@click.argument("email_id", type=int)
@click.pass_obj
def show_email(obj: Context, email_id: int) -> None:
    """One email: deliveries and why, correlation, case, parties, attachments, notes."""
    store = _store(obj)
    email = connect_or_fail("database", lambda: store.email(email_id))
    if email is None:
        raise click.ClickException(f"no email with id {email_id}")
    out = click.echo
    out(f"email {email['id']}  {email['subject']!r}")
    out(f"  message-id   {email['message_id'] or '-'}   (key {email['dedup_key']})")
    out(f"  from         {email['from_address'] or '-'}   sent {email['sent_at'] or '-'}")
    out(f"  tracked      {'yes' if email['tracked'] else 'no'}   rule fired: "
        f"{email['rule'] or '-'}")
    correlation = email["correlation"] or {}
    parent = email["parent_email_id"]
    out(f"  correlation  {email['correlation_method'] or 'none'}"
        + (f" -> email {parent} ({correlation.get('parent_message_id') or '-'})"
           if parent else "")
        + f"   thread {email['thread_id']}"
        + ("   (found by persist)" if correlation.get("resolved_by") == "persist" else ""))
    out("  deliveries")
    for d in store.deliveries_for(email_id):
        why = "tracked" if d["tracked"] else f"untracked: {d['untracked_reason']}"
        out(f"    {d['principal_kind']} {d['principal']} <{d['address']}>  via mailbox "
            f"{d['mailbox']} ({d['method']}, uid {d['source_uid']})  {why}  "
            f"rule: {d['rule'] or '-'}")
        out(f"      evidence {json.dumps(d['evidence'], sort_keys=True, default=str)}")
        for key in sorted(set(d) - _DELIVERY_SHOWN):  # columns other stages add
            out(f"      {key} {json.dumps(d[key], sort_keys=True, default=str)}")
    for item in store.queue_items_for(email_id):
        out(f"  queue item   {item['queue']} ({item['state']}) priority "
            f"{item['priority'] or '-'} owner {item['owner'] or '-'} rule {item['rule'] or '-'}")
    for case in store.cases_for(email_id):
        out(f"  case         {case['id']} {case['title']!r} ({case['state']}, {case['link']}) "
            f"priority {case['priority'] or '-'} owner {case['owner'] or '-'} "
            f"rule {case['rule']}")
    for party in store.resolved_parties_for(email_id):
        target = " ".join(
            [f"contact {party['contact_id']}"] * bool(party["contact_id"])
            + [f"account {party['account_id']}"] * bool(party["account_id"]))
        out(f"  {party['role']:<12} {party['address']} {party['name']!r} "
            f"{party['resolution'] or 'unresolved'} {target}".rstrip())
    for attachment in store.attachments_for(email_id):
        declared = attachment["declared_filename"]
        naming = ("" if declared == attachment["filename"] else " (no declared name)"
                  if declared is None else f" (declared {declared!r})")
        out(f"  attachment   {attachment['filename']!r}{naming} {attachment['content_type']} "
            f"{attachment['size']} bytes {attachment['status']} sha256 "
            f"{attachment['sha256'][:16]}")
    for note in email["notes"] or []:
        out(f"  note         {note}")
    for defect in email["defects"] or []:
        out(f"  defect       {defect}")
