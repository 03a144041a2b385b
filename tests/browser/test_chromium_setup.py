"""The browser tests' set-up without a browser: a missing Chromium fails, naming the fix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.browser import chromium


def test_missing_chromium_fails_naming_make_services(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(chromium, "CHROMIUM", tmp_path / "chromium")
    with pytest.raises(pytest.fail.Exception, match=r"chromium not installed: run `make "
                                                     r"services`"):
        chromium.require_chromium()


@pytest.mark.parametrize(("text", "value"), [("2445.1", 2445.1), ("1,234 emails", 1234.0),
                                             ("12.5/min", 12.5)])
def test_number_reads_the_first_number_of_a_cell(text: str, value: float) -> None:
    assert chromium.number(text) == value


def test_number_of_a_cell_without_one_is_nan() -> None:
    assert math.isnan(chromium.number("\u2013"))  # the page's en dash: no reading yet
