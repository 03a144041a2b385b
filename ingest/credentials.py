"""How ingest logs in to a mailbox: its own password, a master login, or an OAuth2 token.

Takes a :class:`~shared.settings.MailboxSettings` and its
:class:`~shared.settings.ServerProfile`; gives a :class:`Login` plan: ``plain`` (the mailbox's
username and password), ``master`` (Dovecot-style ``user*master`` with the master password),
``authzid`` (SASL PLAIN: authenticate as the master user, authorised as the mailbox's user)
or ``xoauth2`` (the mailbox's username and a bearer token).  Tokens come from a
:class:`TokenSource` (a command or a file; its output is the token, or JSON with
``access_token`` and ``expires_in``), cached until shortly before they expire and fetched
again on :meth:`TokenSource.token` with ``refresh=True``.  Every password and token is a
:class:`~shared.secrets.Secret`.
Fails with :class:`~ingest.errors.MailboxUnavailable` when a token cannot be obtained (the
command failed, the file is missing); the messages never hold the token.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import MailboxUnavailable
from shared.secrets import Secret
from shared.settings import MailboxSettings, ServerProfile

TOKEN_MARGIN_S = 60.0
DEFAULT_TOKEN_LIFETIME_S = 3000.0


@dataclass(frozen=True)
class Login:
    method: str  # "plain" | "master" | "authzid" | "xoauth2"
    user: str  # the mailbox's user (the authorization identity for "authzid")
    login_name: str  # what goes on the wire as the authentication identity
    password: Secret | None = None
    tokens: TokenSource | None = None


class TokenSource:
    """OAuth2 access tokens for one user from a command or a file, cached until near expiry."""

    def __init__(self, user: str, command: str | None, file: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._user = user
        self._command = command
        self._file = file
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Secret | None = None
        self._expires = 0.0
        self.fetches = 0

    def token(self, refresh: bool = False) -> Secret:
        with self._lock:
            if refresh or self._token is None or self._clock() >= self._expires:
                self._token, lifetime = self._fetch()
                self.fetches += 1
                self._expires = self._clock() + max(lifetime - TOKEN_MARGIN_S, 1.0)
            return self._token

    def _fetch(self) -> tuple[Secret, float]:
        if self._command:
            args = [part.replace("{user}", self._user) for part in shlex.split(self._command)]
            try:
                result = subprocess.run(args, capture_output=True, timeout=60, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise MailboxUnavailable(f"oauth2 token command for {self._user!r} did not run: "
                                         f"{type(exc).__name__}") from None
            if result.returncode != 0:
                raise MailboxUnavailable(f"oauth2 token command for {self._user!r} exited with "
                                         f"status {result.returncode}")
            text = result.stdout.decode(errors="replace")
        else:
            try:
                text = Path(self._file or "").read_text(encoding="utf-8")
            except OSError as exc:
                raise MailboxUnavailable(f"oauth2 token file {self._file}: {exc.strerror}") \
                    from None
        return _parse_token(text, self._user)


def _parse_token(text: str, user: str) -> tuple[Secret, float]:
    text = text.strip()
    lifetime = DEFAULT_TOKEN_LIFETIME_S
    if text.startswith("{"):
        try:
            data = json.loads(text)
            token = str(data["access_token"])
            lifetime = float(data.get("expires_in", lifetime))
        except (ValueError, KeyError, TypeError):
            raise MailboxUnavailable(f"oauth2 token for {user!r}: JSON without access_token") \
                from None
    else:
        token = text
    if not token:
        raise MailboxUnavailable(f"oauth2 token for {user!r} is empty")
    return Secret(token), lifetime


class Credentials:
    """The Login plan per mailbox; token sources live as long as this object (one process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenSource] = {}

    def login_for(self, box: MailboxSettings, profile: ServerProfile) -> Login:
        user = box.username or ""
        if profile.auth == "xoauth2":
            return Login("xoauth2", user, user, tokens=self._token_source(box, profile))
        if profile.master_user:
            if profile.master_mode == "authzid":
                return Login("authzid", user, profile.master_user, profile.master_password)
            return Login("master", user, f"{user}{profile.master_separator}"
                         f"{profile.master_user}", profile.master_password)
        password = box.password if isinstance(box.password, Secret) or box.password is None \
            else Secret(box.password)
        return Login("plain", user, user, password)

    def _token_source(self, box: MailboxSettings, profile: ServerProfile) -> TokenSource:
        with self._lock:
            source = self._tokens.get(box.name)
            if source is None:
                command = box.oauth2_token_command or profile.oauth2_token_command
                file = box.oauth2_token_file or profile.oauth2_token_file
                source = TokenSource(box.username or "", command if not box.oauth2_token_file
                                     else None, file)
                self._tokens[box.name] = source
            return source


def xoauth2_string(user: str, token: Secret) -> bytes:
    """The SASL XOAUTH2 initial response (before base64)."""
    return f"user={user}\x01auth=Bearer {token.reveal()}\x01\x01".encode()
