"""Settings: one frozen object built once from a YAML file plus ``MAILROUTE_*`` overrides.

Takes a path to a YAML file (or none, for the embedded defaults) and the process environment;
gives a frozen :class:`Settings` that the entry point passes to every component.  Fails with
:class:`ConfigError`, whose message names the offending key, on anything it cannot use:
unknown keys, wrong types, references to servers or mailboxes that do not exist.

Environment overrides use ``__`` between levels, for example
``MAILROUTE_BROKER__URL=amqp://guest:guest@127.0.0.1:5672/%2F`` or
``MAILROUTE_DATABASE__URL=postgresql+psycopg://postgres@127.0.0.1/mailroute``.
Values are parsed as YAML scalars, so ``MAILROUTE_BROKER__PREFETCH=100`` is an integer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml

from shared.secrets import Keyring, Secret, SecretError

ENV_PREFIX = "MAILROUTE_"

AfterAction = Literal["keep", "seen", "move", "delete"]
MailboxKind = Literal["imap", "maildir", "pop3"]
TlsMode = Literal["ssl", "starttls", "none"]
TRACK_MODES = ("all", "replies", "contacts", "none")
SenderCondition = Literal["any", "known", "unknown"]
ThreadCondition = Literal["any", "new", "existing", "with-case", "without-case"]
DEFAULT_BLOCKED_EXTENSIONS = (
    ".exe", ".com", ".bat", ".cmd", ".scr", ".pif", ".js", ".jse", ".vbs", ".vbe", ".wsf",
    ".msi", ".ps1", ".jar", ".hta", ".cpl", ".lnk",
)
AuthMethod = Literal["login", "xoauth2"]
MasterMode = Literal["separator", "authzid"]
RuleServerKind = Literal["managesieve", "graph"]
DEFAULT_INTERVAL = 60.0


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


@dataclass(frozen=True)
class JournalSettings:
    """The journal: a RabbitMQ stream that keeps every hop's output for ``mailroute replay``.

    Retention is whichever limit is reached first; the broker drops whole segments, so the
    oldest ``segment_size_bytes`` go at once.  These are queue arguments, fixed when the
    stream is first declared: change them on a running broker with a policy (``max-age``,
    ``max-length-bytes``), see README "Operations".
    """

    enabled: bool = True
    max_age: str = "7D"  # x-max-age: a number and one of Y M D h m s
    max_length_bytes: int = 20 * 1024**3
    segment_size_bytes: int = 100 * 1024**2


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "memory://"
    prefix: str = "mail"
    prefetch: int = 100
    # A worker reads deliveries ahead of handling while they hold fewer body bytes than this
    # (so at most this plus one delivery), and settles a batch this big before the next:
    # a run of large messages is handled one at a time instead of a prefetch's worth at once.
    read_ahead_bytes: int = 16 * 1024 * 1024
    confirm_timeout: float = 15.0
    heartbeat: int = 30
    delivery_limit: int = 5
    management_url: str = "http://127.0.0.1:15672"
    journal: JournalSettings = JournalSettings()


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///var/mailroute.db"


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 30.0
    # How long a starting worker, run or web waits, with this backoff, for a broker or
    # database that is unreachable (refused, timed out, starting up); 0 fails at once.
    startup_wait: float = 300.0


@dataclass(frozen=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    # Each stage's port is base_port + offset (ingest 0, parse 1, route 2, persist 3);
    # 0 asks the OS for a free port (tests), a negative value disables the endpoint.
    base_port: int = 9400


@dataclass(frozen=True)
class WebSettings:
    """The operations page (``mailroute web``, also started by ``mailroute run``)."""

    enabled: bool = True  # whether ``mailroute run`` starts it
    host: str = "127.0.0.1"
    port: int = 8025  # 0: any free port (the address printed at start tells which)
    # Without it the page is read-only for everyone; with it, a login with this token allows
    # the actions (mailbox test and enable, dead-letter retry and purge).
    admin_token: Secret | None = field(default=None, repr=False)
    # The workers' /metrics URLs to read the stage counters from; empty: derived from
    # metrics.host and metrics.base_port (+0..3, one per worker kind).
    metrics_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitSettings:
    max_message_bytes: int = 50 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_parts: int = 2000
    max_depth: int = 20
    # How many forward envelopes inside each other are opened (1: only the one that reached
    # the forward mailbox, as Dynamics does); deeper envelopes stay attachments.
    forward_depth: int = 1
    # Wall-clock seconds one message may take to parse before it is dead-lettered.
    parse_seconds: float = 10.0


@dataclass(frozen=True)
class ServerProfile:
    """Shared settings for mailboxes on one mail server."""

    name: str
    host: str
    port: int = 993
    tls: TlsMode = "ssl"
    verify_tls: bool = True
    ca_file: str | None = None
    timeout: float = 30.0
    # The mailbox fleet (issue 5): shared defaults for the mailboxes on this server.
    auth: AuthMethod = "login"
    interval: float | None = None
    # A master/admin login that opens users' mailboxes (Dovecot master users, Exchange
    # impersonation): "separator" logs in as "<user><separator><master_user>", "authzid"
    # uses SASL PLAIN with the user as authorization identity.
    master_user: str | None = None
    master_password: Secret | None = field(default=None, repr=False)
    master_mode: MasterMode = "separator"
    master_separator: str = "*"
    # XOAUTH2 tokens: a command (``{user}`` is replaced by the mailbox's username) whose
    # output is the token or {"access_token", "expires_in"} JSON, or a file holding either.
    oauth2_token_command: str | None = None
    oauth2_token_file: str | None = None
    # IMAP IDLE is re-issued this often (RFC 2177: servers may drop it after 30 minutes).
    idle_refresh: float = 25 * 60.0
    # At most this many connections (polls and IDLE sessions) to one account at once, per
    # ingest process: servers cap them per user and address (Dovecot's
    # mail_max_userip_connections is 10, Gmail allows 15) and refuse more with NO [LIMIT].
    max_connections: int = 5


@dataclass(frozen=True)
class MailboxSettings:
    """One monitored mailbox: a user's or queue's own, or a forward mailbox."""

    name: str
    kind: MailboxKind = "imap"
    server: str | None = None
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    folder: str = "INBOX"
    path: str | None = None
    forward: bool = False
    after: AfterAction = "seen"
    move_to: str | None = None
    # Seconds between polls; None takes the server profile's, else 60.
    interval: float | None = None
    batch_size: int = 200
    # A batch also stops before it would hold more than this many bytes of mail (a single
    # message bigger than that is a batch alone): a backlog of large messages is fetched and
    # published a few at a time, not batch_size at once.
    batch_bytes: int = 16 * 1024 * 1024
    # Forward mailboxes only.  ``address``: the mailbox's own address, never taken for a
    # forwarder.  ``authserv_id``: the Authentication-Results headers of this server id are
    # trusted (all others ignored); ``require_proof``: a forward needs an aligned DKIM/SPF or
    # ARC pass in one of them.  A forward mailbox's ``after`` defaults to delete.
    address: str | None = None
    authserv_id: str | None = None
    require_proof: bool = False
    # Keep an IMAP IDLE session open and fetch as soon as mail arrives (polling backs it).
    push: bool = False
    # "Process email from": the first poll (and a poll after a UIDVALIDITY reset) reads
    # only messages that arrived on or after this date (YYYY-MM-DD); IMAP only.
    since: str | None = None
    oauth2_token_command: str | None = None
    oauth2_token_file: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class PrincipalSettings:
    """A user or a queue: an address and how its mail arrives.

    Exactly one of ``mailbox`` (its own mailbox, polled directly) and ``forward`` (the name of
    the forward mailbox its server-side rule forwards to) is set.
    """

    name: str
    address: str
    mailbox: str | None = None
    forward: str | None = None
    # Which of its mail becomes records: all; only replies to tracked mail; only mail from
    # known contacts or accounts; none (untracked mail is still recorded, marked and counted).
    track: str = "all"  # one of TRACK_MODES (a plain str, checked by load_settings)
    # Where this user's forwarding rule lives (users with ``forward`` only), for
    # ``mailroute rules`` and the canaries.
    rule: UserRuleSettings | None = None


@dataclass(frozen=True)
class UserRuleSettings:
    """Where ``mailroute rules`` writes one user's forwarding rule."""

    server: str  # a name from rule_servers
    # ManageSieve: the login (default: the user's address); with the server's admin_user it is
    # the authorization identity.  Graph: the user's id or userPrincipalName (default: address).
    username: str | None = None
    # ManageSieve without an admin login: the user's own password.
    password: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RuleServerSettings:
    """A server holding users' forwarding rules: ManageSieve (RFC 5804) or Microsoft Graph."""

    name: str
    kind: RuleServerKind = "managesieve"
    # ManageSieve (Dovecot/Pigeonhole, Cyrus, Stalwart).
    host: str | None = None
    port: int = 4190
    tls: TlsMode = "starttls"
    verify_tls: bool = True
    ca_file: str | None = None
    timeout: float = 30.0
    # An admin login authorised as each user (SASL PLAIN authzid); else each user's own
    # rule.password is used.
    admin_user: str | None = None
    admin_password: Secret | None = field(default=None, repr=False)
    # The name of mailroute's script (ManageSieve) or rule (Graph) in each mailbox.
    rule_name: str = "mailroute-forward"
    # Microsoft Graph (Exchange Online / Microsoft 365): an app registration with
    # MailboxSettings.ReadWrite (application permission), OAuth2 client credentials.
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = field(default=None, repr=False)
    authority_url: str = "https://login.microsoftonline.com"
    graph_url: str = "https://graph.microsoft.com/v1.0"


