"""Who may act on the operations page, and proof that a form came from the page itself.

Takes the admin token (``web.admin_token``, a Secret, or None) and Flask's signed session;
gives the session key (:func:`session_key`), the token check (:func:`token_matches`,
constant time), the admin flag of the session and the CSRF token of each session
(:func:`csrf_token`, :func:`csrf_valid`), and :class:`LoginThrottle`, which refuses logins
from an address after repeated wrong tokens.

The CSRF defence is a random token per session kept in the signed session cookie and echoed in
every form (``csrf_token``), compared in constant time: the synchroniser-token pattern in a
few lines, rather than Flask-WTF and WTForms for forms that have at most three fields.  The
session cookie is also ``SameSite=Strict`` and ``HttpOnly`` (set by the app).

The signing key is derived from the admin token (HMAC-SHA256 with a fixed label): sessions
survive a restart and are valid on every ``mailroute web`` sharing the token, and changing the
token ends every session.  Without a token the key is random per process (there is nothing to
log in to; only the CSRF token of the login form is signed).  Fails nothing: a wrong token or
CSRF token simply does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, MutableMapping
from typing import Any

from shared.secrets import Secret

SESSION_KEY_LABEL = b"mailroute web session signing key v1"
CSRF_FIELD = "csrf_token"


def session_key(token: Secret | None) -> bytes:
    if token is None or not token:
        return secrets.token_bytes(32)
    return hmac.new(token.reveal().encode(), SESSION_KEY_LABEL, hashlib.sha256).digest()


def token_matches(configured: Secret | None, given: str) -> bool:
    if configured is None or not configured or not given:
        return False
    return hmac.compare_digest(configured.reveal().encode(), given.encode())


def csrf_token(session: MutableMapping[str, Any]) -> str:
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def csrf_valid(session: MutableMapping[str, Any], given: str | None) -> bool:
    expected = session.get(CSRF_FIELD)
    if not isinstance(expected, str) or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def is_admin(session: MutableMapping[str, Any]) -> bool:
    return session.get("admin") is True


class LoginThrottle:
    """At most ``max_failures`` wrong tokens per client address within ``window`` seconds;
    past that, that address's logins are refused (even with the right token) until the
    oldest failure leaves the window.  Kept in memory, for at most ``max_addresses``
    addresses (the longest quiet ones are forgotten first); a right token clears the count.
    """

    def __init__(self, max_failures: int = 5, window: float = 300.0,
                 max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures, self.window, self.max_addresses = max_failures, window, max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait_needed(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        with self._lock:
            failures = self._recent(address)
            if len(failures) < self.max_failures:
                return 0.0
            return max(0.0, failures[0] + self.window - self._clock())

    def failed(self, address: str) -> None:
        with self._lock:
            failures = self._recent(address)
            failures.append(self._clock())
            self._failures[address] = failures
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.get(address, deque())
        horizon = self._clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures
