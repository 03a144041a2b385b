"""Forwarding rules in Exchange Online / Microsoft 365 mailboxes, through Microsoft Graph.

Takes a ``graph`` :class:`~shared.settings.RuleServerSettings` (tenant, app registration's
client id and secret, authority and Graph URLs, TLS and timeout); gives :class:`GraphBackend`,
the :class:`~ingest.forwarding_rules.RuleBackend` for ``mailroute rules``.  It gets an app-only
token with the OAuth2 client-credentials grant (cached until shortly before it expires; a 401
from Graph fetches a fresh one, once) and keeps one inbox message rule per user, named
``rule_name``: enabled, no conditions (every message), ``forwardAsAttachmentTo`` the forward
mailbox, ``stopProcessingRules`` false, first in sequence, beside the user's own rules, which
it never changes.  Graph documents the calls used here: mailFolder-list-messageRules,
mailFolder-post-messageRules, messageRule-update, messageRule-delete and the messageRule
resource; the token request is the Microsoft identity platform's client-credentials flow.

Fails with :class:`~ingest.forwarding_rules.RuleError`, whose message names the user, what was
being done and Graph's or the identity platform's answer (code and message), plus the likely
fix for a refused app (403: the MailboxSettings.ReadWrite application permission), an unknown
user (404), refused credentials and a network failure.  429 and 503 are retried a bounded
number of times, waiting as Retry-After says (capped).  The client secret and the token are
never put in a message or a log line.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from ingest.forwarding_rules import Inspection, RuleError, RuleTarget
from shared.logs import one_line
from shared.settings import RuleServerSettings

log = logging.getLogger(__name__)

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
# National clouds' Graph hosts, whose tokens are asked for with their own scope.
NATIONAL_GRAPH_HOSTS = ("graph.microsoft.us", "dod-graph.microsoft.us",
                        "microsoftgraph.chinacloudapi.cn")
RULE_SEQUENCE = 1          # first, so that a user's rule that stops processing cannot skip it
TOKEN_MARGIN = 120.0       # a cached token is renewed this many seconds before it expires
RETRIED_STATUSES = (429, 503, 504)
MAX_RETRIES = 3
MAX_RETRY_WAIT = 60.0      # seconds; a longer Retry-After is cut to this
# What a rule may carry besides forwardAsAttachmentTo and still be PATCHed into shape.
PATCHABLE_ACTIONS = {"forwardAsAttachmentTo", "stopProcessingRules"}
PERMISSION_HINT = ("the app registration needs the Microsoft Graph application permission "
                   "MailboxSettings.ReadWrite with admin consent (and, where an application "
                   "access policy limits the app, this mailbox in its scope)")


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float


class GraphBackend:
    """Message rules through Microsoft Graph for one ``graph`` rule server; close() when done."""

    def __init__(self, server: RuleServerSettings, *,
                 transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 max_retries: int = MAX_RETRIES, max_retry_wait: float = MAX_RETRY_WAIT) -> None:
        if server.kind != "graph" or not (server.tenant_id and server.client_id
                                          and server.client_secret):
            raise RuleError(f"rule server {server.name}: not a graph server with tenant_id, "
                            "client_id and client_secret")
        self.server = server
        self._clock = clock
        self._sleep = sleep
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        self._token: _Token | None = None
        self._graph_url = server.graph_url.rstrip("/")
        self._token_url = (f"{server.authority_url.rstrip('/')}/"
                           f"{quote(server.tenant_id, safe='')}/oauth2/v2.0/token")
        verify: ssl.SSLContext | bool = False
        if server.verify_tls:
            try:
                verify = ssl.create_default_context(cafile=server.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RuleError(f"rule server {server.name}: ca_file {server.ca_file}: "
                                f"{exc}") from None
        self._http = httpx.Client(timeout=server.timeout, verify=verify, transport=transport,
                                  follow_redirects=False,
                                  headers={"User-Agent": "mailroute", "Accept": "application/json"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GraphBackend:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- RuleBackend ------------------------------------------------------------------

    def inspect(self, target: RuleTarget) -> Inspection:
        ours = self._our_rules(target)
        if not ours:
            return Inspection("missing", f"no inbox rule named {self.server.rule_name!r}")
        if len(ours) > 1:
            return Inspection("differs", f"{len(ours)} inbox rules named "
                                         f"{self.server.rule_name!r}")
        problems = rule_problems(ours[0], target.forward_address)
        if problems:
            return Inspection("differs", "; ".join(problems))
        return Inspection("present", f"inbox rule {self.server.rule_name!r} forwards every "
                                     f"message as an attachment to {target.forward_address}")

    def install(self, target: RuleTarget) -> None:
        ours = sorted(self._our_rules(target),
                      key=lambda rule: len(rule_problems(rule, target.forward_address)))
        for extra in ours[1:]:
            self._delete_rule(target, extra)
        if not ours:
            self._request("POST", self._rules_path(target), target, "creating the inbox rule",
                          json=self._wanted_rule(target))
            log.info("graph rules: created %s for %s", self.server.rule_name,
                     one_line(target.login))
            return
        rule = ours[0]
        if not rule_problems(rule, target.forward_address):
            return
        if _patchable(rule):
            self._request("PATCH", self._rule_path(target, rule), target,
                          "updating the inbox rule",
                          json={"isEnabled": True, "actions": self._wanted_rule(target)["actions"]})
            log.info("graph rules: updated %s for %s", self.server.rule_name,
                     one_line(target.login))
            return
        # Conditions, exceptions or other actions: PATCH merges those, so start afresh.
        self._delete_rule(target, rule)
        self._request("POST", self._rules_path(target), target, "creating the inbox rule",
                      json=self._wanted_rule(target))
        log.info("graph rules: replaced %s for %s", self.server.rule_name,
                 one_line(target.login))

    def remove(self, target: RuleTarget) -> bool:
        ours = self._our_rules(target)
        for rule in ours:
            self._delete_rule(target, rule)
        if ours:
            log.info("graph rules: removed %s from %s", self.server.rule_name,
                     one_line(target.login))
        return bool(ours)

    # ---- rules ------------------------------------------------------------------------

    def _wanted_rule(self, target: RuleTarget) -> dict[str, Any]:
        return {
            "displayName": self.server.rule_name,
            "sequence": RULE_SEQUENCE,
            "isEnabled": True,
            "actions": {
                "forwardAsAttachmentTo": [{"emailAddress": {"address": target.forward_address}}],
                "stopProcessingRules": False,
            },
        }

    def _our_rules(self, target: RuleTarget) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = []
        url: str | None = self._rules_path(target)
        while url:
            page = self._json(self._request("GET", url, target, "reading the inbox rules"),
                              target, "reading the inbox rules")
            rules.extend(r for r in page.get("value", []) if isinstance(r, dict))
            url = page.get("@odata.nextLink")
        return [r for r in rules if r.get("displayName") == self.server.rule_name]

    def _delete_rule(self, target: RuleTarget, rule: dict[str, Any]) -> None:
        with contextlib.suppress(_Gone):  # deleted meanwhile: what was wanted
            self._request("DELETE", self._rule_path(target, rule), target,
                          "deleting the inbox rule")

    def _rules_path(self, target: RuleTarget) -> str:
        login = target.login
        if login.startswith("$"):  # Graph's documented form for such UPNs
            user = "/users('" + quote(login.replace("'", "''"), safe="@'") + "')"
        else:
            user = "/users/" + quote(login, safe="@")
        return f"{user}/mailFolders/inbox/messageRules"

    def _rule_path(self, target: RuleTarget, rule: dict[str, Any]) -> str:
        return f"{self._rules_path(target)}/{quote(str(rule.get('id', '')), safe='=')}"

    # ---- HTTP -------------------------------------------------------------------------

    def _request(self, method: str, path: str, target: RuleTarget, doing: str,
                 json: Any = None) -> httpx.Response:
        url = path if path.startswith(("https://", "http://")) else self._graph_url + path
        refreshed = False
        retries = 0
        while True:
            token = self._access_token()
            try:
                response = self._http.request(method, url, json=json,
                                              headers={"Authorization": f"Bearer {token}"})
            except httpx.HTTPError as exc:
                raise RuleError(self._scrub(
                    f"{target.login}: {doing}: cannot reach Microsoft Graph at "
                    f"{urlsplit(url).netloc}: {type(exc).__name__}: {exc}")) from None
            status = response.status_code
            if status == 401 and not refreshed:
                self._token = None
                refreshed = True
                continue
            if status in RETRIED_STATUSES and retries < self._max_retries:
                retries += 1
                wait = self._retry_wait(response, retries)
                log.warning("graph rules: %s answered %d while %s for %s; retry %d of %d in "
                            "%.1f s", urlsplit(url).netloc, status, doing,
                            one_line(target.login), retries, self._max_retries, wait)
                self._sleep(wait)
                continue
            if response.is_success:
                return response
            if status == 404 and method == "DELETE" and \
                    graph_error(response)[0] == "ErrorItemNotFound":
                raise _Gone()
            raise RuleError(self._scrub(self._explain(response, target, doing, retries)))

    def _explain(self, response: httpx.Response, target: RuleTarget, doing: str,
                 retries: int) -> str:
        status = response.status_code
        code, message = graph_error(response)
        answer = f"Graph answered {status} {code}: {message}"
        who = target.login
        if status == 403:
            return f"{who}: {doing}: access denied ({answer}); {PERMISSION_HINT}"
        if status == 404 and code not in ("ErrorItemNotFound",):
            return (f"{who}: {doing}: user {who!r} not found in tenant "
                    f"{self.server.tenant_id} or has no Exchange Online mailbox ({answer})")
        if status == 401:
            return (f"{who}: {doing}: Graph refused the app's access token, even a fresh one "
                    f"({answer})")
        if status in RETRIED_STATUSES:
            return (f"{who}: {doing}: Graph is still throttling or unavailable after "
                    f"{retries} retries ({answer})")
        return f"{who}: {doing}: {answer}"

    def _retry_wait(self, response: httpx.Response, retries: int) -> float:
        wait = float(2 ** (retries - 1))
        header = response.headers.get("Retry-After", "").strip()
        if header.isdigit():
            wait = float(header)
        elif header:
            try:
                when = email.utils.parsedate_to_datetime(header)
                wait = (when - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                pass
        return max(0.0, min(wait, self._max_retry_wait))

    def _json(self, response: httpx.Response, target: RuleTarget, doing: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RuleError(f"{target.login}: {doing}: Graph answered {response.status_code} "
                            "with something other than a JSON object")
        return body

    # ---- token ------------------------------------------------------------------------

    def _access_token(self) -> str:
        now = self._clock()
        if self._token is not None and now < self._token.renew_at:
            return self._token.value
        self._token = None
        server = self.server
        assert server.client_id and server.client_secret and server.tenant_id
        where = (f"rule server {server.name}: token request for tenant {server.tenant_id}, "
                 f"client {server.client_id}")
        try:
            response = self._http.post(self._token_url, data={
                "grant_type": "client_credentials", "client_id": server.client_id,
                "client_secret": server.client_secret.reveal(),
                "scope": token_scope(server.graph_url)})
        except httpx.HTTPError as exc:
            raise RuleError(self._scrub(
                f"{where}: cannot reach the Microsoft identity platform at "
                f"{urlsplit(self._token_url).netloc}: {type(exc).__name__}: {exc}")) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.status_code != 200 or not isinstance(body.get("access_token"), str):
            error = body.get("error", "no error code")
            description = str(body.get("error_description", "")).splitlines()
            hint = ""
            if error == "invalid_client":
                hint = " (check client_secret: wrong, or expired in the app registration)"
            elif error == "unauthorized_client":
                hint = " (check client_id and tenant_id)"
            raise RuleError(self._scrub(
                f"{where}: refused with {response.status_code} {error}: "
                f"{description[0] if description else 'no description'}{hint}"))
        try:
            lifetime = float(body.get("expires_in", 3599))
        except (TypeError, ValueError):
            lifetime = 3599.0
        margin = min(TOKEN_MARGIN, lifetime / 2)
        self._token = _Token(body["access_token"], now + lifetime - margin)
        return self._token.value

    def _scrub(self, text: str) -> str:
        """``text`` without the client secret or the token, as one line."""
        for secret in (self.server.client_secret.reveal() if self.server.client_secret else "",
                       self._token.value if self._token else ""):
            if secret:
                text = text.replace(secret, "***")
        return one_line(text)


def token_scope(graph_url: str) -> str:
    """``https://graph.microsoft.com/.default``, or a national cloud's own Graph scope."""
    host = (urlsplit(graph_url).hostname or "").lower()
    return f"https://{host}/.default" if host in NATIONAL_GRAPH_HOSTS else GRAPH_SCOPE