@dataclass(frozen=True)
class CanarySettings:
    """Marked test messages sent to each forwarding user, expected in the forward mailbox."""

    enabled: bool = False
    # A canary per user every ``interval`` seconds; one not seen within ``deadline`` seconds
    # raises the user's alert.
    interval: float = 3600.0
    deadline: float = 900.0
    # Where canaries are handed over: smtp://host:port, smtps://host:port or lmtp://host:port
    # (the users' mail server, so that their rules see the canary like any incoming mail).
    # smtp:// switches to TLS when the server offers STARTTLS; smtps:// is TLS from the start;
    # either checks the server's certificate (against ``ca_file`` if set, else the system's
    # CAs).  LMTP, a local delivery protocol, stays plain.
    delivery_url: str | None = None
    sender: str = "mailroute-canary@localhost"
    ca_file: str | None = None
    # Log in (SMTP AUTH) before sending; only ever over TLS.
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ContactSettings:
    """A contact from the configuration (read-only; the CLI edits contacts in the database)."""

    name: str
    addresses: tuple[str, ...] = ()
    account: str | None = None


@dataclass(frozen=True)
class AccountSettings:
    """An organisation: its own addresses, and whole domains whose senders belong to it."""

    name: str
    addresses: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class DirectorySettings:
    # Unknown senders of tracked mail become contacts (source "auto"); otherwise their
    # address stays unresolved on the party record.
    create_unknown_contacts: bool = False


