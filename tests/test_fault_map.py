"""tests/faults/FAULTS.md names a test for each of RELIABILITY.md's 34 faults, and they exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = 34


def test_every_fault_has_tests_that_exist() -> None:
    rows = [line for line in (REPO / "tests/faults/FAULTS.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    numbers = [int(row.split("|")[1]) for row in rows]
    assert numbers == list(range(1, FAULTS + 1))
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row)
        assert named, row
        for path, test in named:
            source = (REPO / path).read_text()
            assert not test or re.search(rf"^def {test}\(", source, re.M), \
                f"fault {row.split('|')[1].strip()}: {path}::{test} does not exist"
