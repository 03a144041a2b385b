"""``mailroute worker`` with one fault injected at a named point, for the fault tests.

Run as ``python -m tests.faults.faulty_worker --config FILE worker STAGE`` with
``FAULT_INJECT`` set to one of (not ``MAILROUTE_*``: those are settings overrides):

- ``kill-before-ack``: SIGKILL itself the first time a batch's outputs are confirmed by the
  broker, before the batch is acked (RELIABILITY.md fault 1);
- ``kill-after-commit``: persist SIGKILLs itself right after its first batch is committed,
  before the ack (fault 2);
- ``kill-before-cursor``: ingest SIGKILLs itself after its first batch is confirmed, before
  the mailbox cursor is saved (fault 3);
- ``slow-once:SECONDS``: the stage's first batch takes SECONDS longer (faults 9 and 10);
- ``poison:MARKER``: parse fails with an unexpected exception on every raw message containing
  MARKER (fault 11).

The real worker code runs otherwise unchanged; the fault wraps one method of it.  Each fault
prints ``fault: <what>`` to the worker's log just before it acts.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any


def _say(text: str) -> None:
    print(f"fault: {text}", flush=True)


def _die(point: str) -> None:
    _say(f"SIGKILL {point}")
    os.kill(os.getpid(), signal.SIGKILL)


def _once(original: Callable[..., Any], before: Callable[[], None] | None = None,
          after: Callable[[], None] | None = None) -> Callable[..., Any]:
    fired: list[bool] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = not fired
        fired.append(True)
        if first and before is not None:
            before()
        result = original(*args, **kwargs)
        if first and after is not None:
            after()
        return result

    return wrapper


def install(fault: str) -> None:
    from parse.worker import ParseStage
    from persist.mailbox_state import MailboxStateStore
    from persist.worker import PersistStage
    from route.worker import RouteStage
    from shared.runtime import StageRunner

    kind, _, argument = fault.partition(":")
    if kind == "kill-before-ack":
        StageRunner._ack = _once(  # type: ignore[method-assign]
            StageRunner._ack, before=lambda: _die("after the confirm, before the ack"))
    elif kind == "kill-after-commit":
        PersistStage.handle_batch = _once(  # type: ignore[method-assign]
            PersistStage.handle_batch, after=lambda: _die("after the commit, before the ack"))
    elif kind == "kill-before-cursor":
        MailboxStateStore.save_cursor = _once(  # type: ignore[method-assign]
            MailboxStateStore.save_cursor,
            before=lambda: _die("after the confirm, before the cursor is saved"))
    elif kind == "slow-once":
        seconds = float(argument)

        def pause() -> None:
            _say(f"handler sleeps {seconds:g}s")
            time.sleep(seconds)
            _say("handler woke up")

        ParseStage.handle = _once(ParseStage.handle, before=pause)  # type: ignore[method-assign]
        # route and persist take whole batches (one at a time only if a batch fails)
        for batch_stage in (RouteStage, PersistStage):
            batch_stage.handle_batch = _once(  # type: ignore[method-assign]
                batch_stage.handle_batch, before=pause)
    elif kind == "poison":
        marker = argument.encode()
        original = ParseStage.handle

        def handle(self: ParseStage, document: dict[str, Any]) -> Any:
            if marker in document["raw"]:
                _say("poison message")
                raise RuntimeError("poisoned handler")
            return original(self, document)

        ParseStage.handle = handle  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown FAULT_INJECT {fault!r}")


def main() -> None:
    fault = os.environ.get("FAULT_INJECT", "")
    if fault:
        install(fault)
    from shared.cli import main as cli

    cli(sys.argv[1:], prog_name="mailroute")


if __name__ == "__main__":
    main()
