"""Reads a local Maildir (the embedded demo): the messages in ``new/`` are the new ones.

Takes a :class:`~shared.settings.MailboxSettings` of kind ``maildir`` (its ``path``); gives
:class:`MaildirSource`.  Each message's uid is its Maildir key (the file name before the
info part), there is no UIDVALIDITY, and ``received_at`` is the file's modification time.
:meth:`MaildirSource.after_confirm` takes a confirmed batch out of ``new/`` so it is not read
again: ``seen`` moves it to ``cur/`` with the S flag, ``keep`` to ``cur/`` without flags,
``delete`` removes it (``move`` is IMAP-only; the settings refuse it for a Maildir).
Fails with :class:`~ingest.errors.MailboxUnavailable` when the folder is not a Maildir or
cannot be read.
"""

from __future__ import annotations

import logging
import mailbox
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from ingest.errors import MailboxUnavailable
from ingest.source import Batch, FetchedMessage, byte_bounded
from shared.settings import MailboxSettings

log = logging.getLogger(__name__)


class MaildirSource:
    """One Maildir, opened for one poll."""

    def __init__(self, box: MailboxSettings) -> None:
        self._box = box
        self._path = Path(box.path or "")
        self._maildir: mailbox.Maildir | None = None
        self._files: dict[str, Path] = {}

    @property
    def uidvalidity(self) -> int | None:
        return None

    def has_news(self, uidvalidity: int | None, last_uid: int) -> bool:
        return True

    def __enter__(self) -> MaildirSource:
        try:
            self._maildir = mailbox.Maildir(self._path, factory=None, create=False)
        except (OSError, mailbox.Error) as exc:
            raise MailboxUnavailable(f"mailbox {self._box.name}: {exc}") from exc
        if not (self._path / "new").is_dir() or not (self._path / "cur").is_dir():
            raise MailboxUnavailable(f"mailbox {self._box.name}: {self._path} is not a Maildir")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._maildir = None
        self._files.clear()

    def batches(self, after_uid: int = 0) -> Iterator[Batch]:
        """Every message now in ``new/``, oldest first; ``after_uid`` has no meaning here."""
        entries = self._new_entries()
        for run in byte_bounded(entries, [size for _, _, _, size in entries],
                                max(1, self._box.batch_size), self._box.batch_bytes):
            messages = []
            for key, path, mtime, _ in run:
                try:
                    raw = path.read_bytes()
                except FileNotFoundError:
                    continue  # taken by another reader meanwhile
                except OSError as exc:
                    raise MailboxUnavailable(f"mailbox {self._box.name}: {exc}") from exc
                self._files[key] = path
                messages.append(FetchedMessage(
                    uid=key, raw=raw, received_at=datetime.fromtimestamp(mtime, UTC)))
            if messages:
                yield Batch(messages=messages)

    def _new_entries(self) -> list[tuple[str, Path, float, int]]:
        colon = self._colon()
        entries = []
        try:
            with os.scandir(self._path / "new") as listing:
                for entry in listing:
                    if entry.name.startswith(".") or not entry.is_file():
                        continue
                    key = entry.name.split(colon)[0]
                    stat = entry.stat()
                    entries.append((key, Path(entry.path), stat.st_mtime, stat.st_size))
        except OSError as exc:
            raise MailboxUnavailable(f"mailbox {self._box.name}: {exc}") from exc
        entries.sort(key=lambda item: (item[2], item[0]))
        return entries

    def after_confirm(self, batch: Batch) -> None:
        action = self._box.after
        colon = self._colon()
        for message in batch.messages:
            path = self._files.pop(message.uid, None)
            if path is None:
                continue
            try:
                if action == "delete":
                    path.unlink()
                else:
                    flags = "" if action == "keep" else "S"
                    os.rename(path, self._path / "cur" / f"{message.uid}{colon}2,{flags}")
            except FileNotFoundError:
                log.info("mailbox %s: message %s was gone before %s", self._box.name,
                         message.uid, action)
            except OSError as exc:
                raise MailboxUnavailable(
                    f"mailbox {self._box.name}: after-processing ({action}): {exc}") from exc

    def _colon(self) -> str:
        return getattr(self._maildir, "colon", ":") or ":"
