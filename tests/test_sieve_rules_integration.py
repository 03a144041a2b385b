"""``mailroute rules`` on a real Dovecot with Pigeonhole: ManageSieve, and LMTP delivery with
Sieve, so that the redirected copies really arrive in the forward mailbox.

One Dovecot for the module (``DovecotServer(sieve=True)``); each test makes its own users and
its own forward mailbox, so the tests share nothing but the server.
"""

from __future__ import annotations

import email
import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ingest.forwarding_rules import RuleReport, RuleTarget
from ingest.rule_deploy import run_rules
from ingest.sieve_rules import SieveClient
from parse.extract import parse_raw
from shared.cli import main
from shared.secrets import Secret
from shared.settings import LimitSettings, RuleServerSettings
from tests import mailgen
from tests.dovecot import DovecotServer

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "mailroute-admin", "admin-pass-4190"
DOMAIN = "corp.example.com"
OWN_SCRIPT = ('require ["fileinto"];\n'
              'if header :contains "subject" "project" { fileinto "Projects"; }\n')
_serial = itertools.count(1)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(sieve=True)
    server.add_master_user(ADMIN, ADMIN_PASSWORD)
    server.start()
    yield server
    server.stop()


def names(*bases: str) -> list[str]:
    """Users of this test only: the bases with a serial number."""
    n = next(_serial)
    return [f"{base}{n}" for base in bases]


def admin_server(dovecot: DovecotServer) -> RuleServerSettings:
    return dovecot.rule_server("sieve", tls="starttls", admin_user=ADMIN,
                               admin_password=ADMIN_PASSWORD)


def target(user: str, forward: str, server: RuleServerSettings,
           password: str | None = None, canary_sender: str | None = None) -> RuleTarget:
    address = f"{user}@{DOMAIN}"
    return RuleTarget(principal=user, address=address, login=address,
                      password=Secret(password) if password else None,
                      forward_address=f"{forward}@{DOMAIN}", server=server,
                      canary_sender=canary_sender)


def as_user(dovecot: DovecotServer, user: str) -> SieveClient:
    """A ManageSieve session of the user's own (what the user's mail client would do)."""
    client = SieveClient(dovecot.rule_server("own"))
    client.open(user, dovecot.password(user), "")
    return client


def outcomes(reports: list[RuleReport]) -> dict[str, str]:
    return {r.principal: r.outcome for r in reports}


def on_disk(dovecot: DovecotServer, users: list[str]) -> dict[str, Any]:
    return {u: (dovecot.active_sieve(u), dovecot.sieve_scripts(u)) for u in users}


def forward_copies(dovecot: DovecotServer, forward: str, count: int) -> list[bytes]:
    dovecot.wait_for_mail(forward, count)
    with dovecot.client(forward, "INBOX") as imap:
        fetched = imap.fetch(imap.search("ALL"), ["RFC822"])
        return [fetched[uid][b"RFC822"] for uid in sorted(fetched)]


