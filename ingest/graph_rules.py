"""Forwarding rules in Exchange Online / Microsoft 365 mailboxes, through Microsoft Graph.

Takes a ``graph`` :class:`~shared.settings.RuleServerSettings` (tenant, app registration's
client id and secret, authority and Graph URLs, TLS and timeout); gives :class:`GraphBackend`,
the :class:`~ingest.forwarding_rules.RuleBackend` for ``mailroute rules``.  It gets an app-only
token with the OAuth2 client-credentials grant (cached until shortly before it expires; a 401
from Graph fetches a fresh one, once) and keeps one inbox message rule per user, named
``rule_name``: enabled, no conditions (every message), ``forwardAsAttachmentTo`` the forward
mailbox, ``stopProcessingRules`` false, first in sequence, beside the user's own rules, which
it never changes.

With canaries on (``RuleTarget.canary_sender``) it keeps a second one, ``rule_name`` +
``-canaries``, right after the first in sequence: conditions ``headerContains``
``X-Mailroute-Canary`` and ``fromAddresses`` the canary sender (both must hold, as all of an
Outlook rule's conditions must), actions ``markAsRead``, ``delete`` and
``stopProcessingRules``.  The forward rule, first, has already forwarded the canary; this one
keeps it out of the inbox and away from the user's own rules.  ``delete`` moves it to Deleted
Items; ``permanentDelete`` (documented as not saved to Deleted Items) is not used, so that a
message that only looks like a canary (someone else's mail with that From and the header,
forwarded like any other) stays where the user can get it back.  ``inspect``
says ``present`` only when both rules are right; a missing, changed or misplaced canary rule
``differs``.  With canaries off, a canary rule left from before also ``differs`` (as a Sieve
script with the canary part does) and ``install`` deletes it.  ``remove`` deletes both.

Graph documents the calls used here: mailFolder-list-messageRules,
mailFolder-post-messageRules, messageRule-update, messageRule-delete and the messageRule,
messageRulePredicates and messageRuleActions resources; the token request is the Microsoft
identity platform's client-credentials flow.

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
from route.canary import CANARY_HEADER
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
CANARY_RULE_SUFFIX = "-canaries"   # the canary rule's displayName is rule_name + this
# What the canary rule may carry and still be PATCHed into shape.
CANARY_CONDITIONS = {"headerContains", "fromAddresses"}
CANARY_ACTIONS = {"markAsRead", "delete", "stopProcessingRules"}
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
        rules = self._all_rules(target)
        forward = _named(rules, self.server.rule_name)
        canary = _named(rules, self.canary_rule_name)
        if not forward and not canary:
            return Inspection("missing", f"no inbox rule named {self.server.rule_name!r}")
        problems: list[str] = []
        if not forward:
            problems.append(f"no inbox rule named {self.server.rule_name!r}")
        elif len(forward) > 1:
            problems.append(f"{len(forward)} inbox rules named {self.server.rule_name!r}")
        else:
            problems.extend(rule_problems(forward[0], target.forward_address))
        problems.extend(self._canary_findings(target, rules, forward, canary))
        if problems:
            return Inspection("differs", "; ".join(problems))
        detail = (f"inbox rule {self.server.rule_name!r} forwards every message as an "
                  f"attachment to {target.forward_address}")
        if target.canary_sender is not None:
            detail += f"; {self.canary_rule_name!r} then deletes the canaries"
        return Inspection("present", detail)

    def install(self, target: RuleTarget) -> None:
        rules = self._all_rules(target)
        if self._install_forward(target, _named(rules, self.server.rule_name)):
            rules = self._all_rules(target)  # sequences move when a rule comes or goes
        canary = _named(rules, self.canary_rule_name)
        if target.canary_sender is None:
            for leftover in canary:  # canaries are off: nothing for it to do
                self._delete_rule(target, leftover, self.canary_rule_name)
            if canary:
                log.info("graph rules: removed %s from %s (canaries are off)",
                         self.canary_rule_name, one_line(target.login))
            return
        self._install_canary(target, rules, target.canary_sender)

    def remove(self, target: RuleTarget) -> bool:
        rules = self._all_rules(target)
        ours = [*_named(rules, self.server.rule_name), *_named(rules, self.canary_rule_name)]
        for rule in ours:
            self._delete_rule(target, rule, str(rule.get("displayName")))
        if ours:
            log.info("graph rules: removed %s from %s",
                     ", ".join(sorted({str(r.get("displayName")) for r in ours})),
                     one_line(target.login))
        return bool(ours)

    # ---- the forward rule -------------------------------------------------------------

    def _install_forward(self, target: RuleTarget, ours: list[dict[str, Any]]) -> bool:
        """Makes mailroute's forward rule right; True when it wrote anything."""
        name = self.server.rule_name
        ours = sorted(ours, key=lambda rule: len(rule_problems(rule, target.forward_address)))
        for extra in ours[1:]:
            self._delete_rule(target, extra, name)
        if not ours:
            self._request("POST", self._rules_path(target), target, f"creating inbox rule "
                          f"{name!r}", json=self._wanted_rule(target))
            log.info("graph rules: created %s for %s", name, one_line(target.login))
            return True
        rule = ours[0]
        if not rule_problems(rule, target.forward_address):
            return len(ours) > 1
        if _patchable(rule, set(), PATCHABLE_ACTIONS):
            self._request("PATCH", self._rule_path(target, rule), target,
                          f"updating inbox rule {name!r}",
                          json={"isEnabled": True, "actions": self._wanted_rule(target)["actions"]})
            log.info("graph rules: updated %s for %s", name, one_line(target.login))
            return True
        # Conditions, exceptions or other actions: PATCH merges those, so start afresh.
        self._delete_rule(target, rule, name)
        self._request("POST", self._rules_path(target), target, f"creating inbox rule {name!r}",
                      json=self._wanted_rule(target))
        log.info("graph rules: replaced %s for %s", name, one_line(target.login))
        return True

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

    # ---- the canary rule --------------------------------------------------------------

    @property
    def canary_rule_name(self) -> str:
        return f"{self.server.rule_name}{CANARY_RULE_SUFFIX}"

    def _canary_findings(self, target: RuleTarget, rules: list[dict[str, Any]],
                         forward: list[dict[str, Any]],
                         canary: list[dict[str, Any]]) -> list[str]:
        """What is wrong with the canary rule (or its absence), as inspect's detail."""
        name = self.canary_rule_name
        if target.canary_sender is None:
            return [f"inbox rule {name!r} is there, but canaries are off (deploy deletes it)"
                    ] if canary else []
        if not canary:
            return [f"no inbox rule named {name!r} (canaries would stay in the inbox)"]
        if len(canary) > 1:
            return [f"{len(canary)} inbox rules named {name!r}"]
        problems = canary_rule_problems(canary[0], target.canary_sender)
        if len(forward) == 1:
            problems.extend(_order_problems(rules, forward[0], canary[0]))
        return [f"inbox rule {name!r}: {problem}" for problem in problems]

    def _install_canary(self, target: RuleTarget, rules: list[dict[str, Any]],
                        sender: str) -> None:
        name = self.canary_rule_name
        forward = self._forward_rule(target, rules)
        ours = sorted(_named(rules, name),
                      key=lambda rule: len(canary_rule_problems(rule, sender)))
        # A rule out of place is made afresh: where a PATCHed sequence lands is the
        # server's choice, a new rule's is that of the rule it displaces.
        keep = ours[0] if ours and _patchable(ours[0], CANARY_CONDITIONS, CANARY_ACTIONS) \
            and not _order_problems(rules, forward, ours[0]) else None
        doomed = [rule for rule in ours if rule is not keep]
        for rule in doomed:
            self._delete_rule(target, rule, name)
        if keep is None:
            if doomed:
                forward = self._forward_rule(target, self._all_rules(target))
            after = int(forward.get("sequence") or RULE_SEQUENCE) + 1
            self._request("POST", self._rules_path(target), target,
                          f"creating inbox rule {name!r}",
                          json={"displayName": name, "sequence": after,
                                **self._canary_rule_settings(sender)})
            log.info("graph rules: %s %s for %s", "replaced" if doomed else "created", name,
                     one_line(target.login))
            return
        if not canary_rule_problems(keep, sender):
            return
        self._request("PATCH", self._rule_path(target, keep), target,
                      f"updating inbox rule {name!r}", json=self._canary_rule_settings(sender))
        log.info("graph rules: updated %s for %s", name, one_line(target.login))

    def _forward_rule(self, target: RuleTarget, rules: list[dict[str, Any]]) -> dict[str, Any]:
        found = _named(rules, self.server.rule_name)
        if len(found) != 1:  # changed by someone else meanwhile
            raise RuleError(f"{target.login}: {len(found)} inbox rules named "
                            f"{self.server.rule_name!r} just after writing it; run deploy again")
        return found[0]

    @staticmethod
    def _canary_rule_settings(sender: str) -> dict[str, Any]:
        """The canary rule's properties but its name and place (what a PATCH mends)."""
        return {
            "isEnabled": True,
            "conditions": {
                "headerContains": [CANARY_HEADER],
                "fromAddresses": [{"emailAddress": {"address": sender}}],
            },
            "actions": {"markAsRead": True, "delete": True, "stopProcessingRules": True},
        }

    # ---- rules ------------------------------------------------------------------------

    def _all_rules(self, target: RuleTarget) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = []
        url: str | None = self._rules_path(target)
        while url:
            page = self._json(self._request("GET", url, target, "reading the inbox rules"),
                              target, "reading the inbox rules")
            rules.extend(r for r in page.get("value", []) if isinstance(r, dict))
            url = page.get("@odata.nextLink")
        return rules

    def _delete_rule(self, target: RuleTarget, rule: dict[str, Any], name: str) -> None:
        with contextlib.suppress(_Gone):  # deleted meanwhile: what was wanted
            self._request("DELETE", self._rule_path(target, rule), target,
                          f"deleting inbox rule {name!r}")

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


