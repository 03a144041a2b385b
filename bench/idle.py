"""What an idle gap costs on this machine: the same parse work back to back, and with a sleep
between units as long as the gap between mails at an offered rate.

Takes the offered rate (the gap is its inverse) and a clock pair (wall sleep, process CPU
time), so tests can drive it; gives a :class:`~bench.common.Figure`: CPU per unit after the
gap, against back to back (ratio 1.0: no cost; below: the machine runs a process that has
slept more slowly, as a virtual CPU that halts when idle does).  It explains why each
process's CPU per mail at 100-300 msg/s is two to four times its saturated cost, and so how
much of a latency figure belongs to the machine rather than to mailroute.  Fails with
:class:`~bench.common.BenchError` when the work itself fails.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import BenchError, Figure, median, progress
from bench.mail import plain_mail
from parse.extract import parse_raw
from shared.errors import PermanentError
from shared.settings import LimitSettings

UNITS = 300  # parses per measurement
ROUNDS = 3  # back to back and gapped, alternating


@dataclass(frozen=True)
class Clocks:
    sleep: Callable[[float], None] = time.sleep
    cpu: Callable[[], float] = time.process_time


def cpu_per_unit(work: Callable[[], object], units: int, gap: float, clocks: Clocks) -> float:
    """Process CPU seconds per call of ``work``, sleeping ``gap`` seconds after each."""
    started = clocks.cpu()
    for _ in range(units):
        work()
        if gap:
            clocks.sleep(gap)
    return (clocks.cpu() - started) / units


def idle_gap_figure(rate: float, clocks: Clocks = Clocks(), units: int = UNITS,
                    rounds: int = ROUNDS) -> Figure:
    mail = plain_mail(random.Random(7), "<idle-gap@bench.invalid>")
    limits = LimitSettings()

    def work() -> object:
        return parse_raw(mail, "direct", limits)

    try:
        work()
    except PermanentError as exc:
        raise BenchError(f"the idle-gap probe cannot parse its own mail: {exc}") from exc
    gap = 1.0 / rate
    progress(f"machine: CPU per parse, back to back and after {gap * 1000:.1f} ms idle "
             f"({rounds} rounds of {units})")
    back, gapped = [], []
    for _ in range(rounds):
        back.append(cpu_per_unit(work, units, 0.0, clocks))
        gapped.append(cpu_per_unit(work, units, gap, clocks))
    return Figure(f"machine: same work after {gap * 1000:.1f} ms idle", median(gapped) * 1e6,
                  "us", median(back) * 1e6, higher_is_better=False, reference="back to back",
                  detail={"gap_ms": gap * 1000, "units": units,
                          "back_to_back_us": [b * 1e6 for b in back],
                          "after_gap_us": [g * 1e6 for g in gapped]})
