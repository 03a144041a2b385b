"""The documents that travel between stages, one marshmallow schema per edge.

Edges: ``raw`` (ingest -> parse), ``parsed`` (parse -> route), ``routed`` (route -> persist).
Each document carries ``schema_version``.  :meth:`Codec.decode` takes the JSON bytes of a
delivery and gives plain Python data (datetimes and bytes restored), validated against the
edge's schema; :meth:`Codec.encode` does the reverse.  ``decode`` raises
:class:`~shared.errors.PermanentError` (reason ``bad-document``) on anything that does not
match its schema, since such a message will never get better by retrying.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

from marshmallow import Schema, ValidationError, fields, validate

from shared.errors import PermanentError

Edge = Literal["raw", "parsed", "routed"]
SCHEMA_VERSION = 1


class Base64Bytes(fields.Field):
    """Bytes carried as base64 text in JSON."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        if value is None:
            return None
        return base64.b64encode(value).decode("ascii")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("expected base64 text")
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
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


class Codec:
    """Encodes and decodes the documents of every edge; one instance per worker."""

    def __init__(self) -> None:
        self._schemas: dict[str, Schema] = {
            "raw": RawSchema(),
            "parsed": ParsedSchema(),
            "routed": RoutedSchema(),
        }

    def encode(self, edge: Edge, document: dict[str, Any]) -> bytes:
        """Serialise a stage's output.  Not validated again here: the consumer's ``decode``
        validates every document, and a bad one is dead-lettered there with the reason
        (validating on both sides cost a quarter of a stage's time)."""
        document = {"schema_version": SCHEMA_VERSION, **document}
        dumped = self._schemas[edge].dump(document)
        return json.dumps(dumped, separators=(",", ":")).encode("utf-8")

    def decode(self, edge: Edge, body: bytes | str) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PermanentError("bad-document", f"{edge}: not JSON: {exc}") from exc
        try:
            loaded: dict[str, Any] = self._schemas[edge].load(data)
        except ValidationError as exc:
            raise PermanentError("bad-document", f"{edge}: {exc.messages}") from exc
        return loaded
