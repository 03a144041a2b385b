"""The parse benchmark: ``parse.extract.parse_raw`` against the standard library's ``email``.

Takes :class:`ParseSettings`; gives :class:`~bench.common.Figure` objects.  Three inputs, each
parsed by both sides from the same bytes, in interleaved rounds (median round reported):

- every message of ``../shared/corpus`` (the files ``tests/test_parse_corpus.py`` selects),
  as a direct mailbox's mail;
- forward envelopes of about 20 KB (a note plus ``message/rfc822`` wrapping a text + HTML
  message, built as ``tests/mailgen.py`` builds them), as a forward mailbox's mail;
- the pipeline benchmark's 4 KB plain mail.

The reference ("ceiling" in the report; the ratio is then the speed-up) is
``email.message_from_bytes(raw, policy=policy.default)`` extracting the same fields: subject,
from/to/cc addresses, date, message id, text and HTML bodies, attachments' names and bytes,
with ``message/rfc822`` unwrapped for envelopes.  The fields both sides extract are then
compared message by message (outside the timed loops) and the differences reported.
Fails with :class:`~bench.common.BenchError` when the corpus is missing.
"""

from __future__ import annotations

import email
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from bench.common import BenchError, Figure, median, progress
from bench.mail import forward_envelope, html_mail, plain_mail
from parse.extract import parse_raw
from parse.mime import sanitise_filename
from shared.errors import PermanentError
from shared.settings import LimitSettings

FIELDS = ("subject", "from", "to", "cc", "date", "message_id", "text", "html",
          "attachments")
INNER_TYPES = ("message/rfc822", "message/global")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ParseSettings:
    rounds: int = 5
    seconds_per_round: float = 1.0  # per side, for the synthetic inputs
    envelopes: int = 50
    seed: int = 8


# -- the standard library side -----------------------------------------------------------
def stdlib_direct(raw: bytes) -> dict[str, Any]:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return stdlib_fields(message)


def stdlib_forward(raw: bytes) -> list[dict[str, Any]]:
    """The fields of each message attached to a forward envelope, plus the forwarder's."""
    outer = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(outer, EmailMessage)
    forwarder = _addresses(outer, "from")
    envelope = {"forwarder": forwarder[0] if forwarder else None,
                "outer_subject": str(outer.get("subject", "")),
                "outer_message_id": _message_id(outer)}
    inner = []
    for part in _leaves(outer):
        if part.get_content_type() in INNER_TYPES:
            attached = part.get_payload(0)
            assert isinstance(attached, EmailMessage)
            inner.append({**stdlib_fields(attached), "envelope": envelope})
    return inner


def stdlib_fields(message: EmailMessage) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "subject": str(message.get("subject", "")),
        "from": _addresses(message, "from"),
        "to": _addresses(message, "to"),
        "cc": _addresses(message, "cc"),
        "date": _date(message),
        "message_id": _message_id(message),
        "text": None,
        "html": None,
        "attachments": [],
    }
    for part in _leaves(message):
        content_type = part.get_content_type()
        if content_type.startswith("multipart/"):
            # no parts found (a missing boundary): parse_raw keeps any text as the body
            leftover = part.get_payload(decode=True)
            if isinstance(leftover, bytes) and leftover.strip() and fields["text"] is None:
                fields["text"] = leftover.decode(part.get_content_charset() or "utf-8",
                                                 "replace")
            continue
        name = part.get_filename()
        if (content_type in ("text/plain", "text/html") and name is None
                and part.get_content_disposition() != "attachment"):
            content = part.get_content()
            if content_type == "text/plain":
                fields["text"] = content if fields["text"] is None else (
                    fields["text"] + "\n" + content)
                continue
            if fields["html"] is None:
                fields["html"] = content
                continue
        if content_type.startswith("message/") and part.is_multipart():
            attached = part.get_payload(0)
            assert isinstance(attached, Message)
            data = attached.as_bytes()
        else:
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
        fields["attachments"].append((name, data, content_type))
    return fields


def _leaves(message: EmailMessage) -> list[EmailMessage]:
    """Non-multipart parts in order, not descending into attached messages."""
    if message.get_content_maintype() == "multipart" and message.is_multipart():
        found = []
        for part in message.iter_parts():
            assert isinstance(part, EmailMessage)
            found.extend(_leaves(part))
        return found
    return [message]


def _addresses(message: EmailMessage, name: str) -> list[tuple[str, str]]:
    header = message.get(name)
    if header is None:
        return []
    return [(a.display_name, a.addr_spec) for a in header.addresses]


def _date(message: EmailMessage) -> datetime | None:
    header = message.get("date")
    return None if header is None else header.datetime


