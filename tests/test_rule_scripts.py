"""mailroute's Sieve scripts (generation, quoting, parsing) and the deploy/check/remove driver's
logic over stand-in backends (the ManageSieve backend on a real Dovecot is in
tests/test_sieve_rules_integration.py)."""

from __future__ import annotations

import pytest

from ingest.forwarding_rules import Inspection, RuleError, RuleReport, RuleTarget
from ingest.rule_deploy import failed, open_backend, run_rules
from ingest.sieve_rules import (
    parse_includes,
    parse_redirect,
    rule_script,
    sieve_string,
    wrapper_script,
)
from shared.secrets import Secret
from shared.settings import RuleServerSettings

SIEVE = RuleServerSettings(name="sieve", host="127.0.0.1")
GRAPH = RuleServerSettings(name="m365", kind="graph", tenant_id="t", client_id="c",
                           client_secret=Secret("graph-secret"))


def target(name: str, server: RuleServerSettings = SIEVE) -> RuleTarget:
    return RuleTarget(principal=name, address=f"{name}@corp.example.com", login=name,
                      password=None, forward_address="forward@corp.example.com", server=server)


# ---- scripts --------------------------------------------------------------------------------

def test_rule_script_redirects_a_copy_to_the_forward_address() -> None:
    script = rule_script("forward@corp.example.com")
    assert 'require ["copy"];' in script
    assert 'redirect :copy "forward@corp.example.com";' in script
    assert parse_redirect(script) == ["forward@corp.example.com"]


@pytest.mark.parametrize("address", [
    'forward"@corp.example.com', "forward@corp.example.com\nkeep;", "forward",
    "for ward@corp.example.com", "forward@corp.example.com;", "", "a\\b@corp.example.com",
    "forward@-corp.example.com",
])
def test_rule_script_refuses_what_is_not_a_plain_address(address: str) -> None:
    with pytest.raises(RuleError, match="not a plain email address"):
        rule_script(address)


def test_sieve_strings_escape_quotes_and_backslashes() -> None:
    assert sieve_string('my "rules" \\ 2') == '"my \\"rules\\" \\\\ 2"'
    with pytest.raises(RuleError, match="control character"):
        sieve_string("two\nlines")


def test_wrapper_includes_mailroutes_script_then_the_users_even_with_odd_names() -> None:
    script = wrapper_script("mailroute-forward", 'Bob\'s "filters" \\ old')
    assert parse_includes(script) == ["mailroute-forward", 'Bob\'s "filters" \\ old']
    assert 'require ["include"];' in script


def test_parsing_ignores_comments_and_finds_plain_redirects() -> None:
    script = ('# redirect "ignored@example.org";\nrequire ["copy"];\n'
              'if true { redirect "other@example.org"; }\n'
              'redirect :copy "second@example.org" ;\n')
    assert parse_redirect(script) == ["other@example.org", "second@example.org"]
    assert parse_includes("require \"include\";\n") == []


# ---- the driver -----------------------------------------------------------------------------

class Backend:
    """A stand-in RuleBackend: a dict of states, and a list of what was written."""

    def __init__(self, states: dict[str, str], fail: frozenset[str] = frozenset()) -> None:
        self.states = states
        self.fail = fail
        self.writes: list[tuple[str, str]] = []
        self.closed = False

    def _check(self, t: RuleTarget) -> None:
        if t.principal in self.fail:
            raise RuleError(f"login refused for {t.login}")

    def inspect(self, t: RuleTarget) -> Inspection:
        self._check(t)
        state = self.states.get(t.principal, "missing")
        return Inspection(state, f"{state} detail")  # type: ignore[arg-type]

    def install(self, t: RuleTarget) -> None:
        self._check(t)
        self.writes.append(("install", t.principal))
        self.states[t.principal] = "present"

    def remove(self, t: RuleTarget) -> bool:
        self._check(t)
        self.writes.append(("remove", t.principal))
        return self.states.pop(t.principal, "missing") != "missing"

    def close(self) -> None:
        self.closed = True


