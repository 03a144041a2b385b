"""Crafted hostile messages (RELIABILITY.md inputs 24-31), built here, never stored as files.

Each function gives the raw bytes of one message; the table test, the property tests and
the fuzz target share them.  Sizes are the ones RELIABILITY.md names.
"""

from __future__ import annotations

import base64
import io
import zipfile

HEAD = (b"From: Ann <ann@example.org>\r\nTo: alice@corp.example.com\r\nSubject: s\r\n"
        b"Message-ID: <hostile@example.org>\r\nDate: Mon, 02 Nov 2026 09:30:00 +0000\r\n")
MIME = b"MIME-Version: 1.0\r\n"


def plain(body: bytes = b"hello\r\n", extra_headers: bytes = b"") -> bytes:
    return HEAD + extra_headers + b"\r\n" + body


def nested_multiparts(depth: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for level in range(depth):
        boundary = f"b{level}".encode()
        body = (b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n--'
                + boundary + b"\r\n" + body + b"\r\n--" + boundary + b"--\r\n")
    return HEAD + MIME + body


def nested_comments(count: int) -> bytes:
    sender = b"(" * count + b"x" + b")" * count + b" ann@example.org"
    return HEAD.replace(b"Ann <ann@example.org>", sender) + b"\r\nhi\r\n"


def huge_header(size: int) -> bytes:
    return HEAD + b"X-Filler: " + b"a" * size + b"\r\n\r\nhi\r\n"


def many_recipients(count: int) -> bytes:
    to = b", ".join(f"r{i}@example.org".encode() for i in range(count))
    return HEAD.replace(b"alice@corp.example.com", b"alice@corp.example.com, " + to) + \
        b"\r\nhi\r\n"


def many_parts(count: int) -> bytes:
    parts = b"".join(b"--bb\r\nContent-Type: text/plain\r\n\r\np\r\n" for _ in range(count))
    return (HEAD + MIME + b"Content-Type: multipart/mixed; boundary=bb\r\n\r\n" + parts
            + b"--bb--\r\n")


def with_attachment(filename: bytes, payload: bytes, content_type: bytes =
                    b"application/octet-stream", encoding: bytes = b"base64",
                    disposition: bytes | None = None) -> bytes:
    disposition = disposition or b'attachment; filename="' + filename + b'"'
    return (HEAD + MIME + b"Content-Type: multipart/mixed; boundary=bb\r\n\r\n"
            b"--bb\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--bb\r\nContent-Type: " + content_type + b"\r\nContent-Disposition: "
            + disposition + b"\r\nContent-Transfer-Encoding: " + encoding + b"\r\n\r\n"
            + payload + b"\r\n--bb--\r\n")


def zip_bomb(expanded_bytes: int = 50 * 1024 * 1024) -> bytes:
    """A small zip whose one member expands to ``expanded_bytes`` of zeros."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("zeros.bin", b"\0" * expanded_bytes)
    return buffer.getvalue()


def zip_bomb_mail(bomb: bytes) -> bytes:
    return with_attachment(b"bomb.zip", base64.encodebytes(bomb), b"application/zip")


def forward_envelope(forwarder: bytes, inner: bytes) -> bytes:
    return (b"From: " + forwarder + b"\r\nTo: forward@corp.example.com\r\nSubject: FW: x\r\n"
            b"Message-ID: <outer@corp.example.com>\r\n" + MIME
            + b"Content-Type: multipart/mixed; boundary=ff\r\n\r\n--ff\r\n"
            b"Content-Type: text/plain\r\n\r\nforwarded\r\n--ff\r\n"
            b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--ff--\r\n")
