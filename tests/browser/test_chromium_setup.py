"""The browser tests' set-up: a missing Chromium fails naming the fix; the installed one is used.

The last test starts the real headless Chromium with Selenium Manager made to fail, so a
Selenium that would look for (and maybe download) a driver or browser of its own fails it.
"""

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


def test_the_session_uses_the_installed_browser_without_selenium_manager(
        monkeypatch: pytest.MonkeyPatch) -> None:
    chromium.require_chromium()
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def refuse(*_args: object) -> None:
        raise AssertionError("Selenium Manager ran (it may download a driver or browser)")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)
    with chromium.chromium_session() as driver:
        driver.get("data:text/html,<p id=there>mailroute</p>")
        assert driver.find_element("id", "there").text == "mailroute"
        assert driver.capabilities["browserName"] in ("chrome", "chromium")
        assert driver.capabilities["chrome"]["chromedriverVersion"].split()[0] == \
            driver.capabilities["browserVersion"]
