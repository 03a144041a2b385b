"""Attachment content, stored once per SHA-256: in files (default) or in the database.

Takes content and its SHA-256; :class:`FilesystemBlobStore` writes ``<root>/ab/cd/<sha256>``
(a temporary file, fsync, atomic rename; an existing file is left alone, so a redelivery
writes nothing), :class:`DatabaseBlobStore` leaves the bytes to the ``attachment_contents``
row.  Files are written before the database commit, so a committed row always has its file;
a crash in between leaves an unreferenced file, never a reference without content.  File
names never reach the file system: :func:`sanitise_filename` only cleans the name stored as
metadata.  Fails with ``TransientError`` when the folder cannot be written.
"""

from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Protocol

from shared.errors import TransientError
from shared.settings import AttachmentSettings

MAX_FILENAME_CHARS = 200
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def sanitise_filename(name: str) -> str:
    """A display name with no path, control or bidi characters; 'attachment' if none is left."""
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf"))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip().lstrip(".").strip()
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: MAX_FILENAME_CHARS - len(ext) - 1] + dot + ext
                if dot and len(ext) <= 16 else name[:MAX_FILENAME_CHARS])
    return name or "attachment"


class BlobStore(Protocol):
    storage: str  # the attachment_contents.storage value

    def put(self, sha256: str, content: bytes) -> None: ...

    def get(self, sha256: str) -> bytes | None: ...


class DatabaseBlobStore:
    """Content stays in ``attachment_contents.content`` (the store writes it with the row)."""

    storage = "database"

    def put(self, sha256: str, content: bytes) -> None:
        return None

    def get(self, sha256: str) -> bytes | None:
        return None


class FilesystemBlobStore:
    storage = "filesystem"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path_for(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, sha256: str, content: bytes) -> None:
        target = self.path_for(sha256)
        if target.exists():
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(content)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temporary, target)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise TransientError(f"attachment store {self.root}: {exc.strerror or exc}") from exc

    def get(self, sha256: str) -> bytes | None:
        try:
            return self.path_for(sha256).read_bytes()
        except FileNotFoundError:
            return None


def blob_store_for(settings: AttachmentSettings) -> BlobStore:
    if settings.store == "database":
        return DatabaseBlobStore()
    return FilesystemBlobStore(settings.path)
