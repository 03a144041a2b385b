"""``python -m bench [pipeline|parse|ingest|persist|memory|fleet|all] [--quick]``: run
benchmarks.

Prints and saves the figures.

Takes the command line; prints each figure with the ceiling measured in the same run and
their ratio on stdout (progress goes to stderr) and writes ``var/bench/<name>.json``.  Exits
0 when every benchmark ran (a missed target is reported, not an error), 1 when one could
not run or finish correctly (a server missing, a worker dying, messages lost), 2 on a bad
command line.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bench import fleet as fleet_bench
from bench import ingest as ingest_bench
from bench import memory as memory_bench
from bench import parse as parse_bench
from bench import persist as persist_bench
from bench import pipeline as pipeline_bench
from bench.common import REPORT_DIR, BenchError, Figure, load_average, progress, write_report
from bench.profile import categorise, summarise


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="mailroute benchmarks (see bench/README.md)")
    parser.add_argument("which", nargs="?", default="all",
                        choices=["pipeline", "parse", "ingest", "persist", "memory", "fleet",
                                 "all"],
                        help="all = every benchmark but fleet, which runs on its own")
    parser.add_argument("--quick", action="store_true",
                        help="fewer messages, shorter offered-load phases, fewer rounds")
    parser.add_argument("--messages", type=int,
                        help="pipeline: messages per saturated run (default 5000, quick 1000)")
    parser.add_argument("--duration", type=float,
                        help="pipeline: seconds per offered-load rate (default 20, quick 5)")
    parser.add_argument("--rates", default="100,300",
                        help="pipeline: offered loads in msg/s, comma-separated")
    parser.add_argument("--repeat", type=int,
                        help="pipeline: saturated runs, median reported (default 3, quick 1)")
    parser.add_argument("--sink", choices=["none", "sql"], default="none",
                        help="pipeline ceiling's last hop: store nothing, or one row per "
                             "message with plain SQLAlchemy")
    parser.add_argument("--profile", action="store_true",
                        help="pipeline: record each worker with py-spy during the first "
                             f"saturated run ({REPORT_DIR}/profile/) and summarise")
    parser.add_argument("--rounds", type=int,
                        help="parse: rounds (default 5, quick 2); ingest and persist: rounds "
                             "(default 3, quick 1)")
    parser.add_argument("--mailboxes", type=int,
                        help="fleet: mailboxes to cover (default 2000, quick 500)")
    parser.add_argument("--idle-samples", type=int,
                        help="fleet: APPENDs timed through IDLE (default 20, quick 8)")
    return parser.parse_args(argv)


def show(name: str, figures: list[Figure], path: Path) -> None:
    load = " ".join(f"{v:.2f}" for v in load_average())
    print(f"\n== {name} (load average {load})")
    for figure in figures:
        print(figure.line())
    print(f"-> {path}")


def run_pipeline(options: argparse.Namespace) -> None:
    quick = options.quick
    settings = pipeline_bench.PipelineSettings(
        messages=options.messages or (1000 if quick else 5000),
        rates=tuple(int(r) for r in options.rates.split(",") if r.strip()),
        duration=options.duration or (5.0 if quick else 20.0),
        repeat=options.repeat or (1 if quick else 3),
        sink=options.sink,
        profile_dir=REPORT_DIR / "profile" if options.profile else None)
    if (not settings.rates or min(settings.rates) <= 0 or settings.messages < 10
            or settings.duration <= 0):
        raise SystemExit("bench: --rates, --messages (>= 10) and --duration must be positive")
    figures = pipeline_bench.run(settings)
    path = write_report("pipeline", figures, {
        "messages": settings.messages, "message_size": settings.message_size,
        "rates": list(settings.rates), "seconds_per_rate": settings.duration,
        "saturated_runs": settings.repeat, "prefetch": settings.prefetch,
        "queues": "quorum", "stages": "parse, route, persist: one process each",
        "database": "PostgreSQL", "ceiling": f"bare chain, last hop sink={settings.sink}",
        "quick": quick})
    show("pipeline", figures, path)
    if settings.profile_dir:
        show_profiles(settings.profile_dir)


def show_profiles(folder: Path) -> None:
    for stage in ("parse", "route", "persist"):
        path = folder / f"{stage}.txt"
        if not path.exists():
            continue
        summary = summarise(path)
        print(f"\n-- profile {stage}: {summary.samples} samples (busy threads only); "
              "own time / with callees")
        for name, share in categorise(path):
            print(f"  where {share:6.1%}  {name}")
        for name, share in summary.own[:12]:
            print(f"  own   {share:6.1%}  {name}")
        for name, share in summary.total[:20]:
            print(f"  total {share:6.1%}  {name}")


def run_parse(options: argparse.Namespace) -> None:
    settings = parse_bench.ParseSettings(
        rounds=options.rounds or (2 if options.quick else 5),
        seconds_per_round=0.5 if options.quick else 1.0)
    figures, extra = parse_bench.run(settings)
    path = write_report("parse", figures, {
        "rounds": settings.rounds, "seconds_per_round": settings.seconds_per_round,
        "envelopes": settings.envelopes, "reference": "email.message_from_bytes("
        "policy=policy.default) extracting the same fields", "quick": options.quick,
        **extra})
    show("parse", figures, path)


def run_ingest(options: argparse.Namespace) -> None:
    quick = options.quick
    settings = ingest_bench.IngestSettings(messages=1000 if quick else 5000,
                                           rounds=options.rounds or (1 if quick else 3))
    figures, extra = ingest_bench.run(settings)
    path = write_report("ingest", figures, {
        "messages": settings.messages, "message_size": settings.message_size,
        "batch_size": settings.batch_size, "rounds": settings.rounds, "after": "keep",
        "ceiling": "imapclient alone, UID FETCH BODY.PEEK[] in the same batch size",
        "quick": quick}, extra)
    show("ingest", figures, path)
    if extra["peers_missing"]:
        print(f"   peers not installed: {', '.join(extra['peers_missing'])} "
              "(apt-get install isync fetchmail)")


def run_persist(options: argparse.Namespace) -> None:
    quick = options.quick
    settings = persist_bench.PersistSettings(records=3000 if quick else 20_000,
                                             rounds=options.rounds or (1 if quick else 3))
    figures = persist_bench.run(settings)
    path = write_report("persist", figures, {
        "records": settings.records, "batch_size": settings.batch_size,
        "rounds": settings.rounds, "record": "one routed 4 KB email with one delivery",
        "writers": list(settings.writers),
        "writer": "a process with its own engine, writing a disjoint share of the records; "
                  "the first batch of each share is a warm-up, stored but not timed",
        "ceiling": "SQLAlchemy Core executemany INSERTs of the same rows, same batches, "
                   "as many writer processes",
        "quick": quick})
    show("persist", figures, path)


def run_memory(options: argparse.Namespace) -> None:
    settings = memory_bench.MemorySettings(messages=500 if options.quick else 2000)
    figures = memory_bench.run(settings)
    path = write_report("memory", figures, {
        "messages": settings.messages, "attachment_mb": settings.attachment_mb,
        "quick": options.quick})
    show("memory", figures, path)




def run_fleet(options: argparse.Namespace) -> None:
    settings = fleet_bench.FleetBenchSettings(
        mailboxes=options.mailboxes or (500 if options.quick else 2000),
        idle_samples=options.idle_samples or (8 if options.quick else 20))
    figures = fleet_bench.run(settings)
    path = write_report("fleet", figures, {
        "mailboxes": settings.mailboxes, "pollers": list(settings.pollers),
        "polls_at_a_time_per_poller": fleet_bench.THREADS, "idle_samples":
        settings.idle_samples, "database": "PostgreSQL", "login": "Dovecot master user",
        "ceiling": "bare imapclient LOGIN+STATUS+LOGOUT in 8 threads; bare IDLE session",
        "quick": options.quick})
    show("fleet", figures, path)


RUNNERS = {"parse": run_parse, "pipeline": run_pipeline, "ingest": run_ingest,
           "persist": run_persist, "memory": run_memory, "fleet": run_fleet}
ALL = ("parse", "pipeline", "ingest", "persist", "memory")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    options = arguments(argv)
    # SIGTERM (timeout, CI cancel) and SIGINT -- even when the shell started us with it
    # ignored -- unwind the with-blocks, which stop the workers and drop vhost and database.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    chosen = list(ALL) if options.which == "all" else [options.which]
    try:
        for name in chosen:
            progress(f"{name} benchmark{' (quick)' if options.quick else ''}")
            RUNNERS[name](options)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
