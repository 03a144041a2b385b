"""Fuzz target for parse and route: ``make fuzz`` (FUZZ_SECONDS, default 60).

Takes raw bytes from the fuzzer; the first byte picks the mailbox (direct or forward), the
rest is the message.  Each input must end in a kept message routed by route, or in a named
``PermanentError``, within the time budget; anything else (another exception, a hang past the
budget) is a crash the fuzzer reports with the input that caused it.

With atheris (``pip install 'mailroute[fuzz]'``: coverage-guided, libFuzzer) it runs
``python -m tests.fuzz_parse -max_total_time=N``, seeded from the hostile messages and a
sample of ../shared/corpus; crashing inputs are written as ``crash-*`` files in var/fuzz/.
Without atheris it falls back to a Hypothesis-driven loop over the same target for the same
time (``--hypothesis``), so ``make fuzz`` always fuzzes something.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import time
from pathlib import Path

from shared.errors import PermanentError
from shared.settings import LimitSettings, MailboxSettings, PrincipalSettings, Settings

# CPU seconds per input; instrumented code under atheris runs a few times slower.
TIME_BUDGET = 2.0
INSTRUMENTED_SLOWDOWN = 4.0
VAR = Path(__file__).resolve().parents[1] / "var" / "fuzz"


class Target:
    def __init__(self, budget: float) -> None:
        # imported here, so that atheris can instrument them as they are imported
        from parse.extract import parse_raw
        from route.directory import Directory
        from route.router import route

        self.parse_raw = parse_raw
        self.route = route
        self.budget = budget
        self.limits = LimitSettings()
        self.directory = Directory(Settings(
            mailboxes=(MailboxSettings(name="alice", kind="maildir", path="/a"),
                       MailboxSettings(name="forward", kind="maildir", path="/f",
                                       forward=True)),
            users=(PrincipalSettings(name="alice", address="alice@corp.example.com",
                                     mailbox="alice"),
                   PrincipalSettings(name="bob", address="bob@corp.example.com",
                                     forward="forward"))))
        self.runs = 0
        self.outcomes: dict[str, int] = {}

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        mailbox = "forward" if data[0] & 1 else "alice"
        kind = "forward" if mailbox == "forward" else "direct"
        started = time.process_time()
        outcome = "kept"
        try:
            result = self.parse_raw(data[1:], kind, self.limits)
            for envelope, email in result.items():
                self.route({"trace_id": "t", "envelope": envelope, "email": email,
                       "source": {"mailbox": mailbox, "mailbox_kind": kind}}, self.directory)
        except PermanentError as exc:
            outcome = exc.reason
        spent = time.process_time() - started
        self.runs += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if spent > self.budget:
            raise TimeoutError(f"input took {spent:.2f}s of CPU (budget {self.budget:g}s)")


def seeds() -> list[bytes]:
    from tests import hostile_mail
    from tests.mail_strategies import corpus_sample

    small = [
        hostile_mail.plain(), hostile_mail.nested_multiparts(30), hostile_mail.nested_comments(50),
        hostile_mail.many_parts(50), hostile_mail.many_recipients(50),
        hostile_mail.with_attachment(b"../x", base64.b64encode(b"data")),
        hostile_mail.forward_envelope(b"bob@corp.example.com", hostile_mail.plain()),
    ]
    return [bytes([i % 2]) + raw for i, raw in enumerate(small + corpus_sample(60))]


def run_atheris(seconds: int, extra: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["parse", "route"]):
        target = Target(TIME_BUDGET * INSTRUMENTED_SLOWDOWN)
    seed_dir = VAR / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds()):
        (seed_dir / f"seed-{i:03}").write_bytes(seed)
    corpus_dir = VAR / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], f"-max_total_time={seconds}", "-timeout=30", "-rss_limit_mb=2048",
            f"-artifact_prefix={VAR}/", "-max_len=200000", *extra, str(corpus_dir),
            str(seed_dir)]
    atheris.Setup(argv, target)
    atheris.Fuzz()


def run_hypothesis(seconds: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests import mail_strategies

    target = Target(TIME_BUDGET)
    originals = [s[1:] for s in seeds() if len(s) < 20_000]
    data = st.one_of(
        st.binary(max_size=5000),
        mail_strategies.message(),
        mail_strategies.forward_envelope(["bob@corp.example.com"]),
        mail_strategies.mutated(originals),
    )
    deadline = time.monotonic() + seconds

    @settings(max_examples=10**9, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.booleans(), data)
    def loop(forward: bool, raw: bytes) -> None:
        if time.monotonic() > deadline:
            raise _Done
        target(bytes([forward]) + raw)

    with contextlib.suppress(_Done):
        loop()
    print(f"fuzz (hypothesis): {target.runs} inputs in {seconds}s, no escape; outcomes "
          f"{dict(sorted(target.outcomes.items()))}")


class _Done(Exception):
    """The time is up (raised through Hypothesis to end the loop)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int,
                        default=int(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument("--hypothesis", action="store_true",
                        help="use the Hypothesis loop even when atheris is installed")
    args, extra = parser.parse_known_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        if not args.hypothesis:
            print("fuzz: atheris is not installed (pip install 'mailroute[fuzz]'); "
                  "falling back to the Hypothesis loop")
        args.hypothesis = True
    if args.hypothesis:
        run_hypothesis(args.seconds)
    else:
        run_atheris(args.seconds, extra)


if __name__ == "__main__":
    main()
