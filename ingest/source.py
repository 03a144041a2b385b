"""What every mailbox source gives the ingest worker: batches of fetched messages.

Takes nothing; gives :class:`FetchedMessage`, :class:`Batch` and the :class:`MailSource`
protocol that ``imap_source``, ``pop3_source`` and ``maildir_source`` implement.
:meth:`MailSource.has_news` is the cheap check before fetching (IMAP ``STATUS``).  A source
is opened as a context manager; :meth:`MailSource.batches` yields batches lazily (the next
one is fetched only when asked for), and :meth:`MailSource.after_confirm` applies the mailbox's
after-processing action (keep, seen, move, delete) to one batch.  The worker calls it only
after the batch is confirmed by the broker and the cursor is saved.  :func:`byte_bounded` cuts
what a source is to fetch into batches, by count and by bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, TypeVar

Key = TypeVar("Key")


@dataclass(frozen=True)
class FetchedMessage:
    uid: str
    raw: bytes
    received_at: datetime  # aware


@dataclass(frozen=True)
class Batch:
    messages: list[FetchedMessage]
    # For IMAP: the folder's UIDVALIDITY and the highest UID in the batch (the cursor to save
    # once it is confirmed).  A Maildir has no cursor: both None.
    uidvalidity: int | None = None
    last_uid: int | None = None


class MailSource(Protocol):
    @property
    def uidvalidity(self) -> int | None: ...

    def __enter__(self) -> MailSource: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def has_news(self, uidvalidity: int | None, last_uid: int) -> bool: ...

    def batches(self, after_uid: int) -> Iterator[Batch]: ...

    def after_confirm(self, batch: Batch) -> None: ...


def byte_bounded(keys: Sequence[Key], sizes: Sequence[int], count: int,
                 max_bytes: int) -> list[list[Key]]:
    """``keys`` in order, cut into runs of at most ``count`` keys and, unless a run is a single
    key, at most ``max_bytes`` by ``sizes`` (each key's size, or a bound on it)."""
    runs: list[list[Key]] = []
    run: list[Key] = []
    held = 0
    for key, size in zip(keys, sizes, strict=True):
        if run and (len(run) >= count or held + size > max_bytes):
            runs.append(run)
            run, held = [], 0
        run.append(key)
        held += size
    if run:
        runs.append(run)
    return runs