@dataclass(frozen=True)
class ThreadingSettings:
    # The tracking token in subjects; {number} is the id of the email replied to.
    token_format: str = "[CRM:{number:07d}]"
    smart_match: bool = True
    smart_match_days: int = 30


@dataclass(frozen=True)
class AttachmentSettings:
    store: Literal["filesystem", "database"] = "filesystem"
    path: str = "var/attachments"  # relative to the working directory, like the SQLite file
    max_bytes: int = 25 * 1024 * 1024
    blocked_extensions: tuple[str, ...] = DEFAULT_BLOCKED_EXTENSIONS


@dataclass(frozen=True)
class RuleConditions:
    """Every condition set must hold; unset conditions match anything."""

    queue: str | None = None  # a queue name, or "*" for any queue
    user: str | None = None  # a user name, or "*" for any user
    sender: SenderCondition = "any"
    subject: str | None = None  # regular expression, searched case-insensitively
    body: str | None = None
    thread: ThreadCondition = "any"
    auto_reply: bool | None = None


@dataclass(frozen=True)
class RuleActions:
    create_case: bool = False
    link_case: bool = False  # to the case of the thread; with create_case: link, else create
    priority: str | None = None
    owner: str | None = None
    suppress: bool = False  # no records: the delivery is kept untracked with the rule's name


@dataclass(frozen=True)
class RuleSettings:
    name: str
    when: RuleConditions = RuleConditions()
    then: RuleActions = RuleActions()