def canary_rule_problems(rule: dict[str, Any], sender: str) -> list[str]:
    """What keeps ``rule`` from deleting (to Deleted Items), read, mailroute's canaries from
    ``sender`` (the header *and* that From), and only those, and stopping the user's rules."""
    problems = []
    if rule.get("isEnabled") is not True:
        problems.append("disabled")
    if rule.get("hasError"):
        problems.append("Exchange marks the rule in error")
    conditions = rule.get("conditions") or {}
    headers = {str(h).lower() for h in conditions.get("headerContains") or []}
    if headers != {CANARY_HEADER.lower()}:
        problems.append(f"headerContains is {sorted(headers) or 'empty'}, not "
                        f"[{CANARY_HEADER!r}]")
    senders = {str((r.get("emailAddress") or {}).get("address", "")).lower()
               for r in conditions.get("fromAddresses") or [] if isinstance(r, dict)}
    if senders != {sender.lower()}:
        problems.append(f"fromAddresses is {', '.join(sorted(senders)) or 'empty'}, not "
                        f"{sender}")
    others = _given_keys(conditions, CANARY_CONDITIONS)
    if others:
        problems.append(f"has other conditions ({', '.join(others)})")
    exceptions = _given_keys(rule.get("exceptions") or {}, set())
    if exceptions:
        problems.append(f"has exceptions ({', '.join(exceptions)})")
    actions = rule.get("actions") or {}
    for name, missing in (("delete", "does not delete the canaries"),
                          ("markAsRead", "does not mark the canaries read"),
                          ("stopProcessingRules", "does not stop the user's other rules")):
        if actions.get(name) is not True:
            problems.append(missing)
    others = _given_keys(actions, CANARY_ACTIONS)
    if others:
        problems.append(f"also has actions {', '.join(others)}")
    return problems


