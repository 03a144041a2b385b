"""Exchange Online forwarding rules through Microsoft Graph, against a local tenant stand-in.

``ingest.graph_rules.GraphBackend`` talks HTTP to ``tests.graph_standin.GraphStandIn`` (a real
HTTP server that answers as Graph and the identity platform document): install, inspect and
remove; the user's own rules left alone; the token cached, renewed and refreshed on a 401;
429 retried as Retry-After says; 403, 404, a wrong secret and an unreachable server as
errors that name the problem and never the secret or the token.  With canaries on, a second
rule deletes the canaries once forwarded, so that none stays in the inbox or reaches the
user's own rules; the stand-in evaluates its conditions.  The configurations are
YAML under pytest's base temporary directory, so the whole-run secret scan
(tests/secret_scan.py) looks for the client secrets in every log and output.  Last, mail
flows through the stand-in's rules into a Dovecot forward mailbox, and the pipeline (real
RabbitMQ and PostgreSQL) makes records for the users whose rules forwarded it.
"""

from __future__ import annotations

import dataclasses
import email
import email.message
import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ingest.canary import build_canary, new_canary_id
from ingest.forwarding_rules import RuleError, RuleTarget, rule_targets
from ingest.graph_rules import MAX_RETRIES, GraphBackend, token_scope
from persist.canaries import Canary
from shared.cli import main
from shared.settings import Settings, load_settings
from tests import mailgen
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.graph_standin import GraphStandIn
from tests.processes import Workers, wait_for
from tests.test_forward_integration import deliveries
from tests.tls import self_signed_certificate

pytest_plugins = ["tests.db_fixtures"]

FORWARD = "forward@corp.example.com"
SECRET = "Qx7~stand-in-app-secret-1f2e"   # what the stand-in's app registration holds
USERS = {"bob": "bob@corp.example.com", "carol": "carol@corp.example.com"}
OWN_RULE = {  # a rule bob made in Outlook: must survive install and remove untouched
    "displayName": "Newsletters", "sequence": 1, "isEnabled": True,
    "conditions": {"senderContains": ["news@"]},
    "actions": {"moveToFolder": "AAMkNewsletters", "stopProcessingRules": True}}


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Everything logged is captured, and so scanned for the secrets.
    caplog.set_level(logging.DEBUG)


def scanned_tokens(folder: Path) -> Any:
    """Writes the tokens issued where the secret scan reads them (``*token*`` keys)."""
    def write(tokens: list[str]) -> None:
        (folder / "issued-tokens.yaml").write_text(yaml.safe_dump(
            {f"access_token_{i}": token for i, token in enumerate(tokens)}))
    return write


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[GraphStandIn]:
    server = GraphStandIn(client_secret=SECRET, on_token=scanned_tokens(tmp_path))
    for address in USERS.values():
        server.add_user(address)
    # The stand-in's own secret is in a YAML file under basetemp: the secret scan knows it.
    (tmp_path / "standin.yaml").write_text(yaml.safe_dump({"client_secret": SECRET}))
    with server:
        yield server


def write_config(path: Path, standin: GraphStandIn, canaries: dict[str, Any] | None = None,
                 **server: Any) -> Settings:
    config: dict[str, Any] = {
        "mailboxes": [{"name": "forward", "kind": "maildir", "path": str(path.parent / "fwd"),
                       "forward": True, "address": FORWARD}],
        "rule_servers": [{
            "name": "m365", "kind": "graph", "tenant_id": standin.tenant_id,
            "client_id": standin.client_id, "client_secret": SECRET,
            "authority_url": standin.authority_url, "graph_url": standin.graph_url,
            "timeout": 5, **server}],
        "users": [{"name": name, "address": address, "forward": "forward",
                   "rule": {"server": "m365"}} for name, address in USERS.items()],
    }
    if canaries is not None:
        config["canaries"] = canaries
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