@dataclass(frozen=True)
class FleetSettings:
    """How ingest processes share the mailboxes (leases in the database) and treat failures."""

    # A poller renews its leases every lease_seconds/3; a dead poller's mailboxes are free
    # to take over lease_seconds after its last renewal.
    lease_seconds: float = 60.0
    # Mailboxes polled at the same time by one process (threads).
    concurrency: int = 8
    # At most this many IDLE sessions held by one process.
    max_push: int = 50
    # Back-off after failures: interval * 2^(failures-1), capped, with +-20 % jitter.
    max_backoff: float = 900.0
    # More UIDVALIDITY resets than this within a day disables the mailbox.
    max_uidvalidity_resets: int = 3


@dataclass(frozen=True)
class SecretSettings:
    """Fernet keys for ``enc:`` values: comma-separated, newest first, or in a file."""

    keys: Secret | None = field(default=None, repr=False)
    key_file: str | None = None


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = BrokerSettings()
    database: DatabaseSettings = DatabaseSettings()
    retry: RetrySettings = RetrySettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
    servers: tuple[ServerProfile, ...] = ()
    mailboxes: tuple[MailboxSettings, ...] = ()
    users: tuple[PrincipalSettings, ...] = ()
    queues: tuple[PrincipalSettings, ...] = ()
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"
    contacts: tuple[ContactSettings, ...] = ()
    accounts: tuple[AccountSettings, ...] = ()
    directory: DirectorySettings = DirectorySettings()
    threading: ThreadingSettings = ThreadingSettings()
    attachments: AttachmentSettings = AttachmentSettings()
    rules: tuple[RuleSettings, ...] = ()
    fleet: FleetSettings = FleetSettings()
    secrets: SecretSettings = SecretSettings()
    rule_servers: tuple[RuleServerSettings, ...] = ()
    canaries: CanarySettings = CanarySettings()
    web: WebSettings = WebSettings()

    def interval_of(self, box: MailboxSettings) -> float:
        """The mailbox's own interval, else its server profile's, else 60 s."""
        if box.interval is not None:
            return box.interval
        if box.server:
            for profile in self.servers:
                if profile.name == box.server and profile.interval is not None:
                    return profile.interval
        return DEFAULT_INTERVAL

    def server(self, name: str) -> ServerProfile:
        for profile in self.servers:
            if profile.name == name:
                return profile
        raise ConfigError(f"servers: no server profile named {name!r}")

    def rule_server(self, name: str) -> RuleServerSettings:
        for server in self.rule_servers:
            if server.name == name:
                return server
        raise ConfigError(f"rule_servers: no rule server named {name!r}")

    def mailbox(self, name: str) -> MailboxSettings:
        for box in self.mailboxes:
            if box.name == name:
                return box
        raise ConfigError(f"mailboxes: no mailbox named {name!r}")


def load_settings(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (YAML; None means embedded defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        base_dir = Path(path).resolve().parent
    else:
        base_dir = Path.cwd()
    _apply_env_overrides(data, os.environ if environ is None else environ)
    _forward_mailbox_defaults(data)
    settings = _build(Settings, data, "")
    settings = _resolve_paths(settings, base_dir)
    settings = _decrypt_secrets(settings)
    _validate(settings)
    return settings


def _apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX):].split("__")]
        target = data
        for part in path[:-1]:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            target = node
        target[path[-1]] = yaml.safe_load(raw) if raw != "" else ""


