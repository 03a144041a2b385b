"""The idle-gap probe of the pipeline benchmark, on fake clocks (no timing is asserted)."""

from __future__ import annotations

import time

from bench.idle import Clocks, cpu_per_unit, idle_gap_figure


class FakeMachine:
    """Work costs 1.0 s of CPU, or ``1.0 + penalty`` right after a sleep."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.cpu_used = 0.0
        self.slept: list[float] = []
        self._rested = False

    def work(self) -> None:
        self.cpu_used += 1.0 + (self.penalty if self._rested else 0.0)
        self._rested = False

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self._rested = True

    def clocks(self) -> Clocks:
        return Clocks(sleep=self.sleep, cpu=lambda: self.cpu_used)


def test_cpu_per_unit_counts_what_the_work_costs_after_each_gap() -> None:
    machine = FakeMachine(penalty=0.5)
    assert cpu_per_unit(machine.work, 4, 0.0, machine.clocks()) == 1.0
    assert machine.slept == []
    # the first unit follows no sleep; the three after it each pay the penalty
    assert cpu_per_unit(machine.work, 4, 0.01, machine.clocks()) == (1.0 + 3 * 1.5) / 4
    assert machine.slept == [0.01] * 4


class SleepsCostCpu:
    """Real CPU time, plus ``penalty`` seconds for each (not really taken) sleep."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.sleeps = 0

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1

    def clocks(self) -> Clocks:
        return Clocks(sleep=self.sleep,
                      cpu=lambda: time.process_time() + self.sleeps * self.penalty)


def test_the_figure_compares_the_gapped_parse_with_back_to_back() -> None:
    machine = SleepsCostCpu(penalty=1.0)  # far above what one parse costs
    figure = idle_gap_figure(300, machine.clocks(), units=5, rounds=3)
    assert figure.name == "machine: same work after 3.3 ms idle"
    assert figure.reference == "back to back"
    assert figure.unit == "us" and not figure.higher_is_better
    assert machine.sleeps == 5 * 3
    assert figure.ceiling is not None
    assert figure.value > 500_000 > figure.ceiling  # ~1 s of penalty per parse, in us
    assert figure.ratio is not None and figure.ratio < 0.5
    assert len(figure.detail["after_gap_us"]) == len(figure.detail["back_to_back_us"]) == 3

