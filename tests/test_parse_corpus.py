"""Every message of the shared corpus goes through parse_raw, as a direct and as a forward mail.

The only failure allowed out of parse_raw is PermanentError; every direct result must encode
with the parsed-edge Codec.  Expected-result files (.json, .xml, .list), notes and licences are
left out by name, and anything that does not start with a header line (Outlook .msg and TNEF
containers, decoded bodies) by its content.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from parse.extract import parse_raw
from shared.errors import PermanentError
from shared.schemas import Codec
from shared.settings import LimitSettings

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:[^\r\n]*\r?\n")
_NOT_MESSAGES = (".json", ".xml", ".list", ".md", ".html")


def looks_like_message(path: Path, data: bytes) -> bool:
    """A header line first (after a BOM, blank lines or an mbox "From " line)."""
    if path.suffix in _NOT_MESSAGES or path.name.upper().startswith(("COPYING", "LICEN")):
        return False
    head = data[:8192].removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"From "):
        head = head.split(b"\n", 1)[-1]
    return bool(_HEADER_LINE.match(head))


def corpus_messages() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return [path for path in sorted(CORPUS.rglob("*"))
            if path.is_file() and looks_like_message(path, path.read_bytes())]


MESSAGES = corpus_messages()
OUTCOMES: Counter[str] = Counter()


def source(kind: str) -> dict:
    now = datetime.now(UTC)
    return {"mailbox": "m", "mailbox_kind": kind, "folder": "INBOX", "uidvalidity": 1,
            "uid": "1", "received_at": now, "fetched_at": now}


def test_corpus_is_there() -> None:
    assert len(MESSAGES) > 600, f"corpus not found or shrunk under {CORPUS}"


@pytest.mark.parametrize("path", MESSAGES, ids=lambda path: str(path.relative_to(CORPUS)))
def test_corpus_message_parses_or_fails_permanently(path: Path) -> None:
    raw = path.read_bytes()
    codec = Codec()
    for kind in ("direct", "forward"):
        try:
            result = parse_raw(raw, kind, LimitSettings())
        except PermanentError as exc:
            OUTCOMES[f"{kind}:{exc.reason}"] += 1
            assert exc.reason != "unparseable" or kind == "forward", exc.detail
            continue
        OUTCOMES[f"{kind}:ok"] += 1
        assert result.emails and len(result.emails) == result.envelope["count"]
        for envelope, email in result.items():
            document = {"trace_id": "t", "source": source(kind), "envelope": envelope,
                        "email": email}
            decoded = codec.decode("parsed", codec.encode("parsed", document))
            assert decoded["email"]["dedup_key"] == email["dedup_key"]
            assert decoded["email"]["attachments"] == email["attachments"]


def test_corpus_outcome_summary() -> None:
    """Runs after the per-file tests (file order); prints and checks the totals."""
    if not OUTCOMES:
        pytest.skip("per-file tests not run in this session")
    print("\nparse corpus outcomes:", dict(sorted(OUTCOMES.items())))
    direct_ok = OUTCOMES["direct:ok"]
    direct_total = sum(count for key, count in OUTCOMES.items() if key.startswith("direct:"))
    assert direct_ok >= 0.99 * direct_total
    # SOURCES.md lists about 80 corpus messages carrying an attached message.
    assert OUTCOMES["forward:ok"] >= 80