def test_deploy_check_remove_beside_the_users_own_scripts(dovecot: DovecotServer) -> None:
    alice, bob, carol, dave, forward = names("alice", "bob", "carol", "dave", "forward")
    for user in (alice, bob, carol, dave, forward):
        dovecot.add_user(user, f"{user}-password")
    with as_user(dovecot, bob) as client:
        assert client.putscript("mine", OWN_SCRIPT) and client.setactive("mine")
    admin = admin_server(dovecot)
    own = dovecot.rule_server("own")  # each user's own login, no TLS
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        down = RuleServerSettings(name="down", host="127.0.0.1", port=unused.getsockname()[1],
                                  tls="none", timeout=5.0)
        targets = [target(alice, forward, admin), target(bob, forward, admin),
                   target(carol, forward, own, f"{carol}-password"),
                   target(dave, forward, own, "not-daves-password"),
                   target("erin", forward, down, "erin-password")]
        before = on_disk(dovecot, [alice, bob, carol, dave])

        plan = run_rules("deploy", targets, dry_run=True)
        assert outcomes(plan) == {alice: "created", bob: "created", carol: "created",
                                  dave: "failed", "erin": "failed"}
        assert on_disk(dovecot, [alice, bob, carol, dave]) == before

        deployed = run_rules("deploy", targets)
        failures = {r.principal: r.detail for r in deployed if r.outcome == "failed"}
    assert outcomes(deployed) == outcomes(plan)
    assert f"login refused for {dave}@{DOMAIN}" in failures[dave]
    assert "not-daves-password" not in failures[dave]
    assert "server unreachable" in failures["erin"]
    assert dovecot.active_sieve(alice) == "mailroute-forward"
    assert dovecot.active_sieve(bob) == "mailroute-forward-main"
    assert dovecot.sieve_scripts(bob)["mine"] == OWN_SCRIPT
    assert dovecot.sieve_scripts(dave) == {}
    ok = targets[:3]
    assert outcomes(run_rules("deploy", ok)) == dict.fromkeys((alice, bob, carol), "present")
    assert outcomes(run_rules("check", ok)) == dict.fromkeys((alice, bob, carol), "present")

    # Mail to each user: a copy in the forward mailbox, and bob's own filter still files his.
    for user in (alice, bob, carol):
        dovecot.deliver_lmtp(f"{user}@{DOMAIN}", mailgen.message(
            "customer@example.net", [f"{user}@{DOMAIN}"], f"project for {user}", "hello",
            message_id=f"<{user}-1@example.net>"))
    copies = forward_copies(dovecot, forward, 3)
    redirected_from = sorted(email.message_from_bytes(raw)["X-Sieve-Redirected-From"]
                             for raw in copies)
    assert redirected_from == sorted(f"{u}@{DOMAIN}" for u in (alice, bob, carol))
    envelope = parse_raw(copies[0], "forward", LimitSettings()).envelope
    assert envelope["kind"] == "redirected"
    assert envelope["forwarder"]["address"] == email.message_from_bytes(copies[0])[
        "X-Sieve-Redirected-From"]
    assert len(dovecot.uids(bob, "Projects")) == 1 and dovecot.uids(bob) == []
    assert len(dovecot.uids(alice)) == 1

    # Three ways a rule stops working; check names each, deploy mends each.
    with as_user(dovecot, bob) as client:
        assert client.setactive("mine")
    with as_user(dovecot, alice) as client:
        assert client.putscript("mailroute-forward", 'require ["copy"];\n'
                                'redirect :copy "elsewhere@example.org";\n')
    with as_user(dovecot, carol) as client:
        assert client.setactive("")
    checked = run_rules("check", ok)
    assert outcomes(checked) == dict.fromkeys((alice, bob, carol), "differs")
    details = {r.principal: r.detail for r in checked}
    assert "forwards to elsewhere@example.org" in details[alice]
    assert "the user's 'mine' is" in details[bob]
    assert "no active script" in details[carol]
    assert outcomes(run_rules("deploy", ok)) == dict.fromkeys((alice, bob, carol), "changed")
    assert outcomes(run_rules("check", ok)) == dict.fromkeys((alice, bob, carol), "present")
    assert dovecot.active_sieve(bob) == "mailroute-forward-main"

    # Remove: a dry run changes nothing; then bob's own script is active again, alone.
    deployed_state = on_disk(dovecot, [alice, bob, carol])
    assert outcomes(run_rules("remove", ok, dry_run=True)) == dict.fromkeys(
        (alice, bob, carol), "removed")
    assert on_disk(dovecot, [alice, bob, carol]) == deployed_state
    assert outcomes(run_rules("remove", ok)) == dict.fromkeys((alice, bob, carol), "removed")
    assert on_disk(dovecot, [alice, bob, carol]) == {
        alice: (None, {}), bob: ("mine", {"mine": OWN_SCRIPT}), carol: (None, {})}
    assert outcomes(run_rules("check", ok)) == dict.fromkeys((alice, bob, carol), "missing")
    assert outcomes(run_rules("remove", ok)) == dict.fromkeys((alice, bob, carol), "absent")
    dovecot.deliver_lmtp(f"{bob}@{DOMAIN}", mailgen.message(
        "customer@example.net", [f"{bob}@{DOMAIN}"], "project after", "hello",
        message_id=f"<{bob}-2@example.net>"))
    # LMTP answers after the user's script has run: no redirect now, still filed.
    assert len(dovecot.uids(bob, "Projects")) == 2
    assert len(dovecot.uids(forward)) == 3


