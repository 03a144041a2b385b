"""OwedAcks: finished deliveries are acked together, never before they are owed, and never
later than ACK_DELAY_SECONDS after the first of them (a fake clock: no waiting here).

That a worker's acks reach RabbitMQ, and that a graceful stop pays what is owed, is tested
with the broker in test_runtime.py and tests/faults/.
"""

from __future__ import annotations

import pytest

from shared.runtime import ACK_DELAY_SECONDS, OwedAcks


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(every: int) -> tuple[OwedAcks[str], list[list[str]], Clock]:
    paid: list[list[str]] = []
    clock = Clock()
    return OwedAcks(paid.append, every, clock), paid, clock


def test_a_full_batchs_worth_is_acked_at_once_in_one_call() -> None:
    owed, paid, _ = make(every=4)
    owed.owe(["a", "b"])
    assert paid == []
    owed.owe(["c", "d", "e"])
    assert paid == [["a", "b", "c", "d", "e"]]
    assert owed.seconds_left(0.5) == 0.5  # nothing owed: the caller may wait its longest


def test_a_small_batch_waits_for_the_delay_counted_from_the_first_owed() -> None:
    owed, paid, clock = make(every=50)
    owed.owe(["a"])
    assert owed.seconds_left(0.5) == ACK_DELAY_SECONDS
    clock.now += ACK_DELAY_SECONDS / 2
    owed.owe(["b"])
    owed.pay_if_due()
    assert paid == []
    assert owed.seconds_left(0.5) == pytest.approx(ACK_DELAY_SECONDS / 2)
    clock.now += ACK_DELAY_SECONDS / 2
    assert owed.seconds_left(0.5) == 0.0
    owed.pay_if_due()
    assert paid == [["a", "b"]]
    owed.pay_if_due()
    assert paid == [["a", "b"]]  # paid once


def test_paying_pays_whatever_is_owed_and_nothing_twice() -> None:
    owed, paid, _ = make(every=50)
    owed.pay()
    assert paid == []
    owed.owe(["a"])
    owed.pay()
    owed.pay()
    assert paid == [["a"]]


def test_every_one_acks_each_batch_as_it_is_owed() -> None:
    owed, paid, _ = make(every=1)
    owed.owe(["a"])
    owed.owe(["b", "c"])
    assert paid == [["a"], ["b", "c"]]
