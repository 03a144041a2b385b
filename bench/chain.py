"""One hop of the bare chain: the pipeline's ceiling, a consumer that does no work.

Run as ``python -m bench.chain --url AMQP_URL --input QUEUE [--output QUEUE]``.  Takes the
deliveries that have already arrived on ``--input`` (up to ``--prefetch``), publishes their
bytes and headers unchanged to ``--output`` on a second connection with pipelined confirms
(one wait for the whole batch), then owes the batch's ack, paid with one ``multiple`` ack
as ``shared.runtime`` pays it (``OwedAcks``: a full batch's worth, or 50 ms after the first)
-- the same contract (ack only after the output is confirmed), with nothing in between.
The last hop (no ``--output``) may store one row per message with plain SQLAlchemy
(``--sql DATABASE_URL``: the message's trace id and bytes, one transaction per batch,
committed before the ack) and appends ``<trace id> <unix time>`` per message to
``--record`` once the batch is stored, so the benchmark can tell when each message left the
chain.
Prints ``ready`` on stdout once consuming.  SIGTERM or SIGINT finish the batch and exit 0;
a nack, a returned message or a confirm timeout exits 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import IO, Any

import amqp
from kombu import Connection

from shared.amqp_frames import publish_batch
from shared.runtime import OwedAcks
from shared.settings import BrokerSettings
from shared.transport import corked

CONFIRM_TIMEOUT = 15.0


class ChainFailure(RuntimeError):
    pass


class ConfirmingPublisher:
    """Publishes on its own connection; :meth:`publish_all` waits once for every confirm."""

    def __init__(self, url: str, exchange: str) -> None:
        self.connection = Connection(url, heartbeat=0)
        self.connection.connect()
        self.channel: Any = self.connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self.exchange = exchange
        self.next_tag = 1
        self.confirmed_upto = 0
        self.confirmed: set[int] = set()
        self.failure = ""

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.confirmed_upto = max(self.confirmed_upto, delivery_tag)
        else:
            self.confirmed.add(delivery_tag)
        while self.confirmed_upto + 1 in self.confirmed:
            self.confirmed_upto += 1
            self.confirmed.discard(self.confirmed_upto)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.failure = f"nacked up to {delivery_tag}"

    def _on_return(self, *args: Any) -> None:
        self.failure = "a message was returned unroutable"

    def publish_all(self, messages: list[amqp.Message], routing_key: str) -> None:
        # framed and written as shared.transport does: the same bytes on the wire
        with corked(self.connection):
            self.next_tag += publish_batch(
                self.channel, [(message.body, self.exchange, routing_key, message.headers or {})
                               for message in messages], CONFIRM_TIMEOUT)
        last = self.next_tag - 1
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while self.confirmed_upto < last:
            if self.failure:
                raise ChainFailure(self.failure)
            if time.monotonic() > deadline:
                raise ChainFailure(f"not confirmed within {CONFIRM_TIMEOUT}s")
            try:
                self.connection.drain_events(timeout=1.0)
            except TimeoutError:
                continue
        if self.failure:
            raise ChainFailure(self.failure)

    def close(self) -> None:
        self.connection.release()


class SqlSink:
    """One row per message (trace id, bytes), one transaction per batch."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import Column, LargeBinary, MetaData, String, Table, create_engine
        from sqlalchemy.dialects.postgresql import insert

        self.engine = create_engine(url)
        metadata = MetaData()
        self.table = Table("bench_chain_rows", metadata,
                           Column("trace_id", String, primary_key=True),
                           Column("body", LargeBinary, nullable=False))
        metadata.create_all(self.engine)
        self.statement = insert(self.table).on_conflict_do_nothing()

    def store(self, messages: list[amqp.Message]) -> None:
        rows = [{"trace_id": _trace(m),
                 "body": m.body if isinstance(m.body, bytes) else str(m.body).encode()}
                for m in messages]
        with self.engine.begin() as connection:
            connection.execute(self.statement, rows)

    def close(self) -> None:
        self.engine.dispose()


def _trace(message: amqp.Message) -> str:
    value = (message.headers or {}).get("x-mailroute-trace", "")
    return value if isinstance(value, str) else str(value)


def run_hop(args: argparse.Namespace, stop: threading.Event) -> None:
    consumer = Connection(args.url, heartbeat=0)
    consumer.connect()
    publisher = ConfirmingPublisher(args.url, args.exchange) if args.output else None
    sink = SqlSink(args.sql) if args.sql else None
    record: IO[str] | None = open(args.record, "a") if args.record else None  # noqa: SIM115
    pending: list[amqp.Message] = []
    try:
        channel: Any = consumer.channel()
        channel.basic_qos(0, args.prefetch, False)
        channel.basic_consume(queue=args.input, callback=pending.append, no_ack=False)
        print("ready", flush=True)
        owed: OwedAcks[amqp.Message] = OwedAcks(
            lambda done: channel.basic_ack(done[-1].delivery_tag, multiple=True),
            max(1, args.prefetch // 2))
        while not stop.is_set():
            owed.pay_if_due()
            if not pending:
                try:
                    consumer.drain_events(timeout=owed.seconds_left(0.2))
                except TimeoutError:
                    continue
            while len(pending) < args.prefetch:
                before = len(pending)
                try:
                    consumer.drain_events(timeout=0)
                except TimeoutError:
                    break
                if len(pending) == before:
                    break
            batch = pending[:]
            pending.clear()
            if publisher is not None:
                publisher.publish_all(batch, args.output)
            if sink is not None:
                sink.store(batch)
            if record is not None:
                now = f"{time.time():.6f}"
                record.write("".join(f"{_trace(m)} {now}\n" for m in batch))
                record.flush()
            owed.owe(batch)
        owed.pay()
    finally:
        if record is not None:
            record.close()
        if sink is not None:
            sink.close()
        if publisher is not None:
            publisher.close()
        consumer.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chain", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", default="")
    parser.add_argument("--exchange", default="mail")
    parser.add_argument("--prefetch", type=int, default=BrokerSettings().prefetch)
    parser.add_argument("--record", default="")
    parser.add_argument("--sql", default="")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        run_hop(args, stop)
    except ChainFailure as exc:
        print(f"chain hop {args.input}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