def test_canaries_go_to_the_forward_mailbox_only(dovecot: DovecotServer) -> None:
    """Hourly canaries must not pile up in users' mailboxes, whatever the user's own script
    does; the header on anyone else's mail changes nothing."""
    alice, bob, forward = names("alice", "bob", "forward")
    for user in (alice, bob, forward):
        dovecot.add_user(user, f"{user}-password")
    with as_user(dovecot, bob) as client:
        assert client.putscript("mine", OWN_SCRIPT) and client.setactive("mine")
    sender = f"canary@mailroute.{DOMAIN}"
    targets = [target(user, forward, admin_server(dovecot), canary_sender=sender)
               for user in (alice, bob)]
    assert outcomes(run_rules("deploy", targets)) == {alice: "created", bob: "created"}
    assert outcomes(run_rules("check", targets)) == {alice: "present", bob: "present"}
    canary = (b"X-Mailroute-Canary: c4n4ry-1d-0f-22-chars\r\n"
              + mailgen.message(sender, [f"{bob}@{DOMAIN}"], "mailroute canary project", "."))
    forged = (b"X-Mailroute-Canary: c4n4ry-1d-0f-22-chars\r\n"
              + mailgen.message("someone@example.net", [f"{bob}@{DOMAIN}"], "project", "."))
    for user in (alice, bob):
        dovecot.deliver_lmtp(f"{user}@{DOMAIN}", canary, sender=sender)
    dovecot.deliver_lmtp(f"{bob}@{DOMAIN}", forged)
    copies = forward_copies(dovecot, forward, 3)
    assert sorted(email.message_from_bytes(c)["From"] for c in copies) == [
        sender, sender, "someone@example.net"]
    # The canaries are in neither inbox nor bob's own "Projects" folder; the forged one is.
    assert dovecot.uids(alice) == [] and dovecot.uids(bob) == []
    assert len(dovecot.uids(bob, "Projects")) == 1
    # A rule written without the canary part differs, and deploy adds it.
    plain = [target(alice, forward, admin_server(dovecot))]
    assert outcomes(run_rules("check", plain)) == {alice: "differs"}
    assert outcomes(run_rules("deploy", targets)) == {alice: "present", bob: "present"}


def test_a_script_the_server_refuses_is_reported_with_its_reason(dovecot: DovecotServer) -> None:
    [frank, forward] = names("frank", "forward")
    dovecot.add_user(frank, f"{frank}-password", "userdb_sieve_quota_max_scripts=1")
    dovecot.add_user(forward, f"{forward}-password")
    with as_user(dovecot, frank) as client:
        assert client.putscript("mine", OWN_SCRIPT) and client.setactive("mine")
    [report] = run_rules("deploy", [target(frank, forward, admin_server(dovecot))])
    assert report.outcome == "failed"
    assert "script 'mailroute-forward' rejected" in report.detail
    assert "quota" in report.detail.lower()
    assert dovecot.active_sieve(frank) == "mine"