def outcomes(reports: list[RuleReport]) -> dict[str, str]:
    return {r.principal: r.outcome for r in reports}


def test_deploy_writes_only_what_is_missing_or_differs_and_one_failure_stops_nobody() -> None:
    backend = Backend({"bob": "present", "carol": "differs"}, fail=frozenset({"dave"}))
    seen: list[str] = []
    reports = run_rules("deploy", [target(n) for n in ("alice", "bob", "carol", "dave", "eve")],
                        backend_for=lambda server: backend,
                        on_report=lambda r: seen.append(r.principal))
    assert outcomes(reports) == {"alice": "created", "bob": "present", "carol": "changed",
                                 "dave": "failed", "eve": "created"}
    assert seen == ["alice", "bob", "carol", "dave", "eve"]
    assert backend.writes == [("install", "alice"), ("install", "carol"), ("install", "eve")]
    assert reports[3].detail == "login refused for dave"
    assert "was: differs detail" in reports[2].detail
    assert backend.closed
    assert failed("deploy", reports)
    assert not failed("deploy", [r for r in reports if r.principal != "dave"])


def test_dry_run_inspects_and_writes_nothing() -> None:
    backend = Backend({"bob": "present", "carol": "differs"})
    targets = [target(n) for n in ("alice", "bob", "carol")]
    deploy = run_rules("deploy", targets, dry_run=True, backend_for=lambda server: backend)
    remove = run_rules("remove", targets, dry_run=True, backend_for=lambda server: backend)
    assert backend.writes == []
    assert outcomes(deploy) == {"alice": "created", "bob": "present", "carol": "changed"}
    assert outcomes(remove) == {"alice": "absent", "bob": "removed", "carol": "removed"}
    assert all(r.dry_run for r in deploy + remove)


def test_check_fails_the_run_unless_every_rule_is_present() -> None:
    backend = Backend({"alice": "present", "bob": "differs"})
    reports = run_rules("check", [target("alice"), target("bob"), target("carol")],
                        backend_for=lambda server: backend)
    assert outcomes(reports) == {"alice": "present", "bob": "differs", "carol": "missing"}
    assert backend.writes == []
    assert failed("check", reports)
    assert not failed("check", reports[:1])


def test_remove_reports_removed_and_absent() -> None:
    backend = Backend({"alice": "present"})
    reports = run_rules("remove", [target("alice"), target("bob")],
                        backend_for=lambda server: backend)
    assert outcomes(reports) == {"alice": "removed", "bob": "absent"}
    assert not failed("remove", reports)


def test_a_backend_that_cannot_open_or_crashes_fails_only_its_users() -> None:
    good = Backend({})

    def factory(server: RuleServerSettings) -> Backend:
        if server.name == "m365":
            raise RuleError("graph backend not available")
        return good

    class Crashing(Backend):
        def inspect(self, t: RuleTarget) -> Inspection:
            raise KeyError("bug")

    reports = run_rules("deploy", [target("alice", GRAPH), target("bob"), target("carol", GRAPH)],
                        backend_for=factory)
    assert [(r.outcome, r.detail) for r in reports] == [
        ("failed", "graph backend not available"), ("created", "forwards to "
                                                    "forward@corp.example.com"),
        ("failed", "graph backend not available")]
    crashed = run_rules("check", [target("alice"), target("bob")],
                        backend_for=lambda server: Crashing({}))
    assert [r.outcome for r in crashed] == ["failed", "failed"]
    assert "unexpected KeyError" in crashed[0].detail


def test_open_backend_gives_managesieve_for_its_kind() -> None:
    from ingest.sieve_rules import ManageSieveBackend

    backend = open_backend(SIEVE)
    assert isinstance(backend, ManageSieveBackend)
    backend.close()
