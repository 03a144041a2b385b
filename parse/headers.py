"""Decoding of the few header values the parse stage uses, each parsed once and cheaply.

Takes raw header values as the ``compat32`` parser keeps them (folded, 8-bit bytes carried as
surrogate escapes) and gives plain text: RFC 2047 words decoded, addresses as
``{name, address}`` dicts, dates as aware datetimes, message ids without angle brackets.
Never raises on bad input: what cannot be decoded is replaced (U+FFFD) or dropped, and a
short defect string is appended to the ``defects`` list the caller passes in.
"""

from __future__ import annotations

import binascii
import re
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime

_FOLD = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")
_UNSAFE_TEXT = re.compile("[\x00\ud800-\udfff]")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_ENCODED_WORD = re.compile(r"=\?([^?]*?)\?([qQbB])\?(.*?)\?=")
_ITEM_SEPARATOR = re.compile("[,;]")
_DOMAIN = re.compile(r"[^\s@\[\]()<>\",;:\\]+")
# Comment nesting deeper than this is hostile (500 nested comments make getaddresses recurse
# until RecursionError) and never seen in real mail.
_MAX_COMMENT_DEPTH = 8
_MAX_ENCODED_TEXT = 16384


def unfold(value: str, keep_end: bool = False) -> str:
    """One logical line: folding line breaks removed, ends trimmed.  With ``keep_end`` only
    the blanks after the colon go and trailing blanks stay, as RFC 5322 reads an
    unstructured value (a subject)."""
    if "\n" in value or "\r" in value:
        value = _FOLD.sub("", value).replace("\r", "").replace("\n", "")
    return value.lstrip(" \t") if keep_end else value.strip()


def raw_text(value: str) -> str:
    """A raw header value with 8-bit bytes (surrogate escapes) decoded as UTF-8 or cp1252."""
    if not _UNSAFE_TEXT.search(value):
        return value
    return scrub(utf8_or_cp1252(value.encode("utf-8", "surrogateescape")))


def utf8_or_cp1252(data: bytes) -> str:
    """8-bit text of unknown charset: UTF-8 when it mostly is, else cp1252.

    UTF-8 with a few broken sequences (a value cut inside a character) is still UTF-8;
    cp1252 text almost never holds valid multi-byte UTF-8 sequences.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "replace")
    broken = text.count("\ufffd")
    decoded = len(text) - len(text.encode("ascii", "ignore")) - broken
    if decoded > broken:
        return text
    return data.decode("cp1252", "replace")


def scrub(text: str) -> str:
    """Text safe for JSON and PostgreSQL: no NUL, no lone surrogates."""
    if _UNSAFE_TEXT.search(text):
        return _UNSAFE_TEXT.sub("\ufffd", text)
    return text


def decode_bytes(data: bytes, charset: str | None, defects: list[str]) -> str:
    """Bytes to text in ``charset``; unknown charsets and bad bytes become U+FFFD + a defect."""
    if charset and "*" in charset:
        charset = charset.split("*", 1)[0]  # RFC 2231 section 5: charset*language
    if charset in ("us-ascii", "ascii"):
        charset = "utf-8"  # 8-bit text labelled ASCII is nearly always UTF-8; ASCII is a subset
    if charset:
        try:
            text = data.decode(charset, "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            add_defect(defects, f"unknown-charset:{charset[:40]}")
            return scrub(data.decode("utf-8", "replace"))
        if "\ufffd" in text and b"\xef\xbf\xbd" not in data:
            add_defect(defects, f"charset-decode-error:{charset[:40]}")
        return scrub(text)
    return scrub(utf8_or_cp1252(data))


def decode_words(value: str, defects: list[str], keep_end: bool = False) -> str:
    """An unstructured header value (Subject, a display name) with RFC 2047 words decoded;
    ``keep_end`` as for :func:`unfold`."""
    text = raw_text(unfold(value, keep_end))
    if "=?" not in text:
        return text
    if len(text) > _MAX_ENCODED_TEXT:
        # decode_header + make_header take seconds on a megabyte of encoded words.
        add_defect(defects, "encoded-text-truncated")
        text = text[:_MAX_ENCODED_TEXT]
    # Blanks between adjacent encoded words are dropped (RFC 2047 section 6.2); plain text
    # around them is kept as written.  (make_header instead adds a blank next to an encoded
    # us-ascii word and wherever plain text touches an encoded word.)
    pieces: list[tuple[str | bytes, str | None]] = []
    position = 0
    for match in _ENCODED_WORD.finditer(text):
        plain = text[position:match.start()]
        position = match.end()
        if plain and not (plain.isspace() and pieces and pieces[-1][1] is not None):
            pieces.append((plain, None))
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 section 5: *language
        data = _decode_word(match.group(2), match.group(3))
        if data is None:
            add_defect(defects, "bad-encoded-word")
            pieces.append((match.group(0), None))
            continue
        last = pieces[-1] if pieces else None
        if last is not None and last[1] == charset and isinstance(last[0], bytes):
            pieces[-1] = (last[0] + data, charset)  # a character split across two words
        else:
            pieces.append((data, charset))
    pieces.append((text[position:], None))
    out = [piece if isinstance(piece, str) else decode_bytes(piece, charset or None, defects)
           for piece, charset in pieces]
    return scrub("".join(out))


def _decode_word(encoding: str, encoded: str) -> bytes | None:
    """The bytes of one encoded word's text, or None when its base64 is broken."""
    data = encoded.encode("utf-8", "surrogateescape")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        return None