def _message_id(message: EmailMessage) -> str | None:
    value = "".join(str(message.get("message-id", "")).split()).strip("<>")
    return value or None


# -- the parse_raw side, and the comparison ----------------------------------------------
def ours_direct(raw: bytes, limits: LimitSettings) -> dict[str, Any]:
    return parse_raw(raw, "direct", limits).emails[0]


def ours_forward(raw: bytes, limits: LimitSettings) -> list[dict[str, Any]]:
    return parse_raw(raw, "forward", limits).emails


def _same_text(ours: str | None, theirs: str | None) -> bool:
    return ours == theirs or _lossy(theirs) or (
        ours is not None and theirs is not None and ours.split() == theirs.split())


def _lossy(text: str | None) -> bool:
    """Text the library could not decode: lone surrogates (raw 8-bit bytes) or U+FFFD."""
    return text is not None and ("\ufffd" in text or _SURROGATE.search(text) is not None)


def _same_addresses(ours: list[dict[str, str]], theirs: list[tuple[str, str]]) -> bool:
    """Same addr-specs in order; display names only where the library has a clean one."""
    if [a["address"].lower() for a in ours] != [a.lower() for _, a in theirs]:
        return False
    return all(not name or _lossy(name) or mine["name"] == name
               for mine, (name, _) in zip(ours, theirs, strict=True))


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The fields on which parse_raw and the standard library disagree (normalised).

    Values the library could not decode (raw 8-bit bytes it keeps as surrogates, U+FFFD)
    are not compared: parse_raw decodes those as UTF-8 or cp1252 on purpose.
    """
    differ = []
    if not _lossy(theirs["subject"]) and (
            " ".join(ours["subject"].split()) != " ".join(theirs["subject"].split())):
        differ.append("subject")
    for field, key in (("from", "from_"), ("to", "to"), ("cc", "cc")):
        if not _same_addresses(ours[key], theirs[field]):
            differ.append(field)
    theirs_date = theirs["date"]
    if theirs_date is not None and theirs_date.tzinfo is None:
        theirs_date = theirs_date.replace(tzinfo=UTC)
    if ours["date"] != theirs_date:
        differ.append("date")
    if ours["message_id"] != theirs["message_id"]:
        differ.append("message_id")
    if not _same_text(ours["text"], theirs["text"]):
        differ.append("text")
    if not _same_text(ours["html"], theirs["html"]):
        differ.append("html")
    attachments = ours["attachments"]
    theirs_attachments = theirs["attachments"]
    if len(attachments) != len(theirs_attachments):
        differ.append("attachments")
    else:
        for number, (mine, (name, data, content_type)) in enumerate(
                zip(attachments, theirs_attachments, strict=True), start=1):
            # attached messages: the library re-folds their headers, parse_raw keeps them
            same_bytes = mine["content"] == data or content_type.startswith("message/")
            same_name = name is None or mine["filename"] == sanitise_filename(
                name, f"attachment-{number}")
            if not (same_bytes and same_name):
                differ.append("attachments")
                break
    return differ


@dataclass
class Comparison:
    compared: int = 0
    identical: int = 0
    ours_refused: int = 0  # PermanentError from parse_raw
    stdlib_failed: int = 0  # an exception from the standard library
    fields: Counter[str] | None = None
    examples: list[str] | None = None

    def add(self, name: str, differ: list[str]) -> None:
        self.compared += 1
        if not differ:
            self.identical += 1
            return
        self.fields = self.fields or Counter()
        self.fields.update(differ)
        self.examples = self.examples or []
        if len(self.examples) < 40:
            self.examples.append(f"{name}: {', '.join(differ)}")

    def as_json(self) -> dict[str, Any]:
        return {"compared": self.compared, "identical": self.identical,
                "parse_raw_refused": self.ours_refused, "stdlib_failed": self.stdlib_failed,
                "differing_fields": dict(self.fields or {}), "examples": self.examples or []}


def compare_corpus(names: Sequence[str], raws: Sequence[bytes],
                   limits: LimitSettings) -> Comparison:
    result = Comparison()
    for name, raw in zip(names, raws, strict=True):
        try:
            ours = ours_direct(raw, limits)
        except PermanentError:
            result.ours_refused += 1
            continue
        try:
            theirs = stdlib_direct(raw)
        except Exception:
            result.stdlib_failed += 1
            continue
        result.add(name, differences(ours, theirs))
    return result


def compare_envelopes(raws: Sequence[bytes], limits: LimitSettings) -> Comparison:
    result = Comparison()
    for number, raw in enumerate(raws):
        ours = ours_forward(raw, limits)
        theirs = stdlib_forward(raw)
        if len(ours) != len(theirs):
            result.add(f"envelope {number}", ["count"])
            continue
        for mine, other in zip(ours, theirs, strict=True):
            result.add(f"envelope {number}", differences(mine, other))
    return result


# -- timing -------------------------------------------------------------------------------
def _pass(function: Callable[[bytes], Any], raws: Sequence[bytes]) -> float:
    started = time.perf_counter()
    for raw in raws:
        try:
            function(raw)
        except Exception:  # both sides' failures cost time and count as handled
            continue
    return time.perf_counter() - started


def rates(ours: Callable[[bytes], Any], theirs: Callable[[bytes], Any],
          raws: Sequence[bytes], rounds: int, min_seconds: float,
          label: str) -> tuple[float, float, dict[str, list[float]]]:
    """Messages/s of each side, median of interleaved rounds of at least ``min_seconds``."""
    probe = max(_pass(theirs, raws), 1e-6)
    passes = max(1, round(min_seconds / probe))
    runs: dict[str, list[float]] = {"parse_raw": [], "stdlib": []}
    for number in range(rounds):
        for side, function in (("parse_raw", ours), ("stdlib", theirs)):
            seconds = sum(_pass(function, raws) for _ in range(passes))
            runs[side].append(len(raws) * passes / seconds)
        progress(f"parse {label}: round {number + 1}/{rounds}: parse_raw "
                 f"{runs['parse_raw'][-1]:.0f}/s, stdlib {runs['stdlib'][-1]:.0f}/s")
    return median(runs["parse_raw"]), median(runs["stdlib"]), runs


def corpus_files() -> tuple[Path, list[Path]]:
    from tests.test_parse_corpus import CORPUS, corpus_messages

    files = corpus_messages()
    if not files:
        raise BenchError(f"no corpus under {CORPUS.resolve()}")
    return CORPUS, files


def run(settings: ParseSettings) -> tuple[list[Figure], dict[str, Any]]:
    limits = LimitSettings()
    root, files = corpus_files()
    names = [str(path.relative_to(root)) for path in files]
    corpus = [path.read_bytes() for path in files]
    rng = random.Random(settings.seed)
    envelopes = [forward_envelope(rng, html_mail(rng, f"<html.{n}@example.net>"),
                                  "bob@corp.example.com") for n in range(settings.envelopes)]
    plain = [plain_mail(rng, f"<plain.{n}@example.net>") for n in range(settings.envelopes)]
    progress(f"parse: {len(corpus)} corpus messages ({sum(map(len, corpus)) / len(corpus):,.0f}"
             f" B average), {len(envelopes)} envelopes "
             f"({sum(map(len, envelopes)) / len(envelopes):,.0f} B average)")

    corpus_check = compare_corpus(names, corpus, limits)
    envelope_check = compare_envelopes(envelopes, limits)
    plain_check = compare_corpus([f"plain {n}" for n in range(len(plain))], plain, limits)

    env_ours, env_std, env_runs = rates(lambda r: ours_forward(r, limits), stdlib_forward,
                                        envelopes, settings.rounds,
                                        settings.seconds_per_round, "envelopes")
    corpus_ours, corpus_std, corpus_runs = rates(lambda r: ours_direct(r, limits),
                                                 stdlib_direct, corpus, settings.rounds, 0.0,
                                                 "corpus")
    plain_ours, plain_std, plain_runs = rates(lambda r: ours_direct(r, limits), stdlib_direct,
                                              plain, settings.rounds,
                                              settings.seconds_per_round, "plain 4 KB")
    env_ratio = env_ours / env_std
    figures = [
        Figure("parse forward envelope (~20 KB)", env_ours, "msg/s", env_std, reference="stdlib",
               target=">= 1000 msg/s and >= 4.5x stdlib",
               meets_target=env_ours >= 1000 and env_ratio >= 4.5,
               detail={"runs": env_runs, "equality": envelope_check.as_json(),
                       "average_bytes": sum(map(len, envelopes)) / len(envelopes)}),
        Figure("parse corpus (direct)", corpus_ours, "msg/s", corpus_std, reference="stdlib",
               detail={"runs": corpus_runs, "messages": len(corpus),
                       "average_bytes": sum(map(len, corpus)) / len(corpus)}),
        Figure("parse plain mail (4 KB)", plain_ours, "msg/s", plain_std, reference="stdlib",
               detail={"runs": plain_runs, "equality": plain_check.as_json()}),
        Figure("corpus fields identical to stdlib", corpus_check.identical, "msgs",
               float(corpus_check.compared), reference="of", target="all compared",
               meets_target=corpus_check.identical == corpus_check.compared,
               detail=corpus_check.as_json()),
    ]
    return figures, {"corpus": str(root.resolve()), "corpus_messages": len(corpus)}