def test_mailroute_rules_deploys_checks_and_removes_graph_rules(
        tmp_path: Path, standin: GraphStandIn) -> None:
    """The same command as for ManageSieve: a report per user and the exit status."""
    config = tmp_path / "mailroute.yaml"
    write_config(config, standin)
    standin.add_rule(USERS["bob"], OWN_RULE)

    def rules(*args: str) -> Any:
        return CliRunner().invoke(main, ["-c", str(config), "rules", *args],
                                  catch_exceptions=False)

    planned = rules("deploy", "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert standin.rules(USERS["carol"]) == []
    first = rules("deploy")
    assert first.exit_code == 0, first.output
    assert [line.split()[:3] for line in first.output.splitlines()
            if line.startswith(("bob", "carol"))] == [["bob", "m365", "created"],
                                                      ["carol", "m365", "created"]]
    assert rules("check").exit_code == 0
    standin.user(USERS["carol"]).rules[0]["isEnabled"] = False  # turned off in Outlook
    audit = rules("check")
    assert audit.exit_code == 1 and "differs" in audit.output
    assert rules("deploy").exit_code == 0 and rules("check").exit_code == 0
    gone = rules("remove")
    assert gone.exit_code == 0 and "2 removed" in gone.output
    assert [r["displayName"] for r in standin.rules(USERS["bob"])] == ["Newsletters"]
    assert SECRET not in first.output + audit.output + gone.output


class Sleeps(list[float]):
    """Records the backend's waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def settings(tmp_path: Path, standin: GraphStandIn) -> Settings:
    return write_config(tmp_path / "mailroute.yaml", standin)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def backend(settings: Settings, sleeps: Sleeps) -> Iterator[GraphBackend]:
    with GraphBackend(settings.rule_server("m365"), sleep=sleeps) as graph:
        yield graph


@pytest.fixture
def targets(settings: Settings) -> dict[str, RuleTarget]:
    return {t.principal: t for t in rule_targets(settings)}


def failure(call: Any, *args: Any) -> str:
    with pytest.raises(RuleError) as caught:
        call(*args)
    message = str(caught.value)
    print(message)  # captured, so the secret scan reads it too
    assert SECRET not in message
    return message


def no_tokens_in(standin: GraphStandIn, text: str) -> None:
    assert not any(token in text for token in standin.issued)


# ---- install, inspect, remove ---------------------------------------------------------


def test_install_inspect_and_remove(standin: GraphStandIn, backend: GraphBackend,
                                    targets: dict[str, RuleTarget]) -> None:
    bob = targets["bob"]
    assert backend.inspect(bob).state == "missing"
    backend.install(bob)
    [rule] = standin.rules("bob@corp.example.com")
    assert rule["displayName"] == "mailroute-forward"
    assert rule["isEnabled"] is True and rule["sequence"] == 1 and rule["conditions"] == {}
    assert rule["actions"] == {"forwardAsAttachmentTo": [{"emailAddress": {"address": FORWARD}}],
                               "stopProcessingRules": False}
    found = backend.inspect(bob)
    assert (found.state, FORWARD in found.detail) == ("present", True)
    assert backend.inspect(targets["carol"]).state == "missing"

    assert backend.remove(bob) is True
    assert standin.rules("bob@corp.example.com") == []
    assert backend.inspect(bob).state == "missing"
    assert backend.remove(bob) is False


def test_install_twice_leaves_one_rule_and_writes_nothing_the_second_time(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    backend.install(targets["bob"])
    writes = len([r for r in standin.graph_requests() if r.method != "GET"])
    backend.install(targets["bob"])
    assert len(standin.rules("bob@corp.example.com")) == 1
    assert len([r for r in standin.graph_requests() if r.method != "GET"]) == writes == 1


def test_the_users_own_rules_are_left_as_they_were(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    bob = targets["bob"]
    standin.add_rule(bob.login, OWN_RULE)
    before = standin.rules(bob.login)
    backend.install(bob)
    after = standin.rules(bob.login)
    # First, before the rule that stops processing (Exchange moves that one to 2).
    assert [r["displayName"] for r in after] == ["mailroute-forward", "Newsletters"]
    assert after[1] == {**before[0], "sequence": 2}
    assert backend.remove(bob) is True
    assert standin.rules(bob.login) == before
    # Only mailroute's rule was ever written to.
    assert all(r.path.endswith("/messageRules") or "mailroute" not in r.path
               for r in standin.graph_requests())
    own_id = before[0]["id"]
    assert not any(r.method in ("PATCH", "DELETE") and r.path.endswith(
        own_id.replace("/", "%2F").replace("+", "%2B")) for r in standin.graph_requests())


BROKEN: dict[str, tuple[dict[str, Any], str, str]] = {
    "disabled": ({"isEnabled": False}, "disabled", "PATCH"),
    "elsewhere": ({"actions": {"forwardAsAttachmentTo": [
        {"emailAddress": {"address": "mallory@evil.example"}}]}},
        "instead of forward@corp.example.com", "PATCH"),
    "stops": ({"actions": {"stopProcessingRules": True}}, "stops the user's other rules",
              "PATCH"),
    "conditions": ({"conditions": {"subjectContains": ["invoice"]}},
                   "has conditions (subjectContains)", "POST"),
    "redirects": ({"actions": {"redirectTo": [
        {"emailAddress": {"address": "mallory@evil.example"}}]}},
        "also has actions redirectTo", "POST"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_changed_rule_differs_and_install_mends_it(
        case: str, standin: GraphStandIn, backend: GraphBackend,
        targets: dict[str, RuleTarget]) -> None:
    change, detail, mended_by = BROKEN[case]
    bob = targets["bob"]
    standin.add_rule(bob.login, OWN_RULE)
    backend.install(bob)
    rule = next(r for r in standin.user(bob.login).rules
                if r["displayName"] == "mailroute-forward")
    for name, value in change.items():  # the user (or an attacker) changes it in Outlook
        rule[name] = {**rule[name], **value} if isinstance(value, dict) else value
    found = backend.inspect(bob)
    assert found.state == "differs" and detail in found.detail
    written = len(standin.graph_requests())
    backend.install(bob)
    assert backend.inspect(bob).state == "present"
    assert mended_by in [r.method for r in standin.graph_requests()[written:]]
    assert [r["displayName"] for r in standin.rules(bob.login)] == [
        "mailroute-forward", "Newsletters"]


def test_two_rules_of_mailroutes_are_made_one(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    bob = targets["bob"]
    backend.install(bob)
    standin.add_rule(bob.login, {"displayName": "mailroute-forward", "isEnabled": False,
                                 "actions": {"forwardTo": [{"emailAddress": {
                                     "address": FORWARD}}]}})
    found = backend.inspect(bob)
    assert (found.state, found.detail) == ("differs", "2 inbox rules named 'mailroute-forward'")
    backend.install(bob)
    assert len(standin.rules(bob.login)) == 1
    assert backend.inspect(bob).state == "present"
    assert backend.remove(bob) is True and standin.rules(bob.login) == []


def test_user_ids_and_rule_ids_are_url_encoded(tmp_path: Path, standin: GraphStandIn,
                                               backend: GraphBackend,
                                               targets: dict[str, RuleTarget]) -> None:
    guest = "dana_partner.example#EXT#@corp.onmicrosoft.com"
    dollar = "$adele@corp.example.com"
    for login in (guest, dollar):
        standin.add_user(login)
        target = RuleTarget(principal="x", address=login, login=login, password=None,
                            forward_address=FORWARD, server=targets["bob"].server)
        backend.install(target)
        assert backend.inspect(target).state == "present"
        assert backend.remove(target) is True
    paths = [r.path for r in standin.graph_requests()]
    assert any("/users/dana_partner.example%23EXT%23@corp.onmicrosoft.com/" in p for p in paths)
    assert any("/users('%24adele@corp.example.com')/" in p for p in paths)
    # The stand-in's rule ids hold '+' and '/', which must not split the path.
    deletes = [p for p, r in zip(paths, standin.graph_requests(), strict=True)
               if r.method == "DELETE"]
    assert deletes and all("%2B%2F" in p for p in deletes)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("graph-tls"))
    return str(cert), str(key)


def test_tls_is_verified_against_ca_file_unless_told_not_to(
        tmp_path: Path, certificate: tuple[str, str], targets: dict[str, RuleTarget]) -> None:
    with GraphStandIn(client_secret=SECRET, tls=certificate,
                      on_token=scanned_tokens(tmp_path)) as standin:
        standin.add_user("bob@corp.example.com")
        assert standin.graph_url.startswith("https://")
        for name, options, works in (("ca", {"ca_file": certificate[0]}, True),
                                     ("system", {}, False),
                                     ("unverified", {"verify_tls": False}, True)):
            settings = write_config(tmp_path / f"{name}.yaml", standin, **options)
            with GraphBackend(settings.rule_server("m365")) as backend:
                if works:
                    assert backend.inspect(targets["bob"]).state == "missing"
                else:
                    message = failure(backend.inspect, targets["bob"])
                    assert "cannot reach the Microsoft identity platform" in message
                    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert len(standin.issued) == 2


# ---- canaries ------------------------------------------------------------------------

CANARY_SENDER = "mailroute-canary@ops.corp.example.com"
CANARY_RULE = "mailroute-forward-canaries"
ARCHIVE_ALL = {  # a rule of bob's without conditions: it would act on every message
    "displayName": "Archive everything", "isEnabled": True,
    "actions": {"copyToFolder": "AAMkArchive", "markImportance": "low"}}


def with_canaries(target: RuleTarget) -> RuleTarget:
    return dataclasses.replace(target, canary_sender=CANARY_SENDER)


def a_canary(address: str) -> bytes:
    """A canary as ``ingest.canary`` builds it (From "mailroute canary <sender>", the header)."""
    now = datetime.now(UTC)
    return build_canary(Canary(
        id=new_canary_id(), principal_kind="user", principal=address.partition("@")[0],
        address=address, forward_mailbox="forward", sent_at=now,
        deadline_at=now + timedelta(minutes=15), seen_at=None, outcome="sent", detail=None),
        CANARY_SENDER)


def names(standin: GraphStandIn, login: str) -> list[str]:
    return [r["displayName"] for r in standin.rules(login)]


def test_canaries_are_forwarded_then_deleted_before_the_users_own_rules(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    bob = with_canaries(targets["bob"])
    standin.add_rule(bob.login, OWN_RULE)
    standin.add_rule(bob.login, ARCHIVE_ALL)
    own = standin.rules(bob.login)
    assert backend.inspect(bob).state == "missing"
    backend.install(bob)
    assert names(standin, bob.login) == ["mailroute-forward", CANARY_RULE, "Newsletters",
                                         "Archive everything"]
    rule = standin.rules(bob.login)[1]
    assert rule["conditions"] == {
        "headerContains": ["X-Mailroute-Canary"],
        "fromAddresses": [{"emailAddress": {"address": CANARY_SENDER}}]}
    assert rule["actions"] == {"markAsRead": True, "delete": True, "stopProcessingRules": True}
    assert rule["isEnabled"] is True
    # The user's own rules are as they were, two places further down.
    assert standin.rules(bob.login)[2:] == [{**r, "sequence": r["sequence"] + 2} for r in own]
    found = backend.inspect(bob)
    assert found.state == "present" and CANARY_RULE in found.detail
    writes = len([r for r in standin.graph_requests() if r.method != "GET"])
    backend.install(bob)
    assert len([r for r in standin.graph_requests() if r.method != "GET"]) == writes == 2

    canary = a_canary(bob.address)
    forged = b"X-Mailroute-Canary: c4n4ry-1d-0f-22-chars\r\n" + mailgen.message(
        "someone@example.net", [bob.address], "about the project", ".",
        message_id="<forged@example.net>")
    from_sender = mailgen.message(CANARY_SENDER, [bob.address], "a word from operations",
                                  ".", message_id="<ops-1@corp.example.com>")
    sent = [standin.deliver(bob.login, raw) for raw in (canary, forged, from_sender)]
    # Each is forwarded once, as an attachment, to the forward mailbox.
    assert [[to for to, _ in each] for each in sent] == [[FORWARD], [FORWARD], [FORWARD]]
    user = standin.user(bob.login)
    assert user.deleted_items == [canary]               # not in the inbox
    assert user.inbox == [forged, from_sender]          # the header alone, or the From alone
    assert user.folders == {"AAMkArchive": [forged, from_sender]}
    canary_id = email.message_from_bytes(canary)["Message-ID"]
    assert [rule for message, rule in user.ran if message == canary_id] == [
        "mailroute-forward", CANARY_RULE]               # no rule of the user's saw it
    assert [rule for message, rule in user.ran if message == "<forged@example.net>"] == [
        "mailroute-forward", "Archive everything"]


CANARY_BROKEN: dict[str, tuple[Any, str, str]] = {
    "deleted": (None, f"no inbox rule named {CANARY_RULE!r}", "POST"),
    "disabled": ({"isEnabled": False}, "disabled", "PATCH"),
    "another sender": ({"conditions": {"fromAddresses": [
        {"emailAddress": {"address": "someone@example.net"}}]}},
        "fromAddresses is someone@example.net", "PATCH"),
    "no header": ({"conditions": {"headerContains": []}}, "headerContains is empty", "PATCH"),
    "keeps them": ({"actions": {"delete": False}}, "does not delete the canaries", "PATCH"),
    "permanent": ({"actions": {"permanentDelete": True}}, "also has actions permanentDelete",
                  "POST"),
    "exceptions": ({"exceptions": {"subjectContains": ["canary"]}},
                   "has exceptions (subjectContains)", "POST"),
    "first": ({"sequence": 0}, "runs before 'mailroute-forward'", "POST"),
    "after the user's": ({"sequence": 5}, "'Newsletters' run between them", "POST"),
}


@pytest.mark.parametrize("case", sorted(CANARY_BROKEN))
def test_a_changed_canary_rule_differs_and_install_mends_it(
        case: str, standin: GraphStandIn, backend: GraphBackend,
        targets: dict[str, RuleTarget]) -> None:
    change, detail, mended_by = CANARY_BROKEN[case]
    bob = with_canaries(targets["bob"])
    standin.add_rule(bob.login, OWN_RULE)
    backend.install(bob)
    user = standin.user(bob.login)
    rule = next(r for r in user.rules if r["displayName"] == CANARY_RULE)
    if change is None:
        user.rules.remove(rule)
    for name, value in (change or {}).items():  # changed in Outlook
        rule[name] = {**rule.get(name, {}), **value} if isinstance(value, dict) else value
    found = backend.inspect(bob)
    assert found.state == "differs" and detail in found.detail, found.detail
    written = len(standin.graph_requests())
    backend.install(bob)
    assert backend.inspect(bob).state == "present"
    assert mended_by in [r.method for r in standin.graph_requests()[written:]]
    assert names(standin, bob.login) == ["mailroute-forward", CANARY_RULE, "Newsletters"]
    canary = a_canary(bob.address)
    assert [to for to, _ in standin.deliver(bob.login, canary)] == [FORWARD]
    assert user.deleted_items == [canary] and user.inbox == []


def test_a_canary_rule_left_when_canaries_are_off_differs_and_install_deletes_it(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    bob = targets["bob"]
    assert bob.canary_sender is None
    backend.install(with_canaries(bob))
    found = backend.inspect(bob)
    assert found.state == "differs" and "canaries are off" in found.detail
    backend.install(bob)
    assert names(standin, bob.login) == ["mailroute-forward"]
    assert backend.inspect(bob).state == "present"
    # And the other way: a plain rule lacks the canary rule once canaries are on.
    found = backend.inspect(with_canaries(bob))
    assert found.state == "differs" and "canaries would stay in the inbox" in found.detail


def test_remove_deletes_both_rules_and_a_canary_rule_alone_is_not_missing(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    bob = with_canaries(targets["bob"])
    standin.add_rule(bob.login, OWN_RULE)
    backend.install(bob)
    assert backend.remove(targets["bob"]) is True   # whether canaries are on or not
    assert names(standin, bob.login) == ["Newsletters"]
    assert backend.remove(bob) is False
    backend.install(bob)
    user = standin.user(bob.login)
    user.rules.remove(next(r for r in user.rules if r["displayName"] == "mailroute-forward"))
    found = backend.inspect(bob)   # canaries deleted unforwarded: not "missing", "differs"
    assert found.state == "differs" and "no inbox rule named 'mailroute-forward'" in found.detail
    assert backend.remove(bob) is True and names(standin, bob.login) == ["Newsletters"]


def test_mailroute_rules_with_canaries_on_keeps_both_rules(
        tmp_path: Path, standin: GraphStandIn) -> None:
    config = tmp_path / "mailroute.yaml"
    write_config(config, standin)

    def rules(*args: str) -> Any:
        return CliRunner().invoke(main, ["-c", str(config), "rules", *args],
                                  catch_exceptions=False)

    assert rules("deploy").exit_code == 0
    write_config(config, standin, canaries={
        "enabled": True, "delivery_url": "smtp://127.0.0.1:25", "sender": CANARY_SENDER})
    audit = rules("check")   # rules deployed before canaries were turned on
    assert audit.exit_code == 1 and "2 user(s): 2 differs" in audit.output, audit.output
    mended = rules("deploy")
    assert mended.exit_code == 0 and "2 changed" in mended.output, mended.output
    assert rules("check").exit_code == 0
    assert names(standin, USERS["carol"]) == ["mailroute-forward", CANARY_RULE]
    gone = rules("remove")
    assert gone.exit_code == 0 and "2 removed" in gone.output
    assert standin.rules(USERS["bob"]) == standin.rules(USERS["carol"]) == []


# ---- token ----------------------------------------------------------------------------


def test_the_token_is_asked_for_once_and_sent_as_bearer(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    for target in targets.values():
        backend.install(target)
        backend.inspect(target)
    [token_request] = standin.token_requests()
    assert token_request.path == f"/login/{standin.tenant_id}/oauth2/v2.0/token"
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = httpx.QueryParams(token_request.body.decode())
    assert dict(form) == {"grant_type": "client_credentials", "client_id": standin.client_id,
                          "client_secret": SECRET,
                          "scope": "https://graph.microsoft.com/.default"}
    [token] = standin.issued
    assert {r.headers["authorization"] for r in standin.graph_requests()} == {f"Bearer {token}"}
    assert not any(SECRET.encode() in r.body for r in standin.graph_requests())


def test_national_clouds_ask_for_their_own_graph_scope() -> None:
    assert token_scope("https://graph.microsoft.com/v1.0") == (
        "https://graph.microsoft.com/.default")
    assert token_scope("https://graph.microsoft.us/v1.0") == "https://graph.microsoft.us/.default"
    assert token_scope("http://127.0.0.1:8080/v1.0") == "https://graph.microsoft.com/.default"


def test_the_token_is_renewed_before_it_expires(settings: Settings,
                                                standin: GraphStandIn,
                                                targets: dict[str, RuleTarget]) -> None:
    now = [1000.0]
    with GraphBackend(settings.rule_server("m365"), clock=lambda: now[0]) as backend:
        backend.inspect(targets["bob"])
        now[0] += 3599 - 121   # still more than the margin left
        backend.inspect(targets["bob"])
        assert len(standin.issued) == 1
        now[0] += 2            # within two minutes of expiry
        backend.inspect(targets["bob"])
    assert len(standin.issued) == 2
    assert standin.graph_requests()[-1].headers["authorization"] == f"Bearer {standin.issued[1]}"


def test_a_401_fetches_a_fresh_token_once(standin: GraphStandIn, backend: GraphBackend,
                                          targets: dict[str, RuleTarget]) -> None:
    backend.install(targets["bob"])
    standin.revoke_tokens()   # e.g. revoked by the tenant before its time
    assert backend.inspect(targets["bob"]).state == "present"
    assert len(standin.issued) == 2
    statuses = [r.headers["authorization"] for r in standin.graph_requests()[-2:]]
    assert statuses == [f"Bearer {standin.issued[0]}", f"Bearer {standin.issued[1]}"]


def test_a_token_refused_even_when_fresh_is_an_error(
        standin: GraphStandIn, backend: GraphBackend, targets: dict[str, RuleTarget]) -> None:
    standin.token_lifetime = 0   # every token is already expired when Graph sees it
    message = failure(backend.inspect, targets["bob"])
    assert "refused the app's access token" in message and "InvalidAuthenticationToken" in message
    assert len(standin.token_requests()) == 2 and len(standin.graph_requests()) == 2
    no_tokens_in(standin, message)


def test_a_wrong_client_secret_is_named_without_the_secret(
        tmp_path: Path, standin: GraphStandIn, targets: dict[str, RuleTarget]) -> None:
    wrong = "Zz9~not-the-registered-secret"
    settings = write_config(tmp_path / "wrong.yaml", standin, client_secret=wrong)
    with GraphBackend(settings.rule_server("m365")) as backend:
        message = failure(backend.inspect, targets["bob"])
    assert "401 invalid_client" in message and "AADSTS7000215" in message
    assert "client_secret" in message and standin.tenant_id in message
    assert wrong not in message and standin.graph_requests() == []


def test_an_unknown_client_id_is_named(tmp_path: Path, standin: GraphStandIn,
                                       targets: dict[str, RuleTarget]) -> None:
    settings = write_config(tmp_path / "client.yaml", standin, client_id="no-such-app")
    with GraphBackend(settings.rule_server("m365")) as backend:
        message = failure(backend.inspect, targets["bob"])
    assert "unauthorized_client" in message and "AADSTS700016" in message
    assert "check client_id and tenant_id" in message


# ---- Graph's refusals -----------------------------------------------------------------


def test_throttling_is_retried_as_retry_after_says(
        standin: GraphStandIn, backend: GraphBackend, sleeps: Sleeps,
        targets: dict[str, RuleTarget]) -> None:
    standin.throttle(2, retry_after=7)
    backend.install(targets["bob"])
    assert sleeps == [7.0, 7.0]
    assert backend.inspect(targets["bob"]).state == "present"
    standin.throttle(1, retry_after=3600)   # a wait this long is cut short
    backend.inspect(targets["bob"])
    assert sleeps[-1] == 60.0


def test_throttling_that_does_not_stop_is_an_error(
        standin: GraphStandIn, backend: GraphBackend, sleeps: Sleeps,
        targets: dict[str, RuleTarget]) -> None:
    standin.throttle(100, retry_after=2)
    message = failure(backend.install, targets["bob"])
    assert "429 ApplicationThrottled" in message and f"after {MAX_RETRIES} retries" in message
    assert len(standin.graph_requests()) == MAX_RETRIES + 1 and sleeps == [2.0] * MAX_RETRIES
    assert standin.rules("bob@corp.example.com") == []


def test_a_missing_permission_is_named(standin: GraphStandIn, backend: GraphBackend,
                                       targets: dict[str, RuleTarget]) -> None:
    standin.deny_access = True
    for call in (backend.inspect, backend.install, backend.remove):
        message = failure(call, targets["bob"])
        assert "403 ErrorAccessDenied" in message
        assert "MailboxSettings.ReadWrite" in message and "bob@corp.example.com" in message
        no_tokens_in(standin, message)


def test_an_unknown_user_is_named(standin: GraphStandIn, backend: GraphBackend,
                                  targets: dict[str, RuleTarget]) -> None:
    target = RuleTarget(principal="erin", address="erin@corp.example.com",
                        login="erin@corp.example.com", password=None,
                        forward_address=FORWARD, server=targets["bob"].server)
    message = failure(backend.install, target)
    assert "user 'erin@corp.example.com' not found in tenant" in message
    assert "404 ErrorInvalidUser" in message


def test_an_unreadable_ca_file_is_named(tmp_path: Path, standin: GraphStandIn) -> None:
    settings = write_config(tmp_path / "ca.yaml", standin, ca_file=str(tmp_path / "no.pem"))
    with pytest.raises(RuleError, match=r"rule server m365: ca_file .*no\.pem"):
        GraphBackend(settings.rule_server("m365"))


def test_an_unreachable_server_is_named(tmp_path: Path, standin: GraphStandIn,
                                        targets: dict[str, RuleTarget]) -> None:
    with socket.socket() as sock:   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for where in ("authority_url", "graph_url"):
        options: dict[str, Any] = {where: closed}
        settings = write_config(tmp_path / f"{where}.yaml", standin, **options)
        with GraphBackend(settings.rule_server("m365")) as backend:
            message = failure(backend.inspect, targets["bob"])
        assert "cannot reach" in message and closed.removeprefix("http://") in message
        no_tokens_in(standin, message)


def test_the_standin_checks_request_bodies_as_graph_does(standin: GraphStandIn,
                                                         backend: GraphBackend,
                                                         targets: dict[str, RuleTarget]) -> None:
    backend.inspect(targets["bob"])   # a token for the raw requests below
    url = f"{standin.graph_url}/users/bob@corp.example.com/mailFolders/inbox/messageRules"
    auth = {"Authorization": f"Bearer {standin.issued[0]}"}
    forward = {"forwardAsAttachmentTo": [{"emailAddress": {"address": FORWARD}}]}
    cases = [
        ({"displayName": "x", "actions": forward, "priority": 1}, "RequestBodyRead"),
        ({"displayName": "x", "actions": {**forward, "forwardEverything": True}},
         "RequestBodyRead"),
        ({"actions": forward}, "ErrorInvalidRequest"),
        ({"displayName": "x", "sequence": "first", "actions": forward}, "RequestBodyRead"),
        ({"displayName": "x", "actions": {"forwardAsAttachmentTo": ["x@y"]}},
         "ErrorInvalidRecipients"),
    ]
    with httpx.Client() as client:
        for body, code in cases:
            response = client.post(url, json=body, headers=auth)
            assert (response.status_code, response.json()["error"]["code"]) == (400, code)
        assert client.get(url).status_code == 401
    assert standin.rules("bob@corp.example.com") == []


# ---- mail through the rules -----------------------------------------------------------


@pytest.fixture
def forward_server() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False)
    server.add_user("forward", "Fw-dovecot-secret-9")
    server.start()
    yield server
    server.stop()


@pytest.mark.integration
def test_mail_flows_through_graph_rules_into_records(
        tmp_path: Path, standin: GraphStandIn, backend: GraphBackend,
        targets: dict[str, RuleTarget], forward_server: DovecotServer, rabbit_vhost: Vhost,
        database: Engine) -> None:
    """Rules deployed through Graph; the stand-in's Exchange forwards each user's mail as an
    attachment into a Dovecot forward mailbox; the four stages (RabbitMQ, PostgreSQL) make
    records for the users whose rules forwarded, recognised by the envelope's sender."""
    sent: list[tuple[str, bytes]] = []

    def send(recipient: str, raw: bytes) -> None:
        sent.append((recipient, raw))
        forward_server.deliver(recipient.partition("@")[0], raw)

    standin.send = send
    for target in targets.values():
        backend.install(target)
    standin.add_rule(targets["bob"].login, OWN_RULE)
    standin.add_user("dave@corp.example.com")   # no rule: nothing forwarded
    shared = mailgen.message("customer@example.net", [*USERS.values(), "dave@corp.example.com"],
                             "Order 17", "please ship", message_id="<order-17@example.net>")
    for login in (*USERS.values(), "dave@corp.example.com"):
        standin.deliver(login, shared)
    standin.deliver("bob@corp.example.com", mailgen.message(
        "customer@example.net", ["bob@corp.example.com"], "Order 18", "and this",
        message_id="<order-18@example.net>"))
    # What Exchange's rule sends: From the user, To the forward mailbox, the original inside.
    assert sorted(email.message_from_bytes(raw)["From"] for _, raw in sent) == [
        "bob@corp.example.com", "bob@corp.example.com", "carol@corp.example.com"]
    assert {recipient for recipient, _ in sent} == {FORWARD}
    envelope = email.message_from_bytes(sent[0][1])
    [attached] = [p for p in envelope.walk() if p.get_content_type() == "message/rfc822"]
    inner = attached.get_payload(0)
    assert isinstance(inner, email.message.Message)
    assert inner["Message-ID"] == "<order-17@example.net>"

    config = tmp_path / "pipeline.yaml"
    data = yaml.safe_load((tmp_path / "mailroute.yaml").read_text())
    data.update({
        "broker": {"url": rabbit_vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": database.url.render_as_string(hide_password=False)},
        "metrics": {"base_port": 0},
        "servers": [{"name": "forwards", "host": forward_server.host,
                     "port": forward_server.imap_port, "tls": "none"}],
        "mailboxes": [{"name": "forward", "kind": "imap", "server": "forwards",
                       "username": "forward", "password": "Fw-dovecot-secret-9",
                       "forward": True, "address": FORWARD, "interval": 0.3}]})
    config.write_text(yaml.safe_dump(data))
    workers = Workers(config, tmp_path)
    try:
        workers.start("ingest", "parse", "route", "persist")
        wait_for(lambda: len(deliveries(database)) == 3, "three deliveries",
                 on_timeout=workers.logs)
        assert deliveries(database) == [
            ("order-17@example.net", "bob", "forward", "envelope-from"),
            ("order-17@example.net", "carol", "forward", "envelope-from"),
            ("order-18@example.net", "bob", "forward", "envelope-from"),
        ]
        wait_for(lambda: forward_server.uids("forward") == [],
                 "the forward mailbox to be emptied", on_timeout=workers.logs)
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()
