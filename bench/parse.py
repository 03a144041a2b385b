"""The parse benchmark: ``parse.extract.parse_raw`` against the standard library's ``email``.

Takes :class:`ParseSettings`; gives :class:`~bench.common.Figure` objects.  Four inputs, each
parsed by both sides from the same bytes, in interleaved rounds (median round reported):

- every message of ``../shared/corpus`` (the files ``tests/test_parse_corpus.py`` selects),
  as a direct mailbox's mail;
- forward envelopes of about 20 KB (a note plus ``message/rfc822`` wrapping a text + HTML
  message, built as ``tests/mailgen.py`` builds them), as a forward mailbox's mail;
- the pipeline benchmark's 4 KB plain mail;
- mail with a 1 MB and a 200 KB attachment (about 1.6 MB, mostly base64).

The reference ("ceiling" in the report; the ratio is then the speed-up) is
``email.message_from_bytes(raw, policy=policy.default)`` extracting the same fields: subject,
from/to/cc addresses, date, message id, text and HTML bodies, attachments' declared names
and bytes (an attached message serialised with its headers as read), with
``message/rfc822`` unwrapped for envelopes.  The fields both sides extract are then
compared exactly, message by message (outside the timed loops): a message is identical, or
differs only for reasons listed in :data:`EXPLANATIONS` (each recognised by its own test and
counted), or differs for no known reason.  Fails with :class:`~bench.common.BenchError` when
the corpus is missing or any message differs for no known reason.
"""

from __future__ import annotations

import binascii
import email
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from bench.common import BenchError, Figure, median, progress
from bench.mail import attachment_mail, forward_envelope, html_mail, plain_mail
from parse.extract import parse_raw
from parse.headers import decode_words
from parse.mime import TNEF_TYPES, ends_lines_with_crlf
from shared.errors import PermanentError
from shared.settings import LimitSettings

FIELDS = ("subject", "from", "to", "cc", "date", "message_id", "text", "html",
          "attachments")
INNER_TYPES = ("message/rfc822", "message/global")
# The library's truest serialisation of an attached message: headers as read, not re-folded,
# lines ended as the message's own are.
AS_READ = policy.default.clone(refold_source="none", max_line_length=0)
AS_READ_CRLF = AS_READ.clone(linesep="\r\n")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ParseSettings:
    rounds: int = 5
    seconds_per_round: float = 1.0  # per side, for the synthetic inputs
    envelopes: int = 50
    attachment_mails: int = 10
    seed: int = 8


# -- the standard library side -----------------------------------------------------------
def stdlib_direct(raw: bytes, diagnose: bool = False) -> dict[str, Any]:
    """The library's fields; ``diagnose`` (for the comparison, never timed) also notes which
    attachments declare a name the library could not read (``names_not_read``)."""
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return stdlib_fields(message, diagnose)


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


def stdlib_fields(message: EmailMessage, diagnose: bool = False) -> dict[str, Any]:
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
            fields["no_parts"] = True
            if isinstance(leftover, bytes) and leftover.strip() and fields["text"] is None:
                fields["text"] = leftover.decode(part.get_content_charset() or "utf-8",
                                                 "replace")
            continue
        name = part.get_filename()
        if diagnose and name is None and _NAME_PARAMETER.search(
                _raw_header(part, "content-disposition") + _raw_header(part, "content-type")):
            fields.setdefault("names_not_read", []).append(len(fields["attachments"]))
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
            # message/rfc822 holds one message; message/delivery-status one header block per
            # recipient, each parsed as a message
            written = AS_READ_CRLF if ends_lines_with_crlf(part) else AS_READ
            data = b"".join(block.as_bytes(policy=written) for block in part.iter_parts())
            if content_type == "message/delivery-status":
                data = data.removesuffix(written.linesep.encode())  # no blank line after the last
        else:
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
        fields["attachments"].append((name, data, content_type))
    return fields


_NAME_PARAMETER = re.compile(r";\s*(?:file)?name\*?=", re.IGNORECASE)


def _raw_header(part: EmailMessage, name: str) -> str:
    """A header's value as read (folded, undecoded), '' when absent."""
    return next((value for key, value in part.raw_items() if key.lower() == name), "")


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