# An address item of ASCII atoms only: "addr@domain" or "Some Name <addr@domain>" (RFC 5322
# atext; dots allowed in the phrase as getaddresses allows them); see _plain_addresses.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_PLAIN_ITEM = re.compile(rf"[ \t]*(?:([{_ATEXT}. \t]*?)[ \t]*<([{_ATEXT}.]+@[{_ATEXT}.]+)>"
                         rf"|([{_ATEXT}.]+@[{_ATEXT}.]+))[ \t]*")
_NOT_PLAIN = re.compile(r'["()\\;:\[\]\r\n]')


def _scan_address_value(value: str) -> tuple[int, str] | None:
    """The number of ``@`` outside quotes and comments, and the value as getaddresses is to
    read it; None when the value is ambiguous.

    Ambiguous: unbalanced, or a comma-separated item with an ``@`` in front of its ``<...>``
    or with two of them (``ceo@example.com <eve@evil.test>``: is the sender ceo or eve?).

    The value to read has the comments taken out of every ``Name <addr>`` item: RFC 5322
    makes a comment part of neither the display name nor the address, but getaddresses folds
    comments -- even those inside the angle brackets -- into the name (``Pete(A wonderful
    \\) chap) <pete(his account)@silly.test>``).  A bare ``addr (Name)`` keeps its comment:
    that is the old way of naming a mailbox, and getaddresses reads it as the name.
    """
    if '"' not in value and "(" not in value and "\\" not in value and ")" not in value:
        if value.count("<") != value.count(">"):
            return None
        if "<" in value:
            for item in _ITEM_SEPARATOR.split(value):
                angle = item.find("<")
                if angle >= 0 and ("@" in item[:angle] or item.count("<") > 1):
                    return None
        return value.count("@"), value
    at_signs = 0
    item_at_signs = 0  # outside <...>, in the current comma-separated item
    item_angles = 0
    in_quote = False
    comment_depth = 0
    angle_depth = 0
    escaped = False
    strip = "(" in value
    items: list[str] = []  # with strip: the items read so far, as getaddresses is to read them
    kept: list[str] = []  # the current item as written
    stripped: list[str] = []  # the current item without its comments
    for char in value:
        in_comment = comment_depth > 0
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_quote:
            if char == '"':
                in_quote = False
        elif comment_depth:
            if char == "(":
                comment_depth += 1
                if comment_depth > _MAX_COMMENT_DEPTH:
                    return None
            elif char == ")":
                comment_depth -= 1
        elif char == '"':
            in_quote = True
        elif char == "(":
            comment_depth = 1
            in_comment = True
            if strip and not angle_depth:
                stripped.append(" ")  # a comment separates words like a blank
        elif char == ")":
            return None
        elif char == "<":
            angle_depth += 1
            item_angles += 1
            if angle_depth > 1 or item_at_signs or item_angles > 1:
                return None
        elif char == ">":
            angle_depth -= 1
            if angle_depth < 0:
                return None
        elif char == "@":
            at_signs += 1
            if not angle_depth:
                item_at_signs += 1
        elif char in ",;" and not angle_depth:
            if strip:
                items.append("".join(stripped if item_angles else kept) + char)
                kept, stripped = [], []
            item_at_signs = item_angles = 0
            continue
        if strip:
            kept.append(char)
            if not in_comment:
                stripped.append(char)
    if in_quote or comment_depth or angle_depth or escaped:
        return None
    if not strip:
        return at_signs, value
    items.append("".join(stripped if item_angles else kept))
    return at_signs, "".join(items)


