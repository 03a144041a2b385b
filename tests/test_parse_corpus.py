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


# -- the files SOURCES.md tags as forwarded are unwrapped --------------------------------------

_FORWARD_TAGS = re.compile(r"(FWD-ATTACH|MSG-ATTACH|TNEF|EML-as-octet|RESENT)(?![-\w])")
# Tagged files mailroute refuses on purpose, with the reason it gives.
REFUSED_ON_PURPOSE = {
    "flanker/enclosed-endless.eml": "too-many-parts",  # 3,041 parts, over limits.max_parts
}
# Tagged TNEF files that carry no message, only attachments: opened, nothing to unwrap.
TNEF_WITHOUT_ORIGINAL = {"mimekit/tnef/ukr.eml"}
FORWARD_OUTCOMES: Counter[str] = Counter()


def tagged_forwarded() -> dict[str, set[str]]:
    sources = CORPUS / "SOURCES.md"
    if not sources.is_file():
        return {}
    block = sources.read_text(encoding="utf-8").split("```")[1]
    tagged = {}
    for line in block.splitlines():
        fields = [field.strip() for field in line.split("|")]
        tags = set(_FORWARD_TAGS.findall(fields[1])) if len(fields) > 1 else set()
        if tags:
            tagged[fields[0]] = tags
    return tagged


TAGGED = tagged_forwarded()


@pytest.mark.parametrize("name", sorted(TAGGED))
def test_tagged_forwarded_file_is_unwrapped(name: str) -> None:
    raw = (CORPUS / name).read_bytes()
    if name in REFUSED_ON_PURPOSE:
        with pytest.raises(PermanentError) as caught:
            parse_raw(raw, "forward", LimitSettings())
        assert caught.value.reason == REFUSED_ON_PURPOSE[name]
        FORWARD_OUTCOMES["refused-on-purpose"] += 1
        return
    if "TNEF" in TAGGED[name]:
        [email] = parse_raw(raw, "direct", LimitSettings()).emails
        names = [a["filename"] for a in email["attachments"]]
        assert "winmail.dat" not in names or "tnef-rtf-body-not-decoded" in email["defects"]
        FORWARD_OUTCOMES["tnef-opened"] += 1
        if name in TNEF_WITHOUT_ORIGINAL:
            return
    result = parse_raw(raw, "forward", LimitSettings())
    assert result.envelope["kind"] in ("wrapped", "redirected")
    if "RESENT" in TAGGED[name]:
        assert result.envelope["kind"] == "redirected"
    FORWARD_OUTCOMES[f"unwrapped:{result.envelope['kind']}"] += 1
    FORWARD_OUTCOMES["inner-messages"] += len(result.emails)


def test_tagged_forwarded_summary() -> None:
    if not FORWARD_OUTCOMES:
        pytest.skip("per-file tests not run in this session")
    print(f"\ntagged forwarded files: {len(TAGGED)}; outcomes:", dict(sorted(
        FORWARD_OUTCOMES.items())))
    assert len(TAGGED) >= 60
    unwrapped = FORWARD_OUTCOMES["unwrapped:wrapped"] + FORWARD_OUTCOMES["unwrapped:redirected"]
    assert unwrapped == len(TAGGED) - len(REFUSED_ON_PURPOSE) - len(TNEF_WITHOUT_ORIGINAL)