def write_config(path: Path, dovecot: DovecotServer, forward: str,
                 users: dict[str, str | None]) -> Path:
    """A configuration whose users (name -> own rule password, None: the admin login) are
    read through the forward mailbox and get their rule from this Dovecot."""
    sieve = dovecot.rule_server()
    config: dict[str, Any] = {
        "servers": [{"name": "mail", "host": dovecot.host, "port": dovecot.imap_port,
                     "tls": "none"}],
        "mailboxes": [{"name": "forward", "kind": "imap", "server": "mail",
                       "username": forward, "password": f"{forward}-password",
                       "forward": True, "address": f"{forward}@{DOMAIN}"}],
        "rule_servers": [
            {"name": "sieve", "host": sieve.host, "port": sieve.port, "tls": "starttls",
             "ca_file": str(dovecot.cert_path), "admin_user": ADMIN,
             "admin_password": ADMIN_PASSWORD},
            {"name": "own", "host": sieve.host, "port": sieve.port, "tls": "none"}],
        "users": [{"name": user, "address": f"{user}@{DOMAIN}", "forward": "forward",
                   "rule": {"server": "sieve"} if password is None else
                   {"server": "own", "password": password}}
                  for user, password in users.items()],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_cli_deploys_checks_mends_and_removes(tmp_path: Path,
                                                  dovecot: DovecotServer) -> None:
    gina, hugo, ivan, forward = names("gina", "hugo", "ivan", "forward")
    for user in (gina, hugo, ivan, forward):
        dovecot.add_user(user, f"{user}-password")
    config = write_config(tmp_path / "mailroute.yaml", dovecot, forward,
                          {gina: None, hugo: f"{hugo}-password", ivan: "wrong-password-9"})
    runner = CliRunner()

    def rules(*args: str) -> Any:
        return runner.invoke(main, ["-c", str(config), "rules", *args], catch_exceptions=False)

    def rows(output: str) -> dict[str, list[str]]:
        return {line.split()[0]: line.split(None, 3)[1:] for line in output.splitlines()
                if line.split() and line.split()[0] in (gina, hugo, ivan)}

    plan = rules("deploy", "--dry-run", "--user", gina, "--user", hugo)
    assert plan.exit_code == 0, plan.output
    assert {u: r[1] for u, r in rows(plan.output).items()} == {gina: "would", hugo: "would"}
    assert "would create" in plan.output and "dry run: nothing was changed" in plan.output
    assert dovecot.sieve_scripts(gina) == {}

    deployed = rules("deploy")
    assert deployed.exit_code == 1, deployed.output  # ivan's password is wrong
    table = rows(deployed.output)
    assert {u: r[1] for u, r in table.items()} == {gina: "created", hugo: "created",
                                                  ivan: "failed"}
    assert table[ivan][0] == "own" and "login refused" in table[ivan][2]
    assert "wrong-password-9" not in deployed.output
    assert ADMIN_PASSWORD not in deployed.output

    checked = rules("check", "--user", gina, "--user", hugo)
    assert checked.exit_code == 0, checked.output
    assert "2 user(s): 2 present" in checked.output

    # hugo deletes mailroute's rule: check says so (exit 1), deploy mends it.
    with as_user(dovecot, hugo) as client:
        assert client.setactive("") and client.deletescript("mailroute-forward")
    checked = rules("check", "--user", gina, "--user", hugo)
    assert checked.exit_code == 1
    assert rows(checked.output)[hugo][1] == "missing"
    mended = rules("deploy", "--user", gina, "--user", hugo)
    assert mended.exit_code == 0, mended.output
    assert {u: r[1] for u, r in rows(mended.output).items()} == {gina: "present",
                                                                hugo: "created"}
    assert rules("check", "--user", gina, "--user", hugo).exit_code == 0

    removed = rules("remove", "--user", gina, "--user", hugo)
    assert removed.exit_code == 0, removed.output
    assert "2 user(s): 2 removed" in removed.output
    assert dovecot.sieve_scripts(gina) == {} and dovecot.sieve_scripts(hugo) == {}

    unknown = rules("check", "--user", "nobody")
    assert unknown.exit_code == 2 and "nobody" in unknown.output


def test_tls_is_verified_against_the_configured_ca(dovecot: DovecotServer) -> None:
    [kate, forward] = names("kate", "forward")
    dovecot.add_user(kate, f"{kate}-password")
    server = admin_server(dovecot)
    unverified = RuleServerSettings(**{**server.__dict__, "ca_file": None})
    [report] = run_rules("check", [target(kate, forward, unverified)])
    assert report.outcome == "failed"
    assert "TLS failed" in report.detail and "certificate verify failed" in report.detail
    trusting = RuleServerSettings(**{**unverified.__dict__, "verify_tls": False})
    [report] = run_rules("check", [target(kate, forward, trusting)])
    assert (report.outcome, report.detail) == ("missing", "no script 'mailroute-forward'")

