"""Every exchange and queue name, in one place, and the code that declares them.

Takes the broker settings' ``prefix`` (``mail`` by default; tests use their own) and gives the
names: one direct exchange ``<prefix>``; one durable quorum queue per stage input
(``<prefix>.parse``, ``<prefix>.route``, ``<prefix>.persist``), bound by its own name; and for
each a dead-letter queue ``<prefix>.<stage>.dead``, bound the same way to the same exchange,
which the broker dead-letters into and the workers publish dead letters to.

The journal ``<prefix>.journal`` is a RabbitMQ stream bound to the same exchange with the
routing key of every stage queue, so one confirmed publish lands in both the stage queue and
the journal (the confirm covers both: no second publish, no window where one has it and the
other not).  Replays and dead-letter retries publish through the default exchange straight to
a stage queue, so they do not append the same input to the journal again.  Retention comes
from ``JournalSettings`` as queue arguments; a stream that exists with other arguments is
kept as it is (the broker refuses to change them) and the difference is logged.

The delivery limit is set by a RabbitMQ policy (queue arguments cannot change once a queue
exists, a policy can), through the management API.  Where that API cannot be reached the
declaration still succeeds and the worker runtime enforces the same limit from the
``x-delivery-count`` header, so the limit holds either way; the reason is logged.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from kombu import Connection, Exchange, Queue, binding

from shared.schemas import Edge
from shared.settings import JournalSettings

log = logging.getLogger(__name__)

STAGES = ("parse", "route", "persist")
EDGE_TARGET: dict[Edge, str] = {"raw": "parse", "parsed": "route", "routed": "persist"}
STAGE_INPUT: dict[str, Edge] = {stage: edge for edge, stage in EDGE_TARGET.items()}


@dataclass(frozen=True)
class Topology:
    prefix: str = "mail"

    @property
    def exchange_name(self) -> str:
        return self.prefix

    def input_queue(self, stage: str) -> str:
        return f"{self.prefix}.{stage}"

    def dead_queue(self, stage: str) -> str:
        return f"{self.prefix}.{stage}.dead"

    def queue_for_edge(self, edge: Edge) -> str:
        return self.input_queue(EDGE_TARGET[edge])

    @property
    def journal_name(self) -> str:
        return f"{self.prefix}.journal"

    def stage_of_queue(self, queue: str) -> str | None:
        """The stage whose input ``queue`` is (also a journal message's routing key)."""
        for stage in STAGES:
            if queue == self.input_queue(stage):
                return stage
        return None

    def journal(self, settings: JournalSettings) -> Queue:
        """The journal stream, bound by every stage queue's routing key."""
        return Queue(
            self.journal_name, durable=True,
            bindings=[binding(self.exchange(), routing_key=self.input_queue(stage))
                      for stage in STAGES],
            queue_arguments={
                "x-queue-type": "stream",
                "x-max-age": settings.max_age,
                "x-max-length-bytes": settings.max_length_bytes,
                "x-stream-max-segment-size-bytes": settings.segment_size_bytes,
            })

    def exchange(self) -> Exchange:
        return Exchange(self.exchange_name, type="direct", durable=True)

    def queues(self) -> list[Queue]:
        queues = []
        for stage in STAGES:
            name = self.input_queue(stage)
            queues.append(Queue(
                name, self.exchange(), routing_key=name, durable=True,
                queue_arguments={
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": self.exchange_name,
                    "x-dead-letter-routing-key": self.dead_queue(stage),
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }))
            dead = self.dead_queue(stage)
            queues.append(Queue(dead, self.exchange(), routing_key=dead, durable=True,
                                queue_arguments={"x-queue-type": "quorum"}))
        return queues

    def declare(self, connection: Connection, journal: JournalSettings | None = None) -> None:
        """Declare the exchange and every queue with its binding (idempotent); with
        ``journal`` settings also the journal stream and its bindings."""
        with connection.channel() as channel:
            self.exchange()(channel).declare()
            for queue in self.queues():
                queue(channel).declare()
        if journal is not None and journal.enabled:
            self._declare_journal(connection, journal)

    def _declare_journal(self, connection: Connection, settings: JournalSettings) -> None:
        stream = self.journal(settings)
        try:
            with connection.channel() as channel:
                stream(channel).declare()
            return
        except connection.channel_errors as exc:
            # PRECONDITION_FAILED: it exists with other retention arguments.  Keep it.
            log.warning("journal %s exists with other arguments than the settings (%s); "
                        "keeping it as it is (change retention with a policy)",
                        self.journal_name, exc)
        with connection.channel() as channel:
            Queue(self.journal_name, no_declare=True)(channel).queue_declare(passive=True)
            for bound in stream.bindings:
                bound.bind(stream(channel), nowait=False)

    def policy_name(self) -> str:
        return f"{self.prefix}-stage-queues"

    def policy_pattern(self) -> str:
        escaped = self.prefix.replace(".", r"\.")
        return rf"^{escaped}\.({'|'.join(STAGES)})$"


def apply_delivery_limit_policy(topology: Topology, broker_url: str, management_url: str,
                                limit: int, log: logging.Logger) -> bool:
    """Set the stage queues' delivery limit by policy; False (and a log line) if impossible."""
    parsed = urllib.parse.urlparse(broker_url)
    if parsed.scheme not in ("amqp", "amqps", "pyamqp"):
        return False
    vhost = urllib.parse.unquote(parsed.path[1:]) if len(parsed.path) > 1 else "/"
    user = urllib.parse.unquote(parsed.username or "guest")
    password = urllib.parse.unquote(parsed.password or "guest")
    url = (f"{management_url.rstrip('/')}/api/policies/"
           f"{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(topology.policy_name())}")
    body = json.dumps({
        "pattern": topology.policy_pattern(),
        "apply-to": "queues",
        "priority": 1,
        "definition": {"delivery-limit": limit},
    }).encode()
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, data=body, method="PUT", headers={
        "content-type": "application/json", "authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except (urllib.error.URLError, OSError) as exc:
        log.warning("delivery-limit policy not set through %s (%s); the workers enforce "
                    "the limit of %d from x-delivery-count instead", management_url, exc, limit)
        return False
