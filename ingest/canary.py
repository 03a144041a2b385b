"""Canary checks: a marked test message to each forwarding user, expected in the forward mailbox.

Takes the settings (``canaries``: interval, deadline, delivery_url, sender; every user and queue
with ``forward``), a :class:`~persist.canaries.CanaryStore` and the process's
:class:`~shared.metrics.Metrics`; gives :class:`CanaryService`:

- :meth:`~CanaryService.send_due` (each round) and :meth:`~CanaryService.send_now` (the CLI)
  record a canary per principal *before* it leaves, then hand it to the users' mail server
  (``smtp://``, ``smtps://`` or ``lmtp://`` at ``delivery_url``; SMTP over TLS whenever the
  server offers it, its certificate checked, and logged in with ``username``/``password``
  only over TLS: :class:`Handover`) addressed to the user, so the user's server-side rule sees
  it like any incoming mail.  The schedule is in the database:
  of several ``worker ingest`` processes only one sends each principal's canary per interval.
- :meth:`~CanaryService.check` turns canaries past their deadline into ``missing``, raising the
  user's alert: an ERROR log line starting ``ALERT``, ``mailroute_mailbox_alerts_total
  {mailbox=<user>,kind="canary"}`` and ``mailroute_canary_missing{principal}`` = 1 until a
  later canary arrives (persist marks arrivals: ``persist.worker``).
- :meth:`~CanaryService.run` does both on a schedule until stopped (a thread of ``worker
  ingest``, so also of ``mailroute run``, when ``canaries.enabled``).

A canary carries ``X-Mailroute-Canary: <id>`` (``secrets.token_urlsafe(16)``: unguessable, so a
forged one is dead-lettered as ``unknown-canary``) and no ``Auto-Submitted`` header: the forward
check (``route.forwarding.loop_reason``) refuses forwarded mail marked auto-submitted as a mail
loop, and servers' rules (Exchange inbox rules, Sieve ``vacation``) skip such mail, so a marked
canary would test something other than what real mail meets.

A send that fails is recorded as ``failed`` with the reason, alerted and counted in
``mailroute_canary_failed_total``, never lost; a database or server outage in the loop is
logged and tried again next tick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from urllib.parse import urlsplit

from persist.canaries import Canary, CanaryStore, CanaryTarget, PrincipalCanaries, PrincipalKey
from route.canary import CANARY_HEADER
from shared.metrics import Metrics
from shared.secrets import Secret
from shared.settings import CanarySettings, ConfigError, Settings

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 30.0
DEFAULT_PORTS = {"smtp": 25, "smtps": 465, "lmtp": 24}
KEEP_CANARIES = timedelta(days=7)
PRUNE_EVERY_S = 3600.0


def new_canary_id() -> str:
    return secrets.token_urlsafe(16)


def canary_targets(settings: Settings, only: frozenset[str] = frozenset()) -> list[CanaryTarget]:
    """Every user and queue whose mail comes through a forward mailbox (those in ``only``)."""
    principals = [("user", p) for p in settings.users if p.forward] + \
        [("queue", p) for p in settings.queues if p.forward]
    unknown = only - {p.name for _, p in principals}
    if unknown:
        raise ConfigError(f"no user or queue with a forward mailbox named "
                          f"{', '.join(sorted(unknown))}")
    return [CanaryTarget(kind, p.name, p.address, p.forward or "")
            for kind, p in principals if not only or p.name in only]


def build_canary(canary: Canary, sender: str) -> bytes:
    """The test message for one canary, as a user's mailbox would receive it."""
    message = EmailMessage()
    message["From"] = f"mailroute canary <{sender}>"
    message["To"] = canary.address
    message["Subject"] = f"mailroute canary {canary.id}"
    message["Date"] = format_datetime(canary.sent_at)
    message["Message-ID"] = f"<canary.{canary.id}@{sender.rpartition('@')[2] or 'localhost'}>"
    message[CANARY_HEADER] = canary.id
    within = int((canary.deadline_at - canary.sent_at).total_seconds())
    message.set_content(
        "This is a canary from mailroute: a test message that checks that this mailbox's\n"
        "forwarding rule still forwards incoming mail to the forward mailbox.\n"
        "It needs no action and never becomes a record.\n\n"
        f"Sent {canary.sent_at.isoformat(timespec='seconds')} to {canary.principal_kind} "
        f"{canary.principal}; expected in the forward mailbox within {within} s.\n")
    return message.as_bytes(policy=SMTP)


