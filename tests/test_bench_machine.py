"""What the pipeline benchmark says about the machine: the idle-gap probe, on fake clocks (no
timing is asserted), and how busy the machine was in a phase, from /proc/stat readings."""

from __future__ import annotations

import time

import pytest

from bench.common import CpuMeter, CpuTimes, busy_share, machine_cpu_times, steal_share
from bench.idle import Clocks, cpu_per_unit, idle_gap_figure
from bench.pipeline import cpu_summary


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



STAT = """cpu  {user} 10 {system} {idle} 5 3 {softirq} {steal} 0 0
cpu0 1 2 3 4 5 6 7 8 0 0
intr 123
"""


def test_machine_busy_share_counts_work_against_all_time_including_steal() -> None:
    before = machine_cpu_times(STAT.format(user=1000, system=500, idle=8000, softirq=20,
                                           steal=0))
    after = machine_cpu_times(STAT.format(user=1700, system=800, idle=8100, softirq=40,
                                          steal=100))
    assert before == CpuTimes(1000 + 10 + 500 + 3 + 20, 1533 + 8000 + 5 + 0, 0)
    # 1,020 busy ticks of 1,220: 100 idle, 100 stolen by the hypervisor
    assert busy_share(before, after) == pytest.approx(1020 / 1220)
    assert steal_share(before, after) == pytest.approx(100 / 1220)


def test_machine_busy_share_is_none_when_it_cannot_be_read() -> None:
    assert machine_cpu_times("") is None
    assert machine_cpu_times("cpu 1 2 3\n") is None
    assert machine_cpu_times("cpu a b c d e f g h\n") is None
    assert busy_share(None, CpuTimes(1, 2, 0)) is None
    assert busy_share(CpuTimes(5, 10, 0), CpuTimes(5, 10, 0)) is None  # no time passed
    assert steal_share(None, CpuTimes(1, 2, 0)) is None
    assert steal_share(CpuTimes(5, 10, 1), CpuTimes(5, 10, 1)) is None
    assert machine_cpu_times() is not None  # this machine's /proc/stat


def test_the_cpu_line_names_each_process_and_the_machine_when_known() -> None:
    per_message = {"parse": 0.956, "rabbitmq": 2.4}
    assert cpu_summary(per_message, 0.953) == (
        "  CPU ms per message: parse 0.96, rabbitmq 2.40; machine busy 95%")
    assert cpu_summary(per_message, None) == "  CPU ms per message: parse 0.96, rabbitmq 2.40"
    assert cpu_summary(per_message, 0.80, 0.124) == (
        "  CPU ms per message: parse 0.96, rabbitmq 2.40; machine busy 80%, "
        "stolen by the host 12%")


def test_a_cpu_meter_gives_the_machines_busy_share_over_its_span() -> None:
    meter = CpuMeter({})
    meter.start()
    first = machine_cpu_times()
    assert first is not None
    while (now := machine_cpu_times()) is not None and now[0] == first[0]:
        pass  # busy until the kernel counts a busy tick: a span with CPU time in it
    assert meter.stop() == {}
    assert meter.machine_busy is not None and 0 < meter.machine_busy <= 1
    assert meter.machine_stolen is not None and 0 <= meter.machine_stolen < 1


def test_the_pipeline_figures_report_the_worst_phases_host_steal() -> None:
    from bench.pipeline import PipelineBench, PipelineSettings

    bench = PipelineBench(PipelineSettings(rates=(300,)))
    phase = {"p50_ms": 5.0, "p99_ms": 20.0}
    bench.pipeline.saturated = [{"throughput": 1000.0, "machine_steal_share": 0.02}]
    bench.chain.saturated = [{"throughput": 3000.0, "machine_steal_share": None}]
    bench.pipeline.offered = {300: {**phase, "machine_steal_share": 0.15}}
    bench.chain.offered = {300: {**phase, "machine_steal_share": 0.05}}
    [steal] = [f for f in bench.figures() if "steal" in f.name]
    assert steal.value == pytest.approx(15.0) and steal.unit == "%" and steal.ceiling is None
    assert "ratio" not in steal.line()
    bench.pipeline.offered[300]["machine_steal_share"] = None
    bench.pipeline.saturated[0]["machine_steal_share"] = None
    bench.chain.offered[300]["machine_steal_share"] = None
    assert not [f for f in bench.figures() if "steal" in f.name]