# Why a field may differ from the library's, each a deliberate choice of parse_raw, with the
# test that recognises it.  A difference none of them explains is "unexplained" and fails the
# benchmark (BenchError, exit 1): it is a regression or a new kind of input to look at.
EXPLANATIONS = {
    "stdlib-undecodable": "the library kept raw 8-bit bytes as lone surrogates or U+FFFD; "
                          "parse_raw decodes them (declared charset, else UTF-8 or cp1252)",
    "nul-replaced": "parse_raw replaces NUL with U+FFFD (PostgreSQL text cannot hold NUL)",
    "whitespace": "equal once runs of blanks and line breaks are collapsed (header folding, "
                  "trailing blanks, the line break before a delimiter)",
    "comment-name": "'addr (Name)', the old way of naming a mailbox: the library gives no "
                    "display name, parse_raw takes the comment as the name (getaddresses)",
    "repeated-header": "the address header appears more than once: parse_raw reads every "
                       "occurrence, the library's get() only the first",
    "null-sender": "'<>' (a bounce's null sender) is no mailbox to parse_raw; the library "
                   "gives '<>' as an address",
    "address-dropped": "parse_raw dropped an ambiguous or invalid address and recorded the "
                       "defect (CVE-2023-27043 and 'a b@c' forms)",
    "message-id-kept": "parse_raw keeps everything between the angle brackets; the library "
                       "cuts a msg-id with two '@' short",
    "encoded-text-truncated": "a header of more than 16 KB of encoded words is cut (time "
                              "guard against hostile headers), with a defect",
    "not-base64": "declared base64 but plainly text (or broken base64): parse_raw keeps the "
                  "text or decodes leniently, the library drops blanks or returns it raw",
    "parts-recovered": "the library found no parts (a folded boundary parameter); parse_raw "
                       "unfolds it (RFC 5322) and reads the parts",
    "tnef-opened": "parse_raw opens winmail.dat (TNEF): its files and body replace it",
    "filename-not-read": "the part names a file in a form the library cannot read (an "
                         "unquoted RFC 2047 word: name==?koi8-r?B?...?=) and it gives no "
                         "filename; parse_raw reads and decodes it",
    "filename-words-decoded": "RFC 2047 encoded words in a filename (not standard, but "
                              "common): parse_raw decodes them, the library keeps them",
    "backslash-kept": "a Windows path as a quoted filename: parse_raw keeps its "
                      "backslashes, the library reads each as an escape and drops it",
    "unquoted-filename": "a filename with blanks sent unquoted: parse_raw keeps it whole, "
                         "the library only its first word",
    "encoding-recognised": "a Content-Transfer-Encoding with trailing blanks: the library "
                           "returns the still-encoded bytes, parse_raw decodes them",
    "message-still-base64": "an attached message/* sent base64-encoded: the library does "
                            "not undo a transfer encoding on a message part and gives the "
                            "encoded text back, parse_raw decodes it",
}
_BLANKS = re.compile(r"\s+")


def _lossy(text: str | None) -> bool:
    """Text the library could not decode: lone surrogates (raw 8-bit bytes) or U+FFFD."""
    return text is not None and ("\ufffd" in text or _SURROGATE.search(text) is not None)


def _text_reason(ours: str | None, theirs: str | None, defects: list[str],
                 stdlib_no_parts: bool, stdlib_tnef: bool) -> str | None:
    if ours is not None and theirs is not None:
        if _BLANKS.sub(" ", ours).strip() == _BLANKS.sub(" ", theirs).strip():
            return "whitespace"
        if "\x00" in theirs and ours == theirs.replace("\x00", "\ufffd"):
            return "nul-replaced"
    if _lossy(theirs):
        return "stdlib-undecodable"
    if "encoded-text-truncated" in defects:
        return "encoded-text-truncated"
    if any(d in ("not-base64", "broken-base64") for d in defects):
        return "not-base64"
    if stdlib_no_parts:
        return "parts-recovered"
    if stdlib_tnef:
        return "tnef-opened"
    return None


def _address_reason(header: str, ours: list[dict[str, str]], theirs: list[tuple[str, str]],
                    defects: list[str]) -> str | None:
    if any(d in (f"ambiguous-address:{header}", f"invalid-address:{header}") for d in defects):
        return "address-dropped"
    if theirs and all(address == "<>" for _, address in theirs) and not ours:
        return "null-sender"
    if len(ours) > len(theirs) and [(a["name"], a["address"]) for a in ours[:len(theirs)]] \
            == theirs:
        return "repeated-header"
    if len(ours) != len(theirs):
        return None
    reasons = set()
    for mine, (name, address) in zip(ours, theirs, strict=True):
        if mine["address"] != address:
            if not _lossy(address):
                return None
            reasons.add("stdlib-undecodable")
        if mine["name"] != name:
            if _lossy(name):
                reasons.add("stdlib-undecodable")
            elif not name and "(" not in mine["name"]:
                reasons.add("comment-name")
            elif mine["name"].replace(" ", "") == name.replace(" ", ""):
                reasons.add("whitespace")
            else:
                return None
    return sorted(reasons)[0] if reasons else None