def _forward_mailbox_defaults(data: dict[str, Any]) -> None:
    """A forward mailbox whose ``after`` is not given deletes each envelope (as Dynamics)."""
    for box in data.get("mailboxes") or ():
        if isinstance(box, dict) and box.get("forward") is True and "after" not in box:
            box["after"] = "delete"


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'configuration'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'configuration'}: unknown key(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'configuration'}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if hint is Secret:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string")
        return Secret(str(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if (isinstance(hint, type) and not isinstance(value, hint)) or (
        hint is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _resolve_paths(settings: Settings, base_dir: Path) -> Settings:
    """Make Maildir paths relative to the configuration file's folder absolute."""
    boxes = tuple(
        dataclasses.replace(box, path=str((base_dir / box.path).resolve()))
        if box.path and not os.path.isabs(box.path)
        else box
        for box in settings.mailboxes
    )
    return dataclasses.replace(settings, mailboxes=boxes)


def _decrypt_secrets(settings: Settings) -> Settings:
    """Replace every ``enc:`` password with its decrypted text (still a Secret)."""
    encrypted = [b.password for b in settings.mailboxes if b.password and b.password.is_encrypted]
    encrypted += [p.master_password for p in settings.servers
                  if p.master_password and p.master_password.is_encrypted]
    encrypted += [secret for r in settings.rule_servers
                  for secret in (r.admin_password, r.client_secret)
                  if secret and secret.is_encrypted]
    if settings.web.admin_token and settings.web.admin_token.is_encrypted:
        encrypted.append(settings.web.admin_token)
    encrypted += [u.rule.password for u in settings.users
                  if u.rule and u.rule.password and u.rule.password.is_encrypted]
    if settings.canaries.password and settings.canaries.password.is_encrypted:
        encrypted.append(settings.canaries.password)
    if not encrypted:
        return settings
    try:
        keyring = Keyring.load(settings.secrets.keys, settings.secrets.key_file)
    except SecretError as exc:
        raise ConfigError(f"secrets: {exc}") from None

    def opened(value: Secret | None, where: str) -> Secret | None:
        if value is None or not value.is_encrypted:
            return value
        try:
            return Secret(keyring.decrypt(value.reveal()))
        except SecretError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    boxes = tuple(dataclasses.replace(b, password=opened(b.password, f"mailboxes.{b.name}"
                                                                      ".password"))
                  for b in settings.mailboxes)
    servers = tuple(dataclasses.replace(p, master_password=opened(
        p.master_password, f"servers.{p.name}.master_password")) for p in settings.servers)
    rule_servers = tuple(dataclasses.replace(
        r, admin_password=opened(r.admin_password, f"rule_servers.{r.name}.admin_password"),
        client_secret=opened(r.client_secret, f"rule_servers.{r.name}.client_secret"))
        for r in settings.rule_servers)
    users = tuple(u if u.rule is None else dataclasses.replace(u, rule=dataclasses.replace(
        u.rule, password=opened(u.rule.password, f"users.{u.name}.rule.password")))
        for u in settings.users)
    web = dataclasses.replace(settings.web, admin_token=opened(settings.web.admin_token,
                                                               "web.admin_token"))
    canaries = dataclasses.replace(settings.canaries, password=opened(
        settings.canaries.password, "canaries.password"))
    return dataclasses.replace(settings, mailboxes=boxes, servers=servers,
                               rule_servers=rule_servers, users=users, web=web,
                               canaries=canaries)


def _validate(settings: Settings) -> None:
    if settings.retry.startup_wait < 0:
        raise ConfigError(f"retry.startup_wait: {settings.retry.startup_wait} must be 0 or "
                          "more (seconds; 0 fails at once)")
    if settings.broker.prefetch < 1 or settings.broker.read_ahead_bytes < 1:
        raise ConfigError("broker: prefetch and read_ahead_bytes must be at least 1")
    journal = settings.broker.journal
    if not re.fullmatch(r"[1-9][0-9]*[YMDhms]", journal.max_age):
        raise ConfigError(f"broker.journal.max_age: {journal.max_age!r} is not a number "
                          "followed by one of Y M D h m s (e.g. 7D)")
    if journal.max_length_bytes <= 0 or journal.segment_size_bytes <= 0:
        raise ConfigError("broker.journal: max_length_bytes and segment_size_bytes must be "
                          "positive")
    names = [b.name for b in settings.mailboxes]
    for name in {n for n in names if names.count(n) > 1}:
        raise ConfigError(f"mailboxes: the name {name!r} is used twice")
    server_names = {s.name for s in settings.servers}
    profiles = {s.name: s for s in settings.servers}
    for server in settings.servers:
        if server.interval is not None and server.interval <= 0:
            raise ConfigError(f"servers.{server.name}.interval: must be positive")
        if server.master_user and not server.master_password:
            raise ConfigError(f"servers.{server.name}.master_password: a master_user needs it")
        if server.idle_refresh <= 0 or server.idle_refresh >= 29 * 60:
            raise ConfigError(f"servers.{server.name}.idle_refresh: must be under 29 minutes")
        if server.max_connections < 1:
            raise ConfigError(f"servers.{server.name}.max_connections: must be at least 1")
    for box in settings.mailboxes:
        profile = profiles.get(box.server or "")
        if profile is not None and profile.auth == "xoauth2" and not (
                box.oauth2_token_command or box.oauth2_token_file
                or profile.oauth2_token_command or profile.oauth2_token_file):
            raise ConfigError(f"mailboxes.{box.name}: auth xoauth2 needs oauth2_token_command "
                              "or oauth2_token_file (on the mailbox or its server)")
        where = f"mailboxes.{box.name}"
        if box.kind in ("imap", "pop3"):
            if box.server not in server_names:
                raise ConfigError(f"{where}.server: no server profile named {box.server!r}")
            if not box.username:
                raise ConfigError(f"{where}.username: an IMAP mailbox needs a username")
        if box.kind == "pop3" and box.after == "move":
            raise ConfigError(f"{where}.after: POP3 has no folders; use keep, seen or delete")
        if box.push and box.kind != "imap":
            raise ConfigError(f"{where}.push: IDLE needs an IMAP mailbox")
        if box.since is not None:
            try:
                date.fromisoformat(box.since)
            except ValueError:
                raise ConfigError(f"{where}.since: {box.since!r} is not a date (YYYY-MM-DD)") \
                    from None
        if box.kind == "maildir" and not box.path:
            raise ConfigError(f"{where}.path: a Maildir mailbox needs a path")
        if box.kind == "maildir" and box.after == "move":
            raise ConfigError(f"{where}.after: move is for IMAP folders; a Maildir takes "
                              "keep, seen or delete")
        if (box.interval is not None and box.interval <= 0) or box.batch_size <= 0 \
                or box.batch_bytes <= 0:
            raise ConfigError(f"{where}: interval, batch_size and batch_bytes must be positive")
        if box.after == "move" and not box.move_to:
            raise ConfigError(f"{where}.move_to: after=move needs a folder to move to")
        if box.require_proof and not box.authserv_id:
            raise ConfigError(f"{where}.authserv_id: require_proof needs the authserv-id of "
                              "the server whose Authentication-Results are trusted")
        if not box.forward and (box.require_proof or box.authserv_id):
            raise ConfigError(f"{where}: authserv_id and require_proof are for forward mailboxes")
    limits = settings.limits
    if limits.forward_depth < 1 or limits.parse_seconds <= 0:
        raise ConfigError("limits: forward_depth must be at least 1 and parse_seconds positive")
    by_name = {b.name: b for b in settings.mailboxes}
    seen: set[str] = set()
    for kind, principals in (("users", settings.users), ("queues", settings.queues)):
        for p in principals:
            where = f"{kind}.{p.name}"
            if (p.mailbox is None) == (p.forward is None):
                raise ConfigError(f"{where}: set exactly one of mailbox or forward")
            if "@" not in p.address:
                raise ConfigError(f"{where}.address: {p.address!r} is not an email address")
            if p.address.lower() in seen:
                raise ConfigError(f"{where}.address: {p.address} is used by another user or queue")
            seen.add(p.address.lower())
            if p.track not in TRACK_MODES:
                raise ConfigError(f"{where}.track: {p.track!r} is not one of "
                                  f"{', '.join(TRACK_MODES)}")
            if p.mailbox is not None:
                own = by_name.get(p.mailbox)
                if own is None or own.forward:
                    raise ConfigError(f"{where}.mailbox: no direct mailbox named {p.mailbox!r}")
            if p.forward is not None:
                forward = by_name.get(p.forward)
                if forward is None or not forward.forward:
                    raise ConfigError(f"{where}.forward: no forward mailbox named {p.forward!r}")
    _validate_forwarding_rules(settings)
    _validate_records(settings)
    _validate_web(settings.web)


MIN_ADMIN_TOKEN_LENGTH = 16


def _validate_web(web: WebSettings) -> None:
    if not 0 <= web.port <= 65535:
        raise ConfigError(f"web.port: {web.port} is not a TCP port (0-65535; 0 takes any "
                          "free port)")
    if not web.host:
        raise ConfigError("web.host: an address to listen on is needed (e.g. 127.0.0.1)")
    if web.admin_token is not None and len(web.admin_token.reveal()) < MIN_ADMIN_TOKEN_LENGTH:
        raise ConfigError(f"web.admin_token: must be at least {MIN_ADMIN_TOKEN_LENGTH} "
                          "characters (make one with `python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(24))'`)")
    for url in web.metrics_urls:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ConfigError(f"web.metrics_urls: {url!r} is not an http(s) URL")


def _validate_forwarding_rules(settings: Settings) -> None:
    """Rule servers, each user's ``rule`` and the canaries (``mailroute rules``, canaries)."""
    kinds = {}
    for server in settings.rule_servers:
        where = f"rule_servers.{server.name}"
        if server.name in kinds:
            raise ConfigError(f"rule_servers: the name {server.name!r} is used twice")
        kinds[server.name] = server.kind
        if server.kind == "managesieve":
            if not server.host:
                raise ConfigError(f"{where}.host: a ManageSieve server needs a host")
            if server.admin_user and not server.admin_password:
                raise ConfigError(f"{where}.admin_password: an admin_user needs it")
        else:
            missing = [k for k in ("tenant_id", "client_id", "client_secret")
                       if not getattr(server, k)]
            if missing:
                raise ConfigError(f"{where}: a graph rule server needs {', '.join(missing)}")
        if server.timeout <= 0:
            raise ConfigError(f"{where}.timeout: must be positive")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", server.rule_name):
            raise ConfigError(f"{where}.rule_name: {server.rule_name!r} must be letters, "
                              "digits, '.', '_' or '-' (at most 64)")
    queues = {q.name for q in settings.queues}
    for user in (*settings.users, *settings.queues):
        if user.rule is None:
            continue
        where = f"{'queues' if user.name in queues else 'users'}.{user.name}.rule"
        if user.forward is None:
            raise ConfigError(f"{where}: a forwarding rule is for principals with forward")
        kind = kinds.get(user.rule.server)
        if kind is None:
            raise ConfigError(f"{where}.server: no rule server named {user.rule.server!r}")
        if kind == "managesieve" and not settings.rule_server(user.rule.server).admin_user \
                and not user.rule.password:
            raise ConfigError(f"{where}.password: rule server {user.rule.server!r} has no "
                              "admin_user, so the user's own password is needed")
    canaries = settings.canaries
    if canaries.interval <= 0 or canaries.deadline <= 0:
        raise ConfigError("canaries: interval and deadline must be positive")
    if canaries.enabled:
        if not canaries.delivery_url or not re.fullmatch(
                r"(smtp|smtps|lmtp)://[^/:]+(:\d+)?/?", canaries.delivery_url):
            raise ConfigError("canaries.delivery_url: canaries need smtp://host:port, "
                              "smtps://host:port or lmtp://host:port")
        if "@" not in canaries.sender:
            raise ConfigError(f"canaries.sender: {canaries.sender!r} is not an email address")
    if (canaries.username is None) != (canaries.password is None):
        raise ConfigError("canaries: username and password go together (SMTP AUTH)")
    if canaries.username is not None and (canaries.delivery_url or "").startswith("lmtp:"):
        raise ConfigError("canaries.username: LMTP has no login; use smtp:// or smtps:// "
                          "to log in")


def _validate_records(settings: Settings) -> None:
    """Contacts, accounts, threading, attachments and rules (route and persist rely on them)."""
    accounts = {a.name for a in settings.accounts}
    for c in settings.contacts:
        if c.account is not None and c.account not in accounts:
            raise ConfigError(f"contacts.{c.name}.account: no account named {c.account!r}")
        for address in c.addresses:
            if address.count("@") != 1:
                raise ConfigError(f"contacts.{c.name}.addresses: {address!r} is not an address")
    token = settings.threading.token_format
    try:
        token.format(number=1)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"threading.token_format: {token!r} must hold one {{number}} "
                          f"field ({exc})") from exc
    if token.count("{number") != 1:
        raise ConfigError(f"threading.token_format: {token!r} must hold one {{number}} field")
    if settings.attachments.max_bytes <= 0:
        raise ConfigError("attachments.max_bytes: must be positive")
    names = {"queue": {q.name for q in settings.queues}, "user": {u.name for u in settings.users}}
    for rule in settings.rules:
        where = f"rules.{rule.name}"
        for kind, known in names.items():
            wanted = getattr(rule.when, kind)
            if wanted not in (None, "*") and wanted not in known:
                raise ConfigError(f"{where}.when.{kind}: no {kind} named {wanted!r}")
        for key in ("subject", "body"):
            pattern = getattr(rule.when, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{where}.when.{key}: bad regular expression: {exc}") \
                        from exc
