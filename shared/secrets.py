"""Credentials that never show: a redacting wrapper, and Fernet encryption at rest.

Takes a password or token (plain, or ``enc:<Fernet token>`` as written by ``mailroute secret
encrypt``) and the keys (``secrets.keys``, comma-separated, newest first, or one key per line
in ``secrets.key_file``); gives :class:`Secret`, whose ``repr``/``str``/format are ``***`` so a
log line, a traceback's locals or a settings repr cannot leak it (:meth:`Secret.reveal` is the
one way to the text), and :class:`Keyring` (``MultiFernet``: encrypts with the newest key,
decrypts with any, :meth:`Keyring.rotate` re-encrypts with the newest).
Fails with :class:`SecretError` (a value that cannot be decrypted, or no key), whose message
never includes the value.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

ENCRYPTED_PREFIX = "enc:"
REDACTED = "***"


class SecretError(ValueError):
    """A secret could not be decrypted (wrong or missing key, damaged value)."""


class Secret:
    """A password or token; shows as ``***`` everywhere except :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("a Secret holds text")
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def is_encrypted(self) -> bool:
        return self._value.startswith(ENCRYPTED_PREFIX)

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


def reveal(value: Secret | str | None) -> str:
    """The text of a Secret (or of a plain string, as tests pass); '' for None."""
    if value is None:
        return ""
    return value.reveal() if isinstance(value, Secret) else value


class Keyring:
    """The Fernet keys: the first encrypts, every one decrypts."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SecretError("no encryption key: set secrets.keys (MAILROUTE_SECRETS__KEYS) "
                              "or secrets.key_file")
        try:
            self._fernets = [Fernet(key.strip().encode()) for key in keys]
        except (ValueError, TypeError) as exc:
            raise SecretError("an encryption key is not a Fernet key (32 url-safe base64 "
                              "bytes; make one with `mailroute secret new-key`)") from exc
        self._multi = MultiFernet(self._fernets)

    @classmethod
    def load(cls, keys: Secret | None, key_file: str | None) -> Keyring:
        found = [k.strip() for k in reveal(keys).split(",") if k.strip()]
        if key_file:
            try:
                text = Path(key_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise SecretError(f"secrets.key_file: cannot read {key_file}: "
                                  f"{exc.strerror}") from None
            found += [line.strip() for line in text.splitlines()
                      if line.strip() and not line.startswith("#")]
        return cls(found)

    @staticmethod
    def new_key() -> str:
        return Fernet.generate_key().decode()

    def encrypt(self, plain: str) -> str:
        return ENCRYPTED_PREFIX + self._multi.encrypt(plain.encode()).decode()

    def decrypt(self, stored: str) -> str:
        if not stored.startswith(ENCRYPTED_PREFIX):
            return stored
        try:
            return self._multi.decrypt(stored[len(ENCRYPTED_PREFIX):].encode()).decode()
        except (InvalidToken, ValueError):
            raise SecretError("cannot decrypt: no configured key opens it, or the value is "
                              "damaged") from None

    def rotate(self, stored: str) -> str:
        """The same secret encrypted with the newest key."""
        if not stored.startswith(ENCRYPTED_PREFIX):
            return self.encrypt(stored)
        try:
            token = self._multi.rotate(stored[len(ENCRYPTED_PREFIX):].encode())
        except InvalidToken:
            raise SecretError("cannot rotate: no configured key opens the value") from None
        return ENCRYPTED_PREFIX + token.decode()
