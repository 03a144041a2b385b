"""The documents that travel between stages, one marshmallow schema per edge.

Edges: ``raw`` (ingest -> parse), ``parsed`` (parse -> route), ``routed`` (route -> persist).
Each document carries ``schema_version``.  :meth:`Codec.decode` takes the JSON bytes of a
delivery and gives plain Python data (datetimes and bytes restored), validated against the
edge's schema; :meth:`Codec.encode` does the reverse.  ``decode`` raises
:class:`~shared.errors.PermanentError` (reason ``bad-document``) on anything that does not
match its schema, since such a message will never get better by retrying.

Big byte strings (a raw message, an attachment's content) are the bulk of a document; they are
base64-encoded straight into the output bytes and decoded straight from the delivery's bytes,
so that a 25 MB attachment costs one copy, not four or five (issue 8's memory target).
"""

from __future__ import annotations

import binascii
import io
import json
import re
import secrets
from collections.abc import Callable
from typing import Any, Literal, TypeGuard

import pybase64
from marshmallow import Schema, ValidationError, fields, validate

from shared import fastjson
from shared.errors import PermanentError
from shared.fastschema import compile_dumper, compile_loader

Edge = Literal["raw", "parsed", "routed"]
SCHEMA_VERSION = 1


class Base64Bytes(fields.Field):
    """Bytes carried as base64 text in JSON."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        if value is None:
            return None
        return pybase64.b64encode_as_string(value)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("expected base64 text")
        # A _SplicedBase64 is read where it lies in the delivery's bytes (see _loads).
        text: str | memoryview = value.view if isinstance(value, _SplicedBase64) else value
        try:
            # Only the standard alphabet with its padding, nothing else: no blanks, no line
            # breaks, no padding to spare (pybase64 decodes 19 KB in 9 us here, binascii's
            # strict mode in 119).
            return pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:  # ValueError: not ASCII
            raise ValidationError(f"not valid base64: {exc}") from exc


class _Versioned(Schema):
    schema_version = fields.Integer(required=True, validate=validate.Equal(SCHEMA_VERSION))
    trace_id = fields.String(required=True)


class SourceSchema(Schema):
    """Where a raw message was fetched: (mailbox, folder, uidvalidity, uid) names it."""

    mailbox = fields.String(required=True)
    mailbox_kind = fields.String(required=True, validate=validate.OneOf(["direct", "forward"]))
    folder = fields.String(required=True)
    uidvalidity = fields.Integer(allow_none=True, load_default=None)
    uid = fields.String(required=True)
    received_at = fields.AwareDateTime(required=True)
    fetched_at = fields.AwareDateTime(required=True)


class RawSchema(_Versioned):
    source = fields.Nested(SourceSchema, required=True)
    raw = Base64Bytes(required=True)


class AddressSchema(Schema):
    name = fields.String(load_default="")
    address = fields.String(required=True)


class AttachmentSchema(Schema):
    filename = fields.String(required=True)  # sanitised; never a path
    # The name the part declared (decoded, unsanitised), None when it declared none.  Not
    # required: documents parsed before it existed lack it (persist stores NULL).
    declared_filename = fields.String(allow_none=True)
    content_type = fields.String(required=True)
    size = fields.Integer(required=True)
    sha256 = fields.String(required=True)
    content = Base64Bytes(required=True)
    # Set by route's attachment policy: stored, blocked-extension or too-large (then the
    # content is empty).  No default, so parsed documents keep their exact shape.
    status = fields.String()


class EmailSchema(Schema):
    """One email as routing and persistence see it (an inner message, for a forward)."""

    message_id = fields.String(allow_none=True, load_default=None)
    dedup_key = fields.String(required=True)
    fingerprint = fields.String(required=True)
    subject = fields.String(load_default="")
    date = fields.AwareDateTime(allow_none=True, load_default=None)
    from_ = fields.List(fields.Nested(AddressSchema), data_key="from", load_default=list)
    to = fields.List(fields.Nested(AddressSchema), load_default=list)
    cc = fields.List(fields.Nested(AddressSchema), load_default=list)
    reply_to = fields.List(fields.Nested(AddressSchema), load_default=list)
    in_reply_to = fields.String(allow_none=True, load_default=None)
    references = fields.List(fields.String(), load_default=list)
    # A few raw header values routing needs (Auto-Submitted, Delivered-To, ...), lower-case names.
    headers = fields.Dict(keys=fields.String(), values=fields.List(fields.String()),
                          load_default=dict)
    text = fields.String(allow_none=True, load_default=None)
    html = fields.String(allow_none=True, load_default=None)
    attachments = fields.List(fields.Nested(AttachmentSchema), load_default=list)
    defects = fields.List(fields.String(), load_default=list)
    size = fields.Integer(required=True)


class EnvelopeSchema(Schema):
    """How the email reached the mailbox: directly, or wrapped in a forward envelope."""

    kind = fields.String(required=True,
                         validate=validate.OneOf(["direct", "wrapped", "redirected"]))
    forwarder = fields.Nested(AddressSchema, allow_none=True, load_default=None)
    # The header that named the forwarder: "from" (wrapped) or a redirect header.
    forwarder_header = fields.String(allow_none=True, load_default=None)
    # Raw outer headers for the forward decision (parse.envelope.ENVELOPE_HEADERS), topmost
    # first, plus "received-count".
    headers = fields.Dict(keys=fields.String(), values=fields.List(fields.String()),
                          load_default=dict)
    # Senders of the envelopes nested inside the outer one (forward of a forward).
    chain = fields.List(fields.Nested(AddressSchema), load_default=list)
    outer_message_id = fields.String(allow_none=True, load_default=None)
    outer_subject = fields.String(allow_none=True, load_default=None)
    index = fields.Integer(load_default=0)  # which inner message of the envelope
    count = fields.Integer(load_default=1)
    defects = fields.List(fields.String(), load_default=list)


class ParsedSchema(_Versioned):
    source = fields.Nested(SourceSchema, required=True)
    envelope = fields.Nested(EnvelopeSchema, required=True)
    email = fields.Nested(EmailSchema, required=True)


class DeliverySchema(Schema):
    """One user or queue that accepted the email, and why."""

    principal_kind = fields.String(required=True, validate=validate.OneOf(["user", "queue"]))
    principal = fields.String(required=True)
    address = fields.String(required=True)
    mailbox = fields.String(required=True)
    method = fields.String(required=True, validate=validate.OneOf(["direct", "forward"]))
    evidence = fields.Dict(keys=fields.String(), load_default=dict)
    tracked = fields.Boolean(load_default=True)
    untracked_reason = fields.String(allow_none=True, load_default=None)
    rule = fields.String(allow_none=True, load_default=None)  # the record creation rule fired


class RoutedSchema(_Versioned):
    source = fields.Nested(SourceSchema, required=True)
    envelope = fields.Nested(EnvelopeSchema, required=True)
    email = fields.Nested(EmailSchema, required=True)
    deliveries = fields.List(fields.Nested(DeliverySchema), required=True,
                             validate=validate.Length(min=1))
    # route.threading.Correlation.document and route.router.Router._records
    correlation = fields.Dict(keys=fields.String(), load_default=dict)
    records = fields.Dict(keys=fields.String(), load_default=dict)
    # Set only on a canary (mailroute's marked test message; route.canary): its id, which
    # persist marks seen for the deliveries' principal instead of storing anything.  Absent
    # (no default) on every other document, so those keep their exact shape; a persist that
    # predates it refuses a canary as bad-document (a dead letter, never a record).
    canary = fields.String()


class Codec:
    """Encodes and decodes the documents of every edge; one instance per worker.

    The loads and dumps run through functions compiled from the schemas
    (``shared.fastschema``); a document those cannot vouch for is loaded by marshmallow
    itself, so what is accepted and how a rejection reads are marshmallow's.
    """

    def __init__(self) -> None:
        self._schemas: dict[str, Schema] = {
            "raw": RawSchema(),
            "parsed": ParsedSchema(),
            "routed": RoutedSchema(),
        }
        self._loaders = {edge: compile_loader(schema) for edge, schema in self._schemas.items()}
        self._dumpers = {edge: compile_dumper(schema) for edge, schema in self._schemas.items()}

    def encode(self, edge: Edge, document: dict[str, Any]) -> bytes:
        """Serialise a stage's output.  Not validated again here: the consumer's ``decode``
        validates every document, and a bad one is dead-lettered there with the reason
        (validating on both sides cost a quarter of a stage's time)."""
        document = {"schema_version": SCHEMA_VERSION, **document}
        blobs = _set_aside_blobs(edge, document)
        dumped = self._dumpers[edge](document)
        encoded = fastjson.dumps(dumped)
        return _splice(encoded, blobs) if blobs else encoded

    def decode(self, edge: Edge, body: bytes | str) -> dict[str, Any]:
        data = _read_json(edge, body, fastjson.loads)
        try:
            fast: dict[str, Any] = self._loaders[edge](data)
            return fast
        except Exception:  # Uncertain, or a surprise: marshmallow decides
            pass
        # on what json.loads reads: orjson reads an integer past 64 bits as a float
        data = _read_json(edge, body, json.loads)
        try:
            loaded: dict[str, Any] = self._schemas[edge].load(data)
        except ValidationError as exc:
            raise PermanentError("bad-document", f"{edge}: {exc.messages}") from exc
        return loaded


# Byte strings at least this big skip marshmallow and json (see _set_aside_blobs).
_SPLICE_MIN_BYTES = 64 * 1024
# A raw message is spliced from this size: json.dumps of its base64 text costs more than the
# splice from about 2 KB (a 20 KB message: 190 -> 58 us to encode); decoding is unchanged.
_SPLICE_RAW_MIN_BYTES = 1024
# Input bytes base64-encoded at a time while splicing (a multiple of 3: no padding inside).
_SPLICE_CHUNK = 3 * 256 * 1024

# (placeholder, the bytes it stands for)
_Blob = tuple[bytes, bytes]


def _set_aside_blobs(edge: Edge, document: dict[str, Any]) -> list[_Blob]:
    """Replace big byte strings in ``document`` (a fresh top-level copy) by placeholders.

    Only the raw message and attachment contents can be big; the dicts on their way are
    copied, never changed in place.  The placeholders carry a random token, so no real
    content can be mistaken for one.
    """
    blobs: list[_Blob] = []
    token: list[bytes] = []  # made on first use: most documents have no big byte string

    def aside(data: bytes) -> bytes:
        if not token:
            token.append(secrets.token_hex(16).encode("ascii"))
        placeholder = b"mailroute-blob:" + token[0] + b":" + str(len(blobs)).encode("ascii")
        blobs.append((placeholder, data))
        return placeholder

    if edge == "raw":
        raw = document.get("raw")
        if isinstance(raw, bytes) and len(raw) >= _SPLICE_RAW_MIN_BYTES:
            document["raw"] = aside(raw)
        return blobs
    email = document.get("email")
    attachments = email.get("attachments") if isinstance(email, dict) else None
    if not isinstance(attachments, list) or not any(
            isinstance(item, dict) and _is_big(item.get("content")) for item in attachments):
        return blobs
    assert isinstance(email, dict)
    document["email"] = {**email, "attachments": [
        {**item, "content": aside(item["content"])}
        if isinstance(item, dict) and _is_big(item.get("content")) else item
        for item in attachments]}
    return blobs


def _is_big(value: Any) -> TypeGuard[bytes]:
    return isinstance(value, bytes) and len(value) >= _SPLICE_MIN_BYTES


def _splice(encoded: bytes, blobs: list[_Blob]) -> bytes:
    """``encoded`` with each placeholder's JSON string replaced by its bytes' base64.

    Gives exactly what the JSON encoder gives for the base64 text (the base64 alphabet needs no
    escaping), without the str, escaped-str and joined-str copies of it.
    """
    found: list[tuple[int, int, bytes]] = []
    for placeholder, data in blobs:
        marker = b'"' + pybase64.b64encode(placeholder) + b'"'
        at = encoded.find(marker)
        if at < 0:
            raise ValueError("a set-aside byte string is missing from the encoded document")
        found.append((at, at + len(marker), data))
    found.sort(key=lambda item: item[0])
    out = io.BytesIO()
    position = 0
    for start, end, data in found:
        out.write(encoded[position:start])
        out.write(b'"')
        view = memoryview(data)
        for offset in range(0, len(view), _SPLICE_CHUNK):
            out.write(pybase64.b64encode(view[offset:offset + _SPLICE_CHUNK]))
        out.write(b'"')
        position = end
    out.write(encoded[position:])
    # getvalue() hands over BytesIO's own buffer (no copy) when nothing else views it.
    return out.getvalue()


class _SplicedBase64(str):
    """A big base64 JSON string left where it lies in a delivery's bytes.

    Its text is a placeholder; ``view`` is the base64 itself, which only
    :class:`Base64Bytes` reads.
    """

    view: memoryview


# Where a raw message's or an attachment's JSON string starts: the match ends at its opening
# quote.  Its end is found with find(), not with a repeat in the pattern: the regex engine
# read base64 at 0.45 GB/s, 20 times slower than pybase64 decodes it.
_BIG_MEMBER_START = re.compile(rb'"(?:raw|content)"[ \t\n\r]*:[ \t\n\r]*"')


def _read_json(edge: Edge, body: bytes | str, loads: Callable[[bytes | str], Any]) -> Any:
    try:
        return _loads(edge, body, loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError("bad-document", f"{edge}: not JSON: {exc}") from exc


def _loads(edge: Edge, body: bytes | str, loads: Callable[[bytes | str], Any]) -> Any:
    """``loads(body)``, leaving big ``raw``/``content`` strings in ``body``.

    json.loads would decode the whole body into one str and copy each string out of it.
    The big members are cut out first (placeholders in their stead), the small rest is
    parsed, and the members where the schema expects bytes become :class:`_SplicedBase64`,
    whose base64 the schema checks as it decodes it; a placeholder found anywhere else gets
    its text back, read as JSON.  Only a string without a backslash is cut out: with no
    escape in it, its first quote is its end and its bytes are its text.  A member's opening
    quote preceded by an odd number of backslashes is inside another string and is left
    alone; any other match is a real member, or the document was not valid JSON either way.
    """
    if not isinstance(body, bytes) or len(body) < _SPLICE_MIN_BYTES:
        return loads(body)
    token = secrets.token_hex(16)
    spliced: dict[str, memoryview] = {}
    pieces: list[bytes] = []
    position = 0
    view = memoryview(body)
    match = _BIG_MEMBER_START.search(body)
    while match is not None:
        start = match.end()
        end = body.find(b'"', start)
        if (_escaped(body, match.start()) or end - start < _SPLICE_MIN_BYTES
                or body.find(b"\\", start, end) >= 0):
            match = _BIG_MEMBER_START.search(body, start)
            continue
        placeholder = f"mailroute-base64:{token}:{len(spliced)}"
        spliced[placeholder] = view[start:end]
        pieces += (body[position:start], placeholder.encode("ascii"))
        position = end
        match = _BIG_MEMBER_START.search(body, end + 1)
    if not spliced:
        return loads(body)
    pieces.append(body[position:])
    data = loads(b"".join(pieces))
    if edge == "raw":
        _take_spliced(data, "raw", spliced)
    else:
        email = data.get("email") if isinstance(data, dict) else None
        attachments = email.get("attachments") if isinstance(email, dict) else None
        for item in attachments if isinstance(attachments, list) else []:
            _take_spliced(item, "content", spliced)
    if spliced:
        _restore_text(data, spliced, loads)
    return data


def _escaped(body: bytes, at: int) -> bool:
    """Is the quote at ``at`` escaped (an odd number of backslashes right before it)?"""
    count = 0
    while at - count > 0 and body[at - count - 1] == 0x5C:
        count += 1
    return count % 2 == 1


def _take_spliced(holder: Any, key: str, spliced: dict[str, memoryview]) -> None:
    value = holder.get(key) if isinstance(holder, dict) else None
    if isinstance(value, str) and value in spliced:
        kept = _SplicedBase64(value)
        kept.view = spliced.pop(value)
        holder[key] = kept


def _restore_text(data: Any, spliced: dict[str, memoryview],
                  loads: Callable[[bytes | str], Any]) -> None:
    """Put the text back for each placeholder left in ``data`` (not where bytes go)."""
    stack = [data]
    while stack and spliced:
        item = stack.pop()
        slots = item.items() if isinstance(item, dict) else enumerate(item) \
            if isinstance(item, list) else ()
        for slot, value in list(slots):
            if isinstance(value, str) and value in spliced:
                item[slot] = loads(b'"' + spliced.pop(value).tobytes() + b'"')
            elif isinstance(value, dict | list):
                stack.append(value)