class Handover:
    """Hands messages to the users' mail server over SMTP, SMTPS or LMTP: one connection per
    round, one transaction per canary (so one refused recipient fails only its canary).

    SMTP uses TLS whenever the server offers it (STARTTLS) and SMTPS always; the server's
    certificate is checked (``ca_file``, else the system's CAs), and a check that fails fails
    the round, never falls back to plain text.  With ``username`` it logs in, only over TLS.
    """

    def __init__(self, url: str, timeout: float = SEND_TIMEOUT_S, *,
                 ca_file: str | None = None, username: str | None = None,
                 password: Secret | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(f"canaries.delivery_url: {url!r} is not smtp://, smtps:// or "
                              "lmtp://host:port")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or DEFAULT_PORTS[parts.scheme]
        self.timeout = timeout
        self.ca_file = ca_file
        self.login = (username, password) if username is not None and password else None

    @classmethod
    def from_settings(cls, canaries: CanarySettings) -> Handover:
        if not canaries.delivery_url:
            raise ConfigError("canaries.delivery_url: not set; canaries need the users' "
                              "mail server (smtp://, smtps:// or lmtp://host:port)")
        return cls(canaries.delivery_url, ca_file=canaries.ca_file,
                   username=canaries.username, password=canaries.password)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def _connect(self) -> smtplib.SMTP:
        if self.scheme == "lmtp":
            lmtp = smtplib.LMTP(self.host, self.port)
            if lmtp.sock is not None:
                lmtp.sock.settimeout(self.timeout)
            return lmtp
        context = ssl.create_default_context(cafile=self.ca_file)
        client = (smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
                  if self.scheme == "smtps" else
                  smtplib.SMTP(self.host, self.port, timeout=self.timeout))
        try:
            client.ehlo_or_helo_if_needed()
            if self.scheme == "smtp" and client.has_extn("starttls"):
                client.starttls(context=context)
                client.ehlo()
            if self.login is not None:
                if not isinstance(client.sock, ssl.SSLSocket):
                    raise smtplib.SMTPNotSupportedError(
                        "the server offers no STARTTLS, and the login is never sent in "
                        "plain text")
                username, password = self.login
                client.login(username, password.reveal())
        except BaseException:
            client.close()
            raise
        return client

    def send(self, sender: str, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """Each (recipient, message) handed over: None, or why it was not."""
        if not messages:
            return []
        try:
            client = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            return [f"{self} refused the login: {_describe(exc)}"] * len(messages)
        except (OSError, smtplib.SMTPException) as exc:
            return [f"cannot reach {self}: {_describe(exc)}"] * len(messages)
        results: list[str | None] = []
        try:
            for recipient, raw in messages:
                try:
                    client.sendmail(sender, [recipient], raw)
                    results.append(None)
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused,
                        smtplib.SMTPDataError) as exc:
                    results.append(f"{self} refused it: {_describe(exc)}")
                    _reset(client)
                except (OSError, smtplib.SMTPException) as exc:
                    failed = f"{self} failed: {_describe(exc)}"
                    results += [failed] * (len(messages) - len(results))
                    break
        finally:
            _quit(client)
        return results


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{rcpt}: {code} {reply.decode(errors='replace')}"
                         for rcpt, (code, reply) in exc.recipients.items())
    if isinstance(exc, smtplib.SMTPResponseException):
        error = exc.smtp_error
        text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
        return f"{exc.smtp_code} {text}"
    return f"{type(exc).__name__}: {exc}"


def _reset(client: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError, smtplib.SMTPException):
        client.rset()