def _attachment_reason(ours: list[dict[str, Any]], theirs: list[tuple[str | None, bytes, str]],
                       stdlib_no_parts: bool, names_not_read: list[int]) -> str | None:
    if any(content_type in TNEF_TYPES for _, _, content_type in theirs):
        return "tnef-opened"
    if stdlib_no_parts and len(ours) > len(theirs):
        return "parts-recovered"
    if len(ours) != len(theirs):
        return None
    reasons = set()
    for number, (mine, (name, data, content_type)) in enumerate(
            zip(ours, theirs, strict=True), start=1):
        if mine["content"] != data:
            if content_type.startswith("message/") and _still_base64(mine["content"], data):
                reasons.add("message-still-base64")
            elif mine["content"] == binascii.a2b_base64(data):
                reasons.add("encoding-recognised")
            else:
                return None
        declared = mine["declared_filename"]
        if declared != name:
            if name is None and declared is not None and number - 1 in names_not_read:
                reasons.add("filename-not-read")
                continue
            if name is None or declared is None:
                return None
            decoded = decode_words(name, [])
            if declared == decoded:
                reasons.add("filename-words-decoded")
            elif declared.startswith(name + " "):
                reasons.add("unquoted-filename")
            elif "\\" in declared and declared.replace("\\", "") in (name, decoded):
                reasons.add("backslash-kept")
            elif _lossy(name):
                reasons.add("stdlib-undecodable")
            else:
                return None
    return sorted(reasons)[0] if reasons else None


def _still_base64(ours: bytes, theirs: bytes) -> bool:
    """The same message, which the library left base64-encoded."""
    try:
        return binascii.a2b_base64(theirs) == ours
    except binascii.Error:
        return False


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, str | None]:
    """Each field on which parse_raw and the library differ (compared exactly), with the
    :data:`EXPLANATIONS` key that accounts for it, or None when nothing does."""
    defects = ours["defects"]
    no_parts = theirs.get("no_parts", False)
    tnef = any(content_type in TNEF_TYPES for _, _, content_type in theirs["attachments"])
    differ: dict[str, str | None] = {}
    for name in ("subject", "text", "html"):
        if ours[name] != theirs[name]:
            differ[name] = _text_reason(ours[name], theirs[name], defects, no_parts, tnef)
    if ours["message_id"] != theirs["message_id"]:
        mine, other = ours["message_id"] or "", theirs["message_id"] or ""
        differ["message_id"] = ("message-id-kept" if other and mine.startswith(other)
                                and mine.count("@") > 1 else None)
    for name, key in (("from", "from_"), ("to", "to"), ("cc", "cc")):
        if [(a["name"], a["address"]) for a in ours[key]] != theirs[name]:
            differ[name] = _address_reason(name, ours[key], theirs[name], defects)
    theirs_date = theirs["date"]
    if theirs_date is not None and theirs_date.tzinfo is None:
        theirs_date = theirs_date.replace(tzinfo=UTC)
    if ours["date"] != theirs_date:
        differ["date"] = None
    if [(a["declared_filename"], a["content"], a["content_type"])
            for a in ours["attachments"]] != theirs["attachments"]:
        differ["attachments"] = _attachment_reason(ours["attachments"], theirs["attachments"],
                                                   no_parts, theirs.get("names_not_read", []))
    return differ


@dataclass
class Comparison:
    """Messages compared field by field: identical, differing only for explained reasons,
    or with an unexplained difference (listed by name)."""

    compared: int = 0
    identical: int = 0
    ours_refused: int = 0  # PermanentError from parse_raw
    stdlib_failed: int = 0  # an exception from the standard library
    explained: int = 0  # messages whose every difference is explained
    reasons: Counter[str] = field(default_factory=Counter)  # fields per explanation
    unexplained: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, differ: dict[str, str | None]) -> None:
        self.compared += 1
        if not differ:
            self.identical += 1
            return
        self.reasons.update(reason for reason in differ.values() if reason)
        unexplained = [name for name, reason in differ.items() if reason is None]
        if unexplained:
            self.unexplained.append(f"{name}: {', '.join(unexplained)}")
        else:
            self.explained += 1

    def as_json(self) -> dict[str, Any]:
        return {"compared": self.compared, "identical": self.identical,
                "explained": self.explained, "unexplained": len(self.unexplained),
                "parse_raw_refused": self.ours_refused, "stdlib_failed": self.stdlib_failed,
                "fields_per_explanation": dict(self.reasons.most_common()),
                "unexplained_messages": self.unexplained, "failures": self.failures,
                "explanations": {key: EXPLANATIONS[key] for key in self.reasons}}


