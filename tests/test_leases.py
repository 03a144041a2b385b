"""Mailbox leases on SQLite and PostgreSQL: claim, renew, release, expiry, disable, resets."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from persist.mailbox_leases import LeaseStore
from persist.mailbox_state import MailboxStateStore

pytest_plugins = ["tests.db_fixtures"]

BOXES = [f"box{i:03d}" for i in range(20)]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def leases(db_engine: Engine, clock: Clock) -> LeaseStore:
    store = LeaseStore(db_engine, clock)
    store.ensure(BOXES)
    return store


def test_each_mailbox_goes_to_one_owner_until_released(leases: LeaseStore, clock: Clock) -> None:
    first = leases.claim("a", BOXES, 60, 15)
    second = leases.claim("b", BOXES, 60, 15)
    assert len(first) == 15 and len(second) == 5
    assert not set(first) & set(second)
    assert leases.claim("c", BOXES, 60, 10) == []
    assert leases.release("a", first[0], clock.now + timedelta(seconds=30))
    assert leases.claim("c", BOXES, 60, 10) == []  # released, but not due for 30 s
    clock.advance(31)
    assert leases.claim("c", BOXES, 60, 10) == [first[0]]


def test_mailboxes_another_configuration_knows_do_not_crowd_out_this_ones(
        leases: LeaseStore, clock: Clock) -> None:
    clock.advance(-60)
    leases.ensure([f"other{i}" for i in range(10)])  # due a minute earlier than BOXES
    clock.advance(60)
    mine = BOXES[:3]
    assert sorted(leases.claim("a", mine, 60, 3)) == mine
    assert leases.claim("a", mine, 60, 3) == []
    assert len(leases.claim("b", [f"other{i}" for i in range(10)], 60, 20)) == 10


def test_an_expired_lease_is_taken_over_and_the_old_owner_learns_it(
        leases: LeaseStore, clock: Clock) -> None:
    held = leases.claim("dead", BOXES, 60, 20)
    clock.advance(30)
    assert leases.renew("alive", [], 60) == set()
    assert leases.claim("alive", BOXES, 60, 20) == []
    clock.advance(31)  # 61 s after the last renewal: expired
    taken = leases.claim("alive", BOXES, 60, 20)
    assert sorted(taken) == sorted(held)
    assert leases.renew("dead", held, 60) == set()
    assert not leases.holds("dead", held[0]) and leases.holds("alive", held[0])
    assert not leases.release("dead", held[0], clock.now)


def test_renewal_keeps_a_lease_past_its_first_term(leases: LeaseStore, clock: Clock) -> None:
    held = leases.claim("a", BOXES, 60, 3)
    for _ in range(5):
        clock.advance(40)
        assert leases.renew("a", held, 60) == set(held)
    assert not set(leases.claim("b", BOXES, 60, 20)) & set(held)


def test_a_disabled_mailbox_is_never_claimed_until_enabled(
        leases: LeaseStore, db_engine: Engine) -> None:
    leases.disable("box000", "login refused")
    assert "box000" not in leases.claim("a", BOXES, 60, 20)
    lease = leases.get("box000")
    assert lease is not None and lease.disabled_reason == "login refused"
    assert leases.enable("box000")
    assert leases.claim("b", BOXES, 60, 20) == ["box000"]
    assert not leases.enable("no-such-box")


def test_uidvalidity_resets_are_counted_per_day(leases: LeaseStore, clock: Clock) -> None:
    assert [leases.count_validity_reset("box001") for _ in range(3)] == [1, 2, 3]
    clock.advance(25 * 3600)
    assert leases.count_validity_reset("box001") == 1
    leases.enable("box001")
    lease = leases.get("box001")
    assert lease is not None and lease.validity_resets == 0


def test_pop3_uidls_are_remembered_and_forgotten(db_engine: Engine) -> None:
    state = MailboxStateStore(db_engine)
    state.remember_uidls("p", ["a", "b", "c"])
    state.remember_uidls("p", ["c", "d"])
    assert state.seen_uidls("p") == {"a", "b", "c", "d"}
    state.forget_uidls("p", ["a", "b"])
    assert state.seen_uidls("p") == {"c", "d"} and state.seen_uidls("q") == set()


def test_concurrent_claims_on_postgresql_never_share_a_mailbox(
        postgres_engine: Engine) -> None:
    names = [f"race{i:03d}" for i in range(200)]
    LeaseStore(postgres_engine).ensure(names)
    results: dict[str, list[str]] = {}

    def claimer(owner: str) -> None:
        store = LeaseStore(postgres_engine)
        got: list[str] = []
        while True:
            batch = store.claim(owner, names, 60, 7)
            if not batch:
                break
            got += batch
        results[owner] = got

    threads = [threading.Thread(target=claimer, args=(f"p{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    claimed = [name for got in results.values() for name in got]
    assert sorted(claimed) == names  # every mailbox exactly once
