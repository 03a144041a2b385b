"""A local stand-in for one Microsoft 365 tenant: its token endpoint and Graph's inbox rules.

No tenant is reachable from this machine, so the Graph backend (``ingest.graph_rules``) is
tested against this: a real HTTP server (HTTPS when given a certificate) on a free
127.0.0.1 port, in a thread, that answers the requests Microsoft documents for

- the identity platform's OAuth2 client-credentials grant (``POST
  /{tenant}/oauth2/v2.0/token``, form-encoded ``grant_type``, ``client_id``,
  ``client_secret``, ``scope``; ``{token_type, expires_in, ext_expires_in, access_token}``;
  refusals as ``{error, error_description "AADSTSnnnn: ...", error_codes, ...}``: 401
  invalid_client for a wrong secret, 400 unauthorized_client for an unknown client id,
  400 invalid_request for an unknown tenant, 400 invalid_scope, unsupported_grant_type);
- Graph v1.0 mailFolder-list-messageRules (GET), mailFolder-post-messageRules (POST, 201),
  messageRule-update (PATCH, 200) and messageRule-delete (DELETE, 204) under
  ``/users/{id | userPrincipalName}/mailFolders/inbox/messageRules`` (also ``/users('$..')``),
  with the messageRule, messageRulePredicates and messageRuleActions properties of the
  resource pages, Bearer tokens checked (401 InvalidAuthenticationToken), Graph's error body
  ``{"error": {"code", "message", "innerError"}}``: 404 ErrorInvalidUser for an unknown user,
  404 ErrorItemNotFound for an unknown rule, 400 RequestBodyRead for an unknown property or
  a value of the wrong type, 403 ErrorAccessDenied in :attr:`GraphStandIn.deny_access` mode,
  and 429 ApplicationThrottled with Retry-After when :meth:`GraphStandIn.throttle` asks.

It records every request (:attr:`GraphStandIn.requests`) so that tests can check what was
sent.  :meth:`GraphStandIn.deliver` plays Exchange's transport for one incoming message: the
user's enabled rules run in sequence order, each acting when all of its conditions hold and
none of its exceptions does.  It evaluates headerContains (any of the strings in the header
section, names and values, ignoring case), fromAddresses (the From header's address is one
of them, ignoring case), senderContains and subjectContains.  Each
``forwardAsAttachmentTo`` makes an envelope as Exchange does (From the user, To the
recipient, "FW: " subject, the original attached as message/rfc822, with the
``X-MS-Exchange-Inbox-Rules-Loop`` header), handed to the ``send`` callback (for example an
IMAP APPEND to a Dovecot forward mailbox); delete moves the message to the user's Deleted
Items (:attr:`MailUser.deleted_items`), permanentDelete drops it, moveToFolder and
copyToFolder file it by folder id (:attr:`MailUser.folders`), and stopProcessingRules ends
the run.  :attr:`MailUser.ran` lists which rules acted on which message.

Left out, and so untested here: the other predicates (a rule with one in its conditions or
exceptions is skipped by :meth:`deliver`); which header Exchange matches fromAddresses and
senderContains against (here the From header) and whether headerContains sees the headers
exactly as sent (here as parsed, one ``Name: value`` a line); several moves of one message
(here the last one wins, Exchange may file copies); forwardTo, redirectTo, markAsRead,
markImportance and assignCategories are stored, not carried out; no paging
(@odata.nextLink), OData query options, $batch, delegated (user) tokens, token signatures or
claims, application access policies, or the tenant's outbound spam policy that blocks
automatic external forwarding.
Sequences are kept 1..n (a rule put at a taken sequence goes first), as Exchange keeps
rule priorities.  Error codes follow the documented and commonly
seen ones; the exact wording of messages is the stand-in's own.  It is a stand-in for a
tenant, not a tenant.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import json
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
RULE_PROPERTIES = {"id", "displayName", "sequence", "isEnabled", "hasError", "isReadOnly",
                   "conditions", "exceptions", "actions"}
READ_ONLY = {"id", "hasError", "isReadOnly"}
PREDICATES = {
    "bodyContains", "bodyOrSubjectContains", "categories", "fromAddresses", "hasAttachments",
    "headerContains", "importance", "isApprovalRequest", "isAutomaticForward",
    "isAutomaticReply", "isEncrypted", "isMeetingRequest", "isMeetingResponse",
    "isNonDeliveryReport", "isPermissionControlled", "isReadReceipt", "isSigned",
    "isVoicemail", "messageActionFlag", "notSentToMe", "recipientContains", "senderContains",
    "sensitivity", "sentCcMe", "sentOnlyToMe", "sentToAddresses", "sentToMe", "sentToOrCcMe",
    "subjectContains", "withinSizeRange"}
ACTIONS = {"assignCategories", "copyToFolder", "delete", "forwardAsAttachmentTo", "forwardTo",
           "markAsRead", "markImportance", "moveToFolder", "permanentDelete", "redirectTo",
           "stopProcessingRules"}
RECIPIENT_ACTIONS = {"forwardAsAttachmentTo", "forwardTo", "redirectTo"}
BOOLEAN_ACTIONS = {"delete", "markAsRead", "permanentDelete", "stopProcessingRules"}

Send = Callable[[str, bytes], object]   # (recipient address, raw message)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str                  # as sent, still percent-encoded
    headers: dict[str, str]
    body: bytes


@dataclass
class MailUser:
    id: str
    user_principal_name: str
    mail: str
    rules: list[dict[str, Any]] = field(default_factory=list)
    inbox: list[bytes] = field(default_factory=list)
    deleted_items: list[bytes] = field(default_factory=list)   # the delete action's folder
    folders: dict[str, list[bytes]] = field(default_factory=dict)  # moveTo/copyToFolder, by id
    # (Message-ID, rule displayName) for every rule whose actions ran, in order.
    ran: list[tuple[str, str]] = field(default_factory=list)


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _graph_error(status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, {"error": {"code": code, "message": message, "innerError": {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": str(uuid.uuid4()), "client-request-id": str(uuid.uuid4())}}}, headers)


def _aad_error(status: int, error: str, number: int, text: str) -> _Reply:
    trace = str(uuid.uuid4())
    return _Reply(status, {
        "error": error,
        "error_description": f"AADSTS{number}: {text}\r\nTrace ID: {trace}\r\n"
                             f"Correlation ID: {uuid.uuid4()}\r\nTimestamp: "
                             f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%SZ')}",
        "error_codes": [number], "timestamp": datetime.now(UTC).isoformat(),
        "trace_id": trace, "correlation_id": str(uuid.uuid4())})


class GraphStandIn:
    """One tenant with one app registration; ``start()``/``stop()`` or a context manager."""

    def __init__(self, *, tenant_id: str = "8f4c1f1e-0000-4000-8000-standin00001",
                 client_id: str = "5a1b2c3d-0000-4000-8000-standin00002",
                 client_secret: str = "stand-in-client-secret",
                 token_lifetime: int = 3599, send: Send | None = None,
                 tls: tuple[str, str] | None = None,
                 on_token: Callable[[list[str]], object] | None = None) -> None:
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.send = send
        self.tls = tls                      # (certificate file, key file): HTTPS
        self.on_token = on_token            # called with every token issued so far
        self.users: dict[str, MailUser] = {}
        self.requests: list[Recorded] = []
        self.issued: list[str] = []         # every token handed out, oldest first
        self.deny_access = False            # 403 ErrorAccessDenied for every Graph call
        self._valid: dict[str, float] = {}  # token -> monotonic expiry
        self._throttled = 0
        self._retry_after = 1
        self._next_rule = 0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle and URLs ----------------------------------------------------------

    def start(self) -> GraphStandIn:
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            # The handshake happens in the request's own thread, at its first read: done in
            # accept, one silent client would hold up the whole server.
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                      do_handshake_on_connect=False)
        # A connection reset between select() and accept() leaves a blocking accept() waiting
        # for the next client, and shutdown() waiting for it: accept gives up after a second.
        self._server.socket.settimeout(1.0)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="graph-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> GraphStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def authority_url(self) -> str:
        return f"{self.base_url}/login"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    # ---- what tests set up and look at ------------------------------------------------

    def add_user(self, user_principal_name: str, mail: str | None = None) -> MailUser:
        with self._lock:
            user = MailUser(str(uuid.uuid4()), user_principal_name,
                            mail or user_principal_name)
            self.users[user.id] = user
            return user

    def user(self, key: str) -> MailUser:
        with self._lock:
            found = self._find_user(key)
            if found is None:
                raise KeyError(key)
            return found

    def rules(self, key: str) -> list[dict[str, Any]]:
        """The user's rules as Graph would list them (copies, in sequence order)."""
        with self._lock:
            return [json.loads(json.dumps(r)) for r in self._sorted(self.user(key))]

    def add_rule(self, key: str, rule: dict[str, Any]) -> str:
        """A rule as the user (or Outlook) would make it; returns its id."""
        with self._lock:
            return str(self._create(self.user(key), self._checked(rule, creating=True))["id"])

    def throttle(self, count: int, retry_after: int = 1) -> None:
        """Answer the next ``count`` Graph calls with 429 and this Retry-After."""
        with self._lock:
            self._throttled = count
            self._retry_after = retry_after

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused from now on (as an expired one would be)."""
        with self._lock:
            self._valid.clear()

    def graph_requests(self) -> list[Recorded]:
        return [r for r in self.requests if not r.path.startswith("/login/")]

    def token_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/login/")]

    # ---- Exchange's transport, for one message ----------------------------------------

    def deliver(self, key: str, raw: bytes) -> list[tuple[str, bytes]]:
        """The message arrives for the user; their rules run; returns what was sent.

        Enabled rules run in sequence order.  A rule acts when all of its conditions hold
        and none of its exceptions does (a rule with a predicate not evaluated here is
        skipped); its forwardAsAttachmentTo recipients each get an envelope, copyToFolder
        files a copy, moveToFolder, delete and permanentDelete decide where the message ends
        up (the last one wins), and stopProcessingRules ends the run.  The message lands in
        the user's inbox, Deleted Items or a folder, or nowhere."""
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        message_id = str(message.get("Message-ID", ""))
        sent = []
        with self._lock:
            user = self.user(key)
            place: list[bytes] | None = user.inbox
            for rule in self._sorted(user):
                if not rule.get("isEnabled") or not _applies(rule, message):
                    continue
                user.ran.append((message_id, str(rule.get("displayName"))))
                actions = rule.get("actions") or {}
                for recipient in actions.get("forwardAsAttachmentTo") or []:
                    address = recipient["emailAddress"]["address"]
                    sent.append((address, forward_as_attachment(user.mail, address, raw)))
                if actions.get("copyToFolder"):
                    user.folders.setdefault(actions["copyToFolder"], []).append(raw)
                if actions.get("moveToFolder"):
                    place = user.folders.setdefault(actions["moveToFolder"], [])
                if actions.get("delete"):
                    place = user.deleted_items
                if actions.get("permanentDelete"):
                    place = None
                if actions.get("stopProcessingRules"):
                    break
            if place is not None:
                place.append(raw)
        if self.send is not None:
            for address, envelope in sent:
                self.send(address, envelope)
        return sent

    # ---- requests ---------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append(Recorded(method, path, headers, body))
            try:
                if path.startswith("/login/"):
                    return 200, self._token(method, path, headers, body), {}
                if path.startswith("/v1.0/"):
                    return self._graph(method, path, headers, body)
                raise _graph_error(404, "UnknownError", f"no such resource {path}")
            except _Reply as reply:
                return reply.status, reply.body, reply.headers

    def _token(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> dict[str, Any]:
        parts = path.split("?")[0].split("/")
        if method != "POST" or len(parts) != 6 or parts[3:] != ["oauth2", "v2.0", "token"]:
            raise _aad_error(404, "invalid_request", 90000, "Unknown endpoint.")
        if unquote(parts[2]) != self.tenant_id:
            raise _aad_error(400, "invalid_request", 90002,
                             f"Tenant '{unquote(parts[2])}' not found.")
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            raise _aad_error(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: "
                             "'grant_type'.")
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        for name in ("grant_type", "client_id", "scope"):
            if name not in form:
                raise _aad_error(400, "invalid_request", 900144, "The request body must "
                                 f"contain the following parameter: '{name}'.")
        if form["grant_type"] != "client_credentials":
            raise _aad_error(400, "unsupported_grant_type", 70003,
                             "The app requested an unsupported grant type.")
        if form["client_id"] != self.client_id:
            raise _aad_error(400, "unauthorized_client", 700016,
                             f"Application with identifier '{form['client_id']}' was not "
                             f"found in the directory '{self.tenant_id}'.")
        if form.get("client_secret") != self.client_secret:
            raise _aad_error(401, "invalid_client", 7000215,
                             "Invalid client secret provided. Ensure the secret being sent "
                             "in the request is the client secret value, not the client "
                             f"secret ID, for a secret added to app '{self.client_id}'.")
        if form["scope"] != GRAPH_SCOPE:
            raise _aad_error(400, "invalid_scope", 1002012,
                             f"The provided value for scope {form['scope']} is not valid.")
        token = "eyJ0eXAiOiJKV1Qi." + secrets.token_urlsafe(48)
        self.issued.append(token)
        if self.on_token is not None:
            self.on_token(list(self.issued))
        self._valid[token] = time.monotonic() + self.token_lifetime
        return {"token_type": "Bearer", "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime, "access_token": token}

    def _graph(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, Any, dict[str, str]]:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if not token:
            raise _graph_error(401, "InvalidAuthenticationToken", "Access token is empty.")
        if scheme.lower() != "bearer" or time.monotonic() >= self._valid.get(token, 0):
            raise _graph_error(401, "InvalidAuthenticationToken",
                               "Lifetime validation failed, the token is expired.",
                               {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
        if self._throttled > 0:
            self._throttled -= 1
            raise _graph_error(429, "ApplicationThrottled",
                               "Application is over its MailboxConcurrency limit.",
                               {"Retry-After": str(self._retry_after)})
        key, rule_id = self._rules_address(path)
        if self.deny_access:
            raise _graph_error(403, "ErrorAccessDenied",
                               "Access is denied. Check credentials and try again.")
        user = self._find_user(key)
        if user is None:
            raise _graph_error(404, "ErrorInvalidUser", f"The requested user '{key}' is invalid.")
        context = (f"{self.graph_url}/$metadata#users('{user.id}')/mailFolders('inbox')/"
                   "messageRules")
        if rule_id is None and method == "GET":
            return 200, {"@odata.context": context, "value": self._sorted(user)}, {}
        if rule_id is None and method == "POST":
            created = self._create(user, self._checked(self._body(headers, body),
                                                       creating=True))
            return 201, {"@odata.context": context + "/$entity", **created}, {}
        if rule_id is None:
            raise _graph_error(405, "Request_BadRequest", f"{method} is not allowed here.")
        rule: dict[str, Any] | None = next(
            (r for r in user.rules if r["id"] == rule_id), None)
        if rule is None:
            raise _graph_error(404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
        if method == "GET":
            return 200, {"@odata.context": context + "/$entity", **rule}, {}
        if method == "PATCH":
            changes = self._checked(self._body(headers, body), creating=False)
            for name, value in changes.items():
                if name in ("conditions", "exceptions", "actions"):
                    rule[name] = {**rule.get(name, {}), **value}  # a complex type merges
                else:
                    rule[name] = value
            self._renumber(user, first=rule if "sequence" in changes else None)
            return 200, {"@odata.context": context + "/$entity", **rule}, {}
        if method == "DELETE":
            user.rules.remove(rule)
            self._renumber(user)
            return 204, None, {}
        raise _graph_error(405, "Request_BadRequest", f"{method} is not allowed here.")

    def _rules_address(self, path: str) -> tuple[str, str | None]:
        """(user key, rule id or None) from the still-encoded path; 400 for anything else."""
        segments = path.split("?")[0].split("/")[2:]
        if segments and segments[0].startswith("users('") and segments[0].endswith("')"):
            segments = ["users", unquote(segments[0][7:-2]).replace("''", "'"),
                        *segments[1:]]
        elif len(segments) > 1:
            segments[1] = unquote(segments[1])
        if len(segments) not in (5, 6) or segments[0] != "users" or \
                [s.lower() for s in segments[2:5]] != ["mailfolders", "inbox", "messagerules"]:
            raise _graph_error(400, "BadRequest",
                               f"Resource not found for the segment '{'/'.join(segments)}'.")
        return segments[1], unquote(segments[5]) if len(segments) == 6 else None

    def _find_user(self, key: str) -> MailUser | None:
        for user in self.users.values():
            if key == user.id or key.lower() == user.user_principal_name.lower():
                return user
        return None

    @staticmethod
    def _body(headers: dict[str, str], body: bytes) -> Any:
        if not headers.get("content-type", "").startswith("application/json"):
            raise _graph_error(415, "UnsupportedMediaType",
                               "A supported MIME type could not be found that matches the "
                               "content type of the response.")
        try:
            return json.loads(body)
        except ValueError:
            raise _graph_error(400, "BadRequest", "Unable to read JSON request payload.") \
                from None

    def _checked(self, rule: Any, creating: bool) -> dict[str, Any]:
        if not isinstance(rule, dict):
            raise _graph_error(400, "BadRequest", "Unable to read JSON request payload.")
        _known(rule, RULE_PROPERTIES, "messageRule")
        _typed(rule, "displayName", str, "Edm.String")
        _typed(rule, "sequence", int, "Edm.Int32")
        _typed(rule, "isEnabled", bool, "Edm.Boolean")
        for part in ("conditions", "exceptions"):
            _typed(rule, part, dict, "microsoft.graph.messageRulePredicates")
            _known(rule.get(part) or {}, PREDICATES, "messageRulePredicates")
        _typed(rule, "actions", dict, "microsoft.graph.messageRuleActions")
        actions = rule.get("actions") or {}
        _known(actions, ACTIONS, "messageRuleActions")
        for name in BOOLEAN_ACTIONS:
            _typed(actions, name, bool, "Edm.Boolean")
        for name in RECIPIENT_ACTIONS:
            recipients = actions.get(name)
            if recipients is None:
                continue
            if not isinstance(recipients, list) or not all(
                    isinstance(r, dict) and set(r) <= {"emailAddress"}
                    and isinstance(r.get("emailAddress"), dict)
                    and set(r["emailAddress"]) <= {"address", "name"}
                    and "@" in str(r["emailAddress"].get("address", ""))
                    for r in recipients):
                raise _graph_error(400, "ErrorInvalidRecipients",
                                   f"{name}: each recipient needs an emailAddress with an "
                                   "address, and nothing else.")
        if creating:
            if not rule.get("displayName"):
                raise _graph_error(400, "ErrorInvalidRequest",
                                   "The DisplayName property is required.")
            if not any(_given(v) for v in actions.values()):
                raise _graph_error(400, "ErrorInvalidRequest",
                                   "A rule needs at least one action.")
        return {k: v for k, v in rule.items() if k not in READ_ONLY}

    def _create(self, user: MailUser, rule: dict[str, Any]) -> dict[str, Any]:
        self._next_rule += 1
        # Exchange's ids are base64 and may hold '/', '+' and '=': these always do.
        rule_id = base64.b64encode(b"\x01\x00\x00\xfb\xef\xbf" +
                                   self._next_rule.to_bytes(2, "big")).decode()
        sequence = rule.get("sequence") or max((r["sequence"] for r in user.rules),
                                               default=0) + 1
        stored = {"id": rule_id, "displayName": rule["displayName"], "sequence": sequence,
                  "isEnabled": rule.get("isEnabled", True), "hasError": False,
                  "isReadOnly": False, "conditions": rule.get("conditions") or {},
                  "actions": rule.get("actions") or {}}
        if rule.get("exceptions"):
            stored["exceptions"] = rule["exceptions"]
        user.rules.append(stored)
        self._renumber(user, first=stored)
        return stored

    @staticmethod
    def _renumber(user: MailUser, first: dict[str, Any] | None = None) -> None:
        """Sequences 1..n, as Exchange keeps rule priorities: a rule put at a taken
        sequence goes before the rule that had it."""
        ordered = sorted(user.rules, key=lambda r: (r["sequence"], r is not first))
        for number, rule in enumerate(ordered, start=1):
            rule["sequence"] = number

    @staticmethod
    def _sorted(user: MailUser) -> list[dict[str, Any]]:
        return sorted(user.rules, key=lambda r: r["sequence"])


def _given(value: Any) -> bool:
    return value not in (None, False, [], {}, "")


def _applies(rule: dict[str, Any], message: email.message.Message) -> bool:
    """All of the rule's conditions hold and none of its exceptions does (False when one
    is a predicate not evaluated here)."""
    conditions = {k: v for k, v in (rule.get("conditions") or {}).items() if _given(v)}
    exceptions = {k: v for k, v in (rule.get("exceptions") or {}).items() if _given(v)}
    if not set(conditions) | set(exceptions) <= set(EVALUATED):
        return False
    return all(EVALUATED[k](v, message) for k, v in conditions.items()) and \
        not any(EVALUATED[k](v, message) for k, v in exceptions.items())


def _header_contains(strings: list[str], message: email.message.Message) -> bool:
    """One of the strings in the header section (names and values), ignoring case."""
    headers = "\n".join(f"{name}: {value}" for name, value in message.items()).lower()
    return any(s.lower() in headers for s in strings)


def _from_addresses(recipients: list[dict[str, Any]], message: email.message.Message) -> bool:
    """The From address is one of the recipients' addresses, ignoring case."""
    wanted = {str(r["emailAddress"]["address"]).lower() for r in recipients}
    found = {address.lower() for _, address in getaddresses(message.get_all("From", []))}
    return bool(found & wanted)


def _sender_contains(strings: list[str], message: email.message.Message) -> bool:
    sender = str(message.get("From", "")).lower()
    return any(s.lower() in sender for s in strings)


def _subject_contains(strings: list[str], message: email.message.Message) -> bool:
    subject = str(message.get("Subject", "")).lower()
    return any(s.lower() in subject for s in strings)


# The predicates deliver() evaluates (within one, any of the values is enough).
EVALUATED: dict[str, Callable[[Any, email.message.Message], bool]] = {
    "headerContains": _header_contains, "fromAddresses": _from_addresses,
    "senderContains": _sender_contains, "subjectContains": _subject_contains}


def _known(properties: dict[str, Any], known: set[str], type_name: str) -> None:
    for name in properties:
        if name not in known and not name.startswith("@odata."):
            raise _graph_error(400, "RequestBodyRead",
                               f"The property '{name}' does not exist on type "
                               f"'microsoft.graph.{type_name}'. Make sure to only use property "
                               "names that are defined by the type or mark the type as open "
                               "type.")


def _typed(properties: dict[str, Any], name: str, kind: type, edm: str) -> None:
    value = properties.get(name)
    if value is None:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _graph_error(400, "RequestBodyRead", f"Cannot convert the literal "
                           f"'{value}' to the expected type '{edm}'.")


def forward_as_attachment(user: str, recipient: str, raw: bytes) -> bytes:
    """What Exchange sends for a forwardAsAttachmentTo rule: the original as message/rfc822."""
    original = email.message_from_bytes(raw, policy=email.policy.SMTP)
    envelope = EmailMessage()
    envelope["From"] = user
    envelope["To"] = recipient
    envelope["Subject"] = f"FW: {original.get('Subject', '')}".rstrip()
    envelope["Date"] = format_datetime(datetime.now(UTC))
    envelope["Message-ID"] = make_msgid(domain=user.rpartition("@")[2] or "standin.invalid")
    envelope["X-MS-Exchange-Inbox-Rules-Loop"] = user
    envelope.set_content("")
    envelope.make_mixed()
    part = EmailMessage()
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = "attachment"
    part.set_payload([email.message_from_bytes(raw)])
    envelope.attach(part)
    return envelope.as_bytes(policy=email.policy.SMTP)


class _Handler(BaseHTTPRequestHandler):
    standin: GraphStandIn
    protocol_version = "HTTP/1.1"
    timeout = 30  # a silent connection ends its thread
    disable_nagle_algorithm = True  # else each keep-alive answer waits for a delayed ACK

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, payload, extra = self.standin.handle(self.command, self.path, headers, body)
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; odata.metadata=minimal")
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the requests are recorded instead
