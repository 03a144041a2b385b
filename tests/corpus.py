"""Where the team's message corpus is: ``MAILROUTE_CORPUS``, else the first ``shared/corpus``
beside the checkout or one of its parent folders (a git worktree lives one level deeper)."""

from __future__ import annotations

import os
from pathlib import Path


def corpus_folder() -> Path:
    if os.environ.get("MAILROUTE_CORPUS"):
        return Path(os.environ["MAILROUTE_CORPUS"])
    checkout = Path(__file__).resolve().parents[1]
    for folder in (checkout, *checkout.parents):
        candidate = folder.parent / "shared" / "corpus"
        if candidate.is_dir():
            return candidate
    return checkout.parent / "shared" / "corpus"
