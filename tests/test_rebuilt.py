"""Messages mailroute rebuilds itself (TNEF, Outlook .msg) give the same bytes every time, so
their attachment checksums and dedup keys hold across redeliveries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parse.extract import parse_raw
from parse.outlook import msg_to_mime
from shared.settings import LimitSettings
from tests.corpus import corpus_folder

MSG_FILES = sorted((corpus_folder() / "outlook-message-parser").glob("*.msg"))


def test_a_tnef_embedded_message_parses_to_the_same_document_twice() -> None:
    raw = (corpus_folder() / "mimekit" / "tnef" / "rich-text.eml").read_bytes()
    first, second = (parse_raw(raw, "direct", LimitSettings()) for _ in range(2))
    assert json.dumps(first.emails, sort_keys=True, default=str) == \
        json.dumps(second.emails, sort_keys=True, default=str)


@pytest.mark.parametrize("path", MSG_FILES, ids=lambda p: p.name)
def test_an_outlook_message_converts_to_the_same_bytes_twice(path: Path) -> None:
    data = path.read_bytes()
    try:
        first = msg_to_mime(data)
    except Exception as exc:  # a damaged container: the point here is only determinism
        pytest.skip(f"not convertible: {exc}")
    assert msg_to_mime(data) == first
