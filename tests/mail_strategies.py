"""Hypothesis strategies for mail: header values, address lists, MIME trees, raw bytes.

Shared by the property tests and the fuzz target's fallback.  Messages are assembled by hand
(not by ``email.message``) so the strategies can produce what real senders produce and the
standard library would refuse to write: bad encodings, unknown charsets, broken boundaries.
"""

from __future__ import annotations

import base64
import quopri
from pathlib import Path

from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"

CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis", "x-unknown", "",
            "utf-7", "gb2312"]
ENCODINGS = ["7bit", "8bit", "base64", "quoted-printable", "binary", "x-uuencode", "bogus"]
TYPES = ["text/plain", "text/html", "application/pdf", "application/octet-stream",
         "image/png", "message/rfc822", "application/ms-tnef", "text/calendar"]

header_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
local = st.from_regex(r"[a-z0-9._%+\-]{1,20}", fullmatch=True)
domain = st.from_regex(r"[a-z0-9\-]{1,15}\.(org|com|example)", fullmatch=True)
address = st.builds(lambda lp, d: f"{lp}@{d}", local, domain)
mailbox_text = st.one_of(
    address,
    st.builds(lambda n, a: f'"{n}" <{a}>', header_text.map(lambda s: s.replace('"', "")),
              address),
    st.builds(lambda n, a: f"{n} <{a}>", header_text, address),
    header_text,  # anything at all
)
address_list = st.lists(mailbox_text, max_size=6).map(", ".join)


def encoded_word(text: str, charset: str, b64: bool) -> str:
    data = text.encode("utf-8", "surrogatepass")
    if b64:
        return f"=?{charset or 'utf-8'}?B?{base64.b64encode(data).decode()}?="
    return f"=?{charset or 'utf-8'}?Q?{quopri.encodestring(data, header=True).decode()}?="


header_value = st.one_of(
    header_text,
    st.builds(encoded_word, header_text, st.sampled_from(CHARSETS), st.booleans()),
)


def _encode_body(data: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.encodebytes(data)
    if encoding == "quoted-printable":
        return quopri.encodestring(data)
    return data


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    content_type = draw(st.sampled_from(TYPES))
    charset = draw(st.sampled_from(CHARSETS))
    encoding = draw(st.sampled_from(ENCODINGS))
    data = draw(st.binary(max_size=300) | st.text(max_size=200).map(
        lambda t: t.encode("utf-8", "surrogatepass")))
    headers = f"Content-Type: {content_type}"
    if charset:
        headers += f'; charset="{charset}"'
    if draw(st.booleans()):
        name = draw(header_text | st.sampled_from(["../../x", "a%2Fb", "\u202egpj.exe"]))
        headers += f'\r\nContent-Disposition: attachment; filename="{name}"'
    headers += f"\r\nContent-Transfer-Encoding: {encoding}"
    body = _encode_body(data, encoding)
    if draw(st.integers(0, 9)) == 0:  # damage it
        body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=20))
    return headers.encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body


def part(depth: int) -> st.SearchStrategy[bytes]:
    if depth <= 0:
        return leaf()
    return st.one_of(leaf(), multipart(depth))


@st.composite
def multipart(draw: st.DrawFn, depth: int = 3) -> bytes:
    boundary = draw(st.from_regex(r"[A-Za-z0-9'()+_,\-./:=? ]{1,30}", fullmatch=True))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest", "report"]))
    children = draw(st.lists(part(depth - 1), max_size=4))
    closing = draw(st.booleans())
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + child + b"\r\n" for child in children)
    if closing:
        body += b"--" + boundary.encode() + b"--\r\n"
    return (f'Content-Type: multipart/{subtype}; boundary="{boundary}"'.encode()
            + b"\r\n\r\n" + body)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    headers = {
        "From": draw(address_list),
        "To": draw(address_list),
        "Cc": draw(address_list),
        "Subject": draw(header_value),
        "Message-ID": draw(st.one_of(address.map(lambda a: f"<{a}>"), header_text)),
        "Date": draw(st.one_of(st.just("Mon, 02 Nov 2026 09:30:00 +0000"), header_text)),
    }
    lines = [f"{name}: {value}" for name, value in headers.items()
             if draw(st.integers(0, 7)) != 0]
    head = "\r\n".join(lines).encode("utf-8", "surrogatepass") + b"\r\nMIME-Version: 1.0\r\n"
    return head + draw(part(3))


@st.composite
def forward_envelope(draw: st.DrawFn, forwarders: list[str]) -> bytes:
    sender = draw(st.sampled_from(forwarders) | address)
    inner = draw(message())
    return (f"From: {sender}\r\nTo: forward@corp.example.com\r\nSubject: FW\r\n".encode()
            + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
            b"--zz\r\nContent-Type: text/plain\r\n\r\nfw\r\n--zz\r\n"
            b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--zz--\r\n")


def corpus_sample(limit: int = 40) -> list[bytes]:
    """Up to ``limit`` real messages from ../shared/corpus (none if it is not there)."""
    if not CORPUS.is_dir():
        return []
    paths = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix in (".eml", ""))
    step = max(1, len(paths) // limit)
    return [p.read_bytes() for p in paths[::step][:limit]]


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A real message with a few bytes replaced, inserted or cut."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.integers(0, 2))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if action == 0:
            data[at:at + len(chunk)] = chunk
        elif action == 1:
            data[at:at] = chunk
        else:
            del data[at:at + draw(st.integers(1, 200))]
    return bytes(data)