def _clear_address(address: str) -> str | None:
    """``local@domain`` as written, or None when it is not one clear mailbox.  The case is
    kept (a record shows what the mail said); everything that compares addresses -- routing,
    party resolution, the fingerprint -- compares them lower-cased."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or "@" in local or '"' in local:
        return None
    if not _DOMAIN.fullmatch(domain) or local.startswith(".") or local.endswith("."):
        return None
    if any(char.isspace() for char in local):  # "Big Bug bb@bug.com": which words are it?
        return None
    return address


def _plain_addresses(value: str) -> list[tuple[str, str]] | None:
    """What ``getaddresses([value])`` gives (empty items left out) when every item is a plain
    ``addr@domain`` or ``Some Name <addr@domain>`` of ASCII atoms; None for anything else
    (quotes, comments, routes, groups, non-ASCII, ...), which getaddresses then parses.
    Most mail's address headers are plain, and the library's parser was half of parse's
    time on them.  Equal to getaddresses on the corpus and on generated values (tests)."""
    if _NOT_PLAIN.search(value):
        return None
    pairs = []
    for item in value.split(","):
        if not item.strip():
            continue
        match = _PLAIN_ITEM.fullmatch(item)
        if match is None:
            return None
        phrase, angle_address, bare_address = match.groups()
        if bare_address is not None:
            pairs.append(("", bare_address))
        else:
            pairs.append((" ".join(phrase.split()), angle_address))
    return pairs


def parse_addresses(name: str, values: list[str], defects: list[str]) -> list[dict[str, str]]:
    """Mailboxes of one address header; ambiguous ones (CVE-2023-27043) are dropped."""
    result: list[dict[str, str]] = []
    for raw_value in values:
        value = raw_text(unfold(raw_value))
        if not value:
            continue
        scanned = _scan_address_value(value)
        if scanned is None:
            add_defect(defects, f"ambiguous-address:{name}")
            continue
        at_signs, to_read = scanned
        pairs = _plain_addresses(value)
        if pairs is None:
            try:
                pairs = getaddresses([to_read])
            except Exception:  # RecursionError and friends on hostile values
                add_defect(defects, f"ambiguous-address:{name}")
                continue
            pairs = [(display, addr) for display, addr in pairs if display or addr]
        if sum(1 for _, addr in pairs if "@" in addr) != at_signs:
            add_defect(defects, f"ambiguous-address:{name}")
            continue
        for display, addr in pairs:
            address = _clear_address(addr.strip())
            if address is None:
                add_defect(defects, f"ambiguous-address:{name}" if "@" in addr
                     else f"invalid-address:{name}")
                continue
            result.append({"name": decode_words(display, defects), "address": address})
    return result


def parse_date(values: list[str], defects: list[str]) -> datetime | None:
    """The first Date value as an aware datetime (a naive one is taken as UTC), or None."""
    if not values:
        return None
    try:
        parsed = parsedate_to_datetime(raw_text(unfold(values[0])))
    except Exception:  # ValueError, TypeError, OverflowError, IndexError
        add_defect(defects, "bad-date")
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def parse_message_id(values: list[str]) -> str | None:
    """The first message id, without angle brackets; None when missing or empty."""
    if not values:
        return None
    value = raw_text(unfold(values[0]))
    match = _ANGLE_ID.search(value)
    candidate = match.group(1) if match else value
    candidate = "".join(candidate.split())
    return candidate or None


def parse_references(values: list[str]) -> list[str]:
    """All message ids of References, in order, without angle brackets."""
    ids: list[str] = []
    for raw_value in values:
        value = raw_text(unfold(raw_value))
        found = ["".join(item.split()) for item in _ANGLE_ID.findall(value)]
        ids.extend(item for item in found if item)
    return ids


def add_defect(defects: list[str], defect: str) -> None:
    if defect not in defects:
        defects.append(defect)


