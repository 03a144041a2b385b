"""shared.cli._run_threads: what start-up made is frozen out of the collector's full passes
before the stage threads start (a gen-2 pass over it stalled workers for up to 150 ms)."""

from __future__ import annotations

import gc
import threading

from shared.cli import _run_threads


def test_start_up_objects_are_frozen_before_the_threads_start() -> None:
    seen: dict[str, int] = {}
    stop = threading.Event()

    def stage() -> None:
        seen["frozen"] = gc.get_freeze_count()
        stop.set()

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        _run_threads({"stage": stage}, stop)
        assert seen["frozen"] > 0
    finally:
        gc.unfreeze()
