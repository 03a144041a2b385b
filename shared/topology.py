"""Every exchange and queue name, in one place, and the code that declares them.

Takes the broker settings' ``prefix`` (``mail`` by default; tests use their own) and gives the
names: one direct exchange ``<prefix>``; one durable quorum queue per stage input
(``<prefix>.parse``, ``<prefix>.route``, ``<prefix>.persist``), bound by its own name; and for
each a dead-letter queue ``<prefix>.<stage>.dead``, bound the same way to the same exchange,
which the broker dead-letters into and the workers publish dead letters to.

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

from kombu import Connection, Exchange, Queue

from shared.schemas import Edge

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

    def declare(self, connection: Connection) -> None:
        """Declare the exchange and every queue with its binding (idempotent)."""
        with connection.channel() as channel:
            self.exchange()(channel).declare()
            for queue in self.queues():
                queue(channel).declare()

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
