"""Headless Chromium for the browser tests: Debian's chromium driven through its chromedriver.

Takes the machine's ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (Debian's chromium and
chromium-driver, installed by ``make services``) and Selenium; gives :func:`chromium_session`
(a WebDriver with a fixed window size), :class:`Page` (waits on element text, screenshots) and
:func:`require_chromium`.  Selenium is handed the driver's path, so Selenium Manager never runs
and nothing is downloaded.  Fails the test (never skips it) when the browser, its driver or
Selenium is missing, naming ``make services`` or ``make venv``; a wait that times out fails
with what was awaited and the caller's diagnostics.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1440, 1000)
# Where `make screenshots` wants the PNGs (they always go under pytest's basetemp too).  Not a
# MAILROUTE_* name: the configuration loader would take that for a setting.
SCREENSHOT_DIR_ENV = "SCREENSHOT_DIR"
NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def require_chromium() -> None:
    """Fail with what to do when the browser, its driver or Selenium is not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run `make services` (it installs "
                    "Debian's chromium and chromium-driver for the browser tests)",
                    pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: run `make venv` (it is a dev extra)",
                    pytrace=False)


@contextmanager
def chromium_session() -> Iterator[Any]:
    """A headless Chromium WebDriver; quit at the end of the block."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium's DEBUG log holds every command's payload, the admin token typed into the
    # login form among them; the secret scan reads captured logs.
    selenium_log = logging.getLogger("selenium")
    level = selenium_log.level
    selenium_log.setLevel(logging.INFO)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    # An explicit driver path: Selenium Manager (which may download drivers) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        selenium_log.setLevel(level)


def number(text: str) -> float:
    """The first number in an element's text ("1,234", "12.5/min"); NaN when there is none."""
    found = NUMBER.search(text.replace("\u202f", "").replace("\xa0", ""))
    if found is None:
        return float("nan")
    return float(found.group(0).replace(",", ""))


class Page:
    """One browser tab on the operations page at ``base_url``."""

    def __init__(self, driver: Any, base_url: str, shots: list[Path],
                 diagnostics: Callable[[], str], secrets: Callable[[], set[str]]) -> None:
        self.driver = driver
        self.base_url = base_url.rstrip("/")
        self.shots = shots  # folders each screenshot is saved into
        self.diagnostics = diagnostics
        self.secrets = secrets

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def one(self, selector: str) -> Any:
        found = self.css(selector)
        assert found, f"no {selector} on {self.driver.current_url}"
        return found[0]

    def text(self, selector: str) -> str:
        return str(self.one(selector).text).strip()

    def page_name(self) -> str:
        return str(self.one("body").get_attribute("data-page"))

    def await_(self, condition: Callable[[], Any], what: str, timeout: float = 60,
               refresh: bool = False) -> Any:
        """Wait until ``condition()`` is truthy (reloading first each time if ``refresh``)."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
            TimeoutException,
            WebDriverException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        def check(_driver: Any) -> Any:
            if refresh:
                self.driver.refresh()
            try:
                return condition()
            except AssertionError:
                return False
            except WebDriverException as exc:
                # Chrome's own word for a stale element, when the document was replaced
                # between finding an element and using it: try again.
                if "does not belong to the document" in str(exc):
                    return False
                raise

        wait = WebDriverWait(self.driver, timeout, poll_frequency=0.25 if not refresh else 0.5,
                             ignored_exceptions=(NoSuchElementException,
                                                 StaleElementReferenceException))
        try:
            return wait.until(check)
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} on "
                                 f"{self.driver.current_url}\n{self.diagnostics()}") from None

    def follow(self, element: Any) -> None:
        """Click a link or button that loads a page, and wait until that page is there."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        old = self.one("html")
        element.click()
        gone = expected_conditions.staleness_of(old)

        def replaced(driver: Any) -> bool:
            try:
                return bool(gone(driver))
            except WebDriverException as exc:
                # Chrome's other word for a stale element (see await_)
                if "does not belong to the document" in str(exc):
                    return True
                raise

        WebDriverWait(self.driver, 30).until(replaced)
        self.await_(lambda: self.driver.execute_script("return document.readyState")
                    == "complete", "the page to load")

    def assert_no_secret(self) -> None:
        """No configured password or token anywhere in the page's source."""
        source = self.driver.page_source
        leaked = [len(s) for s in self.secrets() if s in source]
        assert not leaked, (f"{self.driver.current_url} shows a configured secret "
                            f"(lengths {leaked})")

    def screenshot(self, name: str) -> None:
        """Save the window as ``name``.png in every screenshot folder, after a secret check."""
        self.assert_no_secret()
        for folder in self.shots:
            folder.mkdir(parents=True, exist_ok=True)
            assert self.driver.save_screenshot(str(folder / f"{name}.png")), name
        # The page's source beside the first copy, so the whole-run secret scan reads it too.
        (self.shots[0] / f"{name}.html").write_text(self.driver.page_source)

    def post_from_page(self, path: str, fields: dict[str, str]) -> int:
        """POST a form to ``path`` by fetch() from the page (its cookies go along): the status."""
        status = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', credentials: 'same-origin',"
            " redirect: 'manual', body: new URLSearchParams(arguments[1])})"
            ".then(r => done(r.status), e => done(String(e)));",
            self.base_url + path, fields)
        assert isinstance(status, int), f"fetch {path} failed: {status}"
        return status
