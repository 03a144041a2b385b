"""Where the team's message corpus is: ``MAILROUTE_CORPUS``, else the first ``shared/corpus``
beside the checkout or one of its parent folders (a git worktree lives one level deeper); and
the JSON data of documents made from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from parse.worker import ParseStage
from shared.schemas import Codec
from shared.settings import LimitSettings
from tests import documents


def corpus_folder() -> Path:
    if os.environ.get("MAILROUTE_CORPUS"):
        return Path(os.environ["MAILROUTE_CORPUS"])
    checkout = Path(__file__).resolve().parents[1]
    for folder in (checkout, *checkout.parents):
        candidate = folder.parent / "shared" / "corpus"
        if candidate.is_dir():
            return candidate
    return checkout.parent / "shared" / "corpus"


def corpus_documents() -> dict[str, list[dict[str, Any]]]:
    """JSON data of raw, parsed and routed documents made from up to 80 corpus messages."""
    folder = corpus_folder()
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file()
             and p.suffix.lower() in ("", ".eml", ".txt", ".msg")][:80] if folder.is_dir() else []
    parse = ParseStage(LimitSettings())
    codec = Codec()
    found: dict[str, list[dict[str, Any]]] = {"raw": [], "parsed": [], "routed": []}
    for number, path in enumerate(paths):
        raw = {**documents.raw(path.read_bytes()), "trace_id": f"t{number}"}
        found["raw"].append(json.loads(codec.encode("raw", raw)))
        try:
            outputs = parse.handle(codec.decode("raw", codec.encode("raw", raw)))
        except Exception:  # unparseable corpus messages are parse's tests' business
            continue
        for out in outputs:
            found["parsed"].append(json.loads(codec.encode("parsed", out.document)))
            routed = {**out.document, "deliveries": [{
                "principal_kind": "user", "principal": "alice", "address": "a@example.com",
                "mailbox": "alice", "method": "direct", "evidence": {"decided_by": "x"},
                "tracked": True, "untracked_reason": None, "rule": None}],
                "correlation": {"method": "none", "candidates": []},
                "records": {"case": None, "notes": ["n"], "principals": {}}}
            found["routed"].append(json.loads(codec.encode("routed", routed)))
    return found