def _order_problems(rules: list[dict[str, Any]], forward: dict[str, Any],
                    canary: dict[str, Any]) -> list[str]:
    """Whether ``canary`` runs right after ``forward`` (no rule between them)."""
    ordered = sorted(rules, key=lambda r: r.get("sequence") or 0)  # stable for equal ones
    at_forward = next(i for i, r in enumerate(ordered) if r is forward)
    at_canary = next(i for i, r in enumerate(ordered) if r is canary)
    if at_canary < at_forward:
        return [f"runs before {forward.get('displayName')!r}, so canaries would be deleted "
                "without being forwarded"]
    between = [repr(str(r.get("displayName"))) for r in ordered[at_forward + 1:at_canary]]
    if between:
        return [f"not right after {forward.get('displayName')!r} ({', '.join(between)} "
                "run between them and may act on the canaries)"]
    return []


def _named(rules: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rules if r.get("displayName") == name]


def _given_keys(part: dict[str, Any], allowed: set[str]) -> list[str]:
    """The predicates or actions set in ``part`` besides ``allowed`` (sorted)."""
    return sorted(k for k, v in part.items()
                  if k not in allowed and _set(v) and not k.startswith("@"))


def _patchable(rule: dict[str, Any], conditions: set[str], actions: set[str]) -> bool:
    """Whether a PATCH of isEnabled, the ``conditions`` and the ``actions`` brings ``rule``
    into shape (a PATCH merges conditions and actions, so it cannot clear others)."""
    return not rule.get("hasError") and not _given_keys(rule.get("exceptions") or {}, set()) \
        and not _given_keys(rule.get("conditions") or {}, conditions) \
        and not _given_keys(rule.get("actions") or {}, actions)