def compare_corpus(names: Sequence[str], raws: Sequence[bytes],
                   limits: LimitSettings) -> Comparison:
    result = Comparison()
    for name, raw in zip(names, raws, strict=True):
        try:
            ours = ours_direct(raw, limits)
        except PermanentError as exc:
            result.ours_refused += 1
            result.failures.append(f"{name}: parse_raw refused it: {exc.reason}")
            continue
        try:
            theirs = stdlib_direct(raw, diagnose=True)
        except Exception as exc:
            result.stdlib_failed += 1
            result.failures.append(f"{name}: the library failed: {type(exc).__name__}: "
                                   f"{str(exc)[:80]}")
            continue
        result.add(name, differences(ours, theirs))
    return result


def compare_envelopes(raws: Sequence[bytes], limits: LimitSettings) -> Comparison:
    result = Comparison()
    for number, raw in enumerate(raws):
        ours = ours_forward(raw, limits)
        theirs = stdlib_forward(raw)
        if len(ours) != len(theirs):
            result.add(f"envelope {number}", {"count": None})
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
    attached = [attachment_mail(rng, f"<attached.{n}@example.net>")
                for n in range(settings.attachment_mails)]
    progress(f"parse: {len(corpus)} corpus messages ({sum(map(len, corpus)) / len(corpus):,.0f}"
             f" B average), {len(envelopes)} envelopes "
             f"({sum(map(len, envelopes)) / len(envelopes):,.0f} B average)")

    corpus_check = compare_corpus(names, corpus, limits)
    envelope_check = compare_envelopes(envelopes, limits)
    plain_check = compare_corpus([f"plain {n}" for n in range(len(plain))], plain, limits)
    attached_check = compare_corpus([f"attached {n}" for n in range(len(attached))], attached,
                                    limits)

    env_ours, env_std, env_runs = rates(lambda r: ours_forward(r, limits), stdlib_forward,
                                        envelopes, settings.rounds,
                                        settings.seconds_per_round, "envelopes")
    corpus_ours, corpus_std, corpus_runs = rates(lambda r: ours_direct(r, limits),
                                                 stdlib_direct, corpus, settings.rounds, 0.0,
                                                 "corpus")
    plain_ours, plain_std, plain_runs = rates(lambda r: ours_direct(r, limits), stdlib_direct,
                                              plain, settings.rounds,
                                              settings.seconds_per_round, "plain 4 KB")
    attached_ours, attached_std, attached_runs = rates(
        lambda r: ours_direct(r, limits), stdlib_direct, attached, settings.rounds,
        settings.seconds_per_round, "with attachments")
    _report_equality({"corpus": corpus_check, "envelopes": envelope_check,
                      "plain 4 KB": plain_check, "with attachments": attached_check})
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
        Figure("parse mail with 1 MB + 200 KB attachments", attached_ours, "msg/s",
               attached_std, reference="stdlib",
               detail={"runs": attached_runs, "equality": attached_check.as_json(),
                       "average_bytes": sum(map(len, attached)) / len(attached)}),
        Figure("corpus fields identical to stdlib", corpus_check.identical, "msgs",
               float(corpus_check.compared), reference="of", target="all compared",
               meets_target=corpus_check.identical == corpus_check.compared,
               detail=corpus_check.as_json()),
    ]
    unexplained = [line for check in (corpus_check, envelope_check, plain_check,
                                      attached_check)
                   for line in check.unexplained]
    if unexplained:
        raise BenchError(f"parse: {len(unexplained)} messages differ from the standard "
                         f"library for no known reason: {'; '.join(unexplained[:10])}")
    return figures, {"corpus": str(root.resolve()), "corpus_messages": len(corpus)}


def _report_equality(checks: dict[str, Comparison]) -> None:
    """The comparison, on stderr: identical, explained (by reason), unexplained, failures."""
    for label, check in checks.items():
        progress(f"parse fields vs stdlib, {label}: {check.identical} of {check.compared} "
                 f"identical, {check.explained} differ for explained reasons, "
                 f"{len(check.unexplained)} unexplained; the library failed on "
                 f"{check.stdlib_failed}, parse_raw refused {check.ours_refused}")
        for reason, count in check.reasons.most_common():
            progress(f"  {count:4} fields  {reason}: {EXPLANATIONS[reason]}")
        for line in check.unexplained:
            progress(f"  unexplained: {line}")