class _Gone(Exception):
    """A rule deleted meanwhile (404 on DELETE)."""


def graph_error(response: httpx.Response) -> tuple[str, str]:
    """Graph's ``{"error": {"code", "message"}}`` (or the identity platform's form)."""
    try:
        body = response.json()
    except ValueError:
        return "(no JSON error)", response.reason_phrase or "no message"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code", "(no code)")), str(error.get("message", "no message"))
    if isinstance(error, str):
        return error, str(body.get("error_description", "no message")).splitlines()[0]
    return "(no error code)", response.reason_phrase or "no message"


def _set(value: Any) -> bool:
    """A predicate or action that does something (Graph leaves unset ones null or empty)."""
    return value not in (None, False, [], {}, "")


def rule_problems(rule: dict[str, Any], forward_address: str) -> list[str]:
    """What keeps ``rule`` from forwarding every message as an attachment to the address."""
    problems = []
    if rule.get("isEnabled") is not True:
        problems.append("disabled")
    if rule.get("hasError"):
        problems.append("Exchange marks the rule in error")
    for part in ("conditions", "exceptions"):
        given = sorted(k for k, v in (rule.get(part) or {}).items()
                       if _set(v) and not k.startswith("@"))
        if given:
            problems.append(f"has {part} ({', '.join(given)})")
    actions = rule.get("actions") or {}
    wanted = {forward_address.lower()}
    found = {str((r.get("emailAddress") or {}).get("address", "")).lower()
             for r in actions.get("forwardAsAttachmentTo") or [] if isinstance(r, dict)}
    if not found:
        problems.append("does not forward as an attachment")
    elif found != wanted:
        problems.append(f"forwards as an attachment to {', '.join(sorted(found))} "
                        f"instead of {forward_address}")
    if actions.get("stopProcessingRules"):
        problems.append("stops the user's other rules")
    others = sorted(k for k, v in actions.items()
                    if k not in PATCHABLE_ACTIONS and _set(v) and not k.startswith("@"))
    if others:
        problems.append(f"also has actions {', '.join(others)}")
    return problems


def _patchable(rule: dict[str, Any]) -> bool:
    """Whether a PATCH of isEnabled and actions brings ``rule`` into shape."""
    actions = rule.get("actions") or {}
    return not rule.get("hasError") and not any(
        _set(v) for part in ("conditions", "exceptions")
        for k, v in (rule.get(part) or {}).items() if not k.startswith("@")) and not any(
        _set(v) for k, v in actions.items() if k not in PATCHABLE_ACTIONS
        and not k.startswith("@"))
