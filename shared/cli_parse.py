"""``mailroute parse FILE...``: what the parse stage makes of raw messages, as JSON.

Takes files of raw messages (RFC 5322 bytes, as a mailbox holds them; ``-`` reads standard
input) and the configuration's limits; prints one JSON object per file (one per line, or
indented with ``--indent``): the envelope kind (``direct``, ``wrapped``, ``redirected``), who
forwarded it and by which header, each unwrapped inner message with its headers, bodies and
attachments, and every defect; a message parse refuses is printed with its reason.  Exit
status 0 when every file was handled (judged bad included), 1 when a file could not be read
(or parse itself failed), 2 on a bad configuration.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from shared.cli_support import Context
from shared.errors import PermanentError

_PREVIEW = 500


@click.command("parse")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False,
                                                                  allow_dash=True))
@click.option("--as", "mailbox_kind", type=click.Choice(["auto", "forward", "direct"]),
              default="auto", show_default=True,
              help="Parse as mail of a forward mailbox or of a direct one; auto tries forward "
                   "and falls back to direct when the message carries no original.")
@click.option("--indent", type=int, default=None, help="Indent the JSON (one object per file "
                                                       "either way).")
@click.pass_obj
def parse_command(ctx: Context, files: tuple[str, ...], mailbox_kind: str,
                  indent: int | None) -> None:
    """Print, as JSON, the envelope and the inner messages parse finds in each FILE."""
    limits = ctx.load().limits
    unreadable = 0
    for name in files:
        try:
            raw = sys.stdin.buffer.read() if name == "-" else _read(name)
        except OSError as exc:
            click.echo(f"mailroute parse: cannot read {name}: {exc.strerror}", err=True)
            unreadable += 1
            continue
        try:
            report = describe(name, raw, mailbox_kind, limits)
        except Exception as exc:  # a bug in parse: the tool failed on this file
            click.echo(f"mailroute parse: {name}: parse failed: {type(exc).__name__}: {exc}",
                       err=True)
            unreadable += 1
            continue
        click.echo(json.dumps(report, indent=indent, ensure_ascii=False, default=str))
    if unreadable:
        raise SystemExit(1)


def _read(name: str) -> bytes:
    with open(name, "rb") as handle:
        return handle.read()


def describe(name: str, raw: bytes, mailbox_kind: str, limits: Any) -> dict[str, Any]:
    """The JSON-ready report of one raw message."""
    from parse.extract import parse_raw

    report: dict[str, Any] = {"file": name, "size": len(raw), "parsed_as": None}
    kinds = ["forward", "direct"] if mailbox_kind == "auto" else [mailbox_kind]
    for kind in kinds:
        report["parsed_as"] = kind
        try:
            result = parse_raw(raw, kind, limits)
        except PermanentError as exc:
            report["error"] = {"reason": exc.reason, "detail": exc.detail}
            if mailbox_kind == "auto" and exc.reason == "invalid-forward-mail-item":
                report["not_a_forward"] = exc.detail
                continue
            report["ok"] = False
            return report
        report.pop("error", None)
        report["ok"] = True
        envelope = dict(result.envelope)
        envelope.pop("index", None)
        report["envelope"] = envelope
        report["messages"] = [_message(envelope_item, email)
                              for envelope_item, email in result.items()]
        return report
    return report


def _message(envelope: dict[str, Any], email: dict[str, Any]) -> dict[str, Any]:
    text, html = email.get("text"), email.get("html")
    return {
        "index": envelope["index"],
        "forwarded_by": (envelope.get("forwarder") or {}).get("address"),
        "chain": [item["address"] for item in envelope.get("chain") or []],
        "headers": {
            "message_id": email["message_id"],
            "subject": email["subject"],
            "date": email["date"].isoformat() if email.get("date") else None,
            "from": email["from_"],
            "to": email["to"],
            "cc": email["cc"],
            "reply_to": email["reply_to"],
            "in_reply_to": email["in_reply_to"],
            "references": email["references"],
            **email.get("headers", {}),
        },
        "parts": {
            "text": {"chars": len(text), "preview": text[:_PREVIEW]} if text is not None
            else None,
            "html": {"chars": len(html), "preview": html[:_PREVIEW]} if html is not None
            else None,
        },
        "attachments": [{key: value for key, value in attachment.items() if key != "content"}
                        for attachment in email["attachments"]],
        "dedup_key": email["dedup_key"],
        "size": email["size"],
        "defects": email["defects"],
    }