def _quit(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()


def describe_principal(kind: str, name: str) -> str:
    return f"{kind} {name}"


class CanaryService:
    """Sends canaries, watches for the late ones, keeps the metrics; see the module text."""

    def __init__(self, settings: Settings, store: CanaryStore, metrics: Metrics | None = None,
                 handover: Handover | None = None,
                 new_id: Callable[[], str] = new_canary_id) -> None:
        self._all_settings = settings
        self._settings = settings.canaries
        self._store = store
        self._metrics = metrics
        self._targets = canary_targets(settings)
        self._handover = handover
        self._new_id = new_id
        self._states: dict[PrincipalKey, str] = {}
        self._scheduled = False
        self._pruned_at = 0.0

    def _sender(self) -> Handover:
        if self._handover is None:
            self._handover = Handover.from_settings(self._settings)
        return self._handover

    # ---- sending ------------------------------------------------------------------------

    def send_due(self) -> list[Canary]:
        """This round's canaries: those of the principals due (claimed by this process)."""
        if not self._scheduled:
            self._store.schedule(self._targets)
            self._scheduled = True
        return self._send(self._targets, force=False)

    def send_now(self, only: frozenset[str] = frozenset()) -> list[Canary]:
        """A canary to every forwarding principal (those named in ``only``) now, due or not;
        ``ConfigError`` names any in ``only`` that does not forward."""
        return self._send(canary_targets(self._all_settings, only), force=True)

    def _send(self, targets: Sequence[CanaryTarget], force: bool) -> list[Canary]:
        handover = self._sender()
        canaries = self._store.start_round(targets, self._settings.interval,
                                           self._settings.deadline, self._new_id, force=force)
        if not canaries:
            return []
        results = handover.send(self._settings.sender, [
            (canary.address, build_canary(canary, self._settings.sender))
            for canary in canaries])
        sent = []
        failed: dict[str, list[str]] = {}  # who, by error: one line for a server outage
        for canary, error in zip(canaries, results, strict=True):
            who = describe_principal(canary.principal_kind, canary.principal)
            if error is None:
                self._store.mark_sent(canary.id)
                sent.append(_with(canary, outcome="sent"))
                self._count("canary_sent", canary.principal)
                log.info("canary %s sent to %s <%s>", canary.id, who, canary.address)
            else:
                self._store.mark_failed(canary.id, error)
                sent.append(_with(canary, outcome="failed", detail=error))
                self._count("canary_failed", canary.principal)
                failed.setdefault(error, []).append(who)
        for error, whom in failed.items():
            if len(whom) == 1:
                log.error("ALERT canary for %s could not be sent: %s", whom[0], error)
            else:
                log.error("ALERT canaries for %d users/queues could not be sent: %s (%s%s)",
                          len(whom), error, ", ".join(whom[:10]),
                          ", ..." if len(whom) > 10 else "")
        return sent

    def _count(self, metric: str, principal: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, metric).labels(principal=principal).inc()

    # ---- watching -----------------------------------------------------------------------

    def check(self) -> dict[PrincipalKey, PrincipalCanaries]:
        """Alert on the canaries whose deadline passed unseen; set the gauges; gives the
        state of every forwarding principal."""
        for canary in self._store.expire():
            who = describe_principal(canary.principal_kind, canary.principal)
            if canary.outcome == "missing":
                log.error("ALERT canary for %s not seen in the forward mailbox %s within "
                          "%.0f s: check the %s's forwarding rule (`mailroute rules check "
                          "--user %s`)", who, canary.forward_mailbox, self._settings.deadline,
                          canary.principal_kind, canary.principal)
                if self._metrics is not None:
                    self._metrics.mailbox_alerts.labels(mailbox=canary.principal,
                                                        kind="canary").inc()
            else:
                log.error("ALERT canary for %s was not sent: %s", who, canary.detail)
                self._count("canary_failed", canary.principal)
        states = self._store.states([t.key for t in self._targets])
        for key, state in states.items():
            previous = self._states.get(key)
            if previous in ("missing", "failed") and state.state == "ok":
                log.info("canary for %s arrived again: its alert is cleared",
                         describe_principal(*key))
            self._states[key] = state.state
            if self._metrics is not None:
                self._metrics.canary_missing.labels(principal=key[1]).set(
                    1 if state.state == "missing" else 0)
        return states

    def run(self, stop: threading.Event, clock: Callable[[], float] | None = None) -> None:
        """Send each round and watch the deadlines until ``stop`` is set."""
        now = clock or time.monotonic
        tick = tick_seconds(self._settings.interval, self._settings.deadline)
        log.info("canaries: %d forwarding user(s)/queue(s), one every %.0f s each, "
                 "deadline %.0f s, via %s", len(self._targets), self._settings.interval,
                 self._settings.deadline, self._sender())
        while not stop.is_set():
            try:
                self.send_due()
                self.check()
                if now() - self._pruned_at >= PRUNE_EVERY_S:
                    self._store.prune(max(KEEP_CANARIES, timedelta(
                        seconds=10 * self._settings.interval)))
                    self._pruned_at = now()
            except Exception as exc:  # the database or the mail server may be away a while
                log.error("canaries: %s: %s; trying again", type(exc).__name__, exc)
                stop.wait(min(5.0, max(tick, 1.0)))
                continue
            stop.wait(tick)


def tick_seconds(interval: float, deadline: float) -> float:
    """How often to look for due principals and late canaries: a tenth of the shorter of
    interval and deadline, between 0.05 and 10 s (a canary is never 10% later than due)."""
    return max(0.05, min(10.0, min(interval, deadline) / 10))


def _with(canary: Canary, **changes: object) -> Canary:
    return dataclasses.replace(canary, **changes)  # type: ignore[arg-type]


def format_time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"
