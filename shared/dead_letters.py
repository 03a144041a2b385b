"""Dead letters: list, show, retry (back to the stage they failed in) and purge, per stage.

Takes the broker URL, the topology and a stage; gives :class:`DeadLetterQueue`, which reads
the stage's ``.dead`` queue with pika.  Browsing takes messages without acking them and closes
the channel, which returns them all to the queue untouched.  A retry publishes the chosen
messages straight to the stage's own queue (default exchange, ``mandatory``, publisher
confirms) and only after the confirm acks them in the dead-letter queue, so a crash in between
can duplicate a message (persist is idempotent) but never lose one.  The runtime's headers
give the reason, detail, attempts and time; a message the broker itself dead-lettered
(delivery-limit policy) is described from its ``x-death`` header.  Fails with pika's
connection errors (the CLI turns them into a one-line message).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pika

from shared.rabbit import connect_blocking
from shared.topology import Topology
from shared.transport import PUBLISHED_MS_HEADER

# Headers a dead-lettering added; a retried message leaves without them.
DEAD_HEADERS = ("x-mailroute-stage", "x-mailroute-reason", "x-mailroute-detail",
                "x-mailroute-attempts", "x-mailroute-failed-at", "x-mailroute-publish-tag",
                "x-death", "x-first-death-exchange", "x-first-death-queue",
                "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                "x-last-death-reason", "x-delivery-count")
RETRIES_HEADER = "x-mailroute-retries"


@dataclass(frozen=True)
class DeadLetter:
    id: str
    stage: str
    reason: str
    detail: str
    attempts: int | None
    failed_at: str
    trace_id: str
    headers: dict[str, Any]
    body: bytes

    def document(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def summary(self) -> str:
        """mailbox/uid and subject, when the document has them."""
        document = self.document()
        if not isinstance(document, dict):
            return "(not a JSON document)"
        source = document.get("source") or {}
        email = document.get("email") or {}
        where = f"{source.get('mailbox', '?')}/{source.get('uid', '?')}"
        subject = email.get("subject") if isinstance(email, dict) else None
        return f"{where} {subject!r}" if subject else where


def describe(stage: str, headers: dict[str, Any], body: bytes) -> DeadLetter:
    reason = headers.get("x-mailroute-reason")
    detail = headers.get("x-mailroute-detail", "")
    attempts = headers.get("x-mailroute-attempts")
    failed_at = headers.get("x-mailroute-failed-at", "")
    deaths = headers.get("x-death")
    if reason is None and isinstance(deaths, list) and deaths:
        death = deaths[0]
        reason = str(death.get("reason", "broker"))
        reason = "delivery-limit" if reason == "delivery_limit" else reason
        detail = f"dead-lettered by the broker from {death.get('queue', '?')}"
        attempts = headers.get("x-delivery-count", death.get("count"))
        when = death.get("time")
        failed_at = when.isoformat() if hasattr(when, "isoformat") else str(when or "")
    key = hashlib.sha256(body + str(failed_at).encode() + str(reason).encode()).hexdigest()
    return DeadLetter(
        id=key[:12], stage=stage, reason=str(reason or "unknown"), detail=str(detail),
        attempts=attempts if isinstance(attempts, int) else None, failed_at=str(failed_at),
        trace_id=str(headers.get("x-mailroute-trace", "")), headers=headers, body=body)


class DeadLetterQueue:
    def __init__(self, url: str, topology: Topology, stage: str) -> None:
        self.stage = stage
        self.queue = topology.dead_queue(stage)
        self.target = topology.input_queue(stage)
        self._url = url

    def _each(self, limit: int, decide: Callable[[DeadLetter], str]) -> list[DeadLetter]:
        """Get up to ``limit`` messages; ``decide`` says "keep", "retry" or "drop" for each.
        Kept ones go back when the channel closes; gives the messages acted on."""
        connection = connect_blocking(self._url)
        acted: list[DeadLetter] = []
        try:
            channel = connection.channel()
            publish = connection.channel()
            publish.confirm_delivery()
            for _ in range(limit):
                method, properties, body = channel.basic_get(self.queue, auto_ack=False)
                if method is None:
                    break
                letter = describe(self.stage, dict(properties.headers or {}), bytes(body))
                action = decide(letter)
                if action == "keep":
                    continue
                if action == "retry":
                    publish.basic_publish("", self.target, body,
                                          self._retry_properties(properties), mandatory=True)
                channel.basic_ack(method.delivery_tag)
                acted.append(letter)
        finally:
            if connection.is_open:
                connection.close()
        return acted

    def _retry_properties(self, properties: Any) -> pika.BasicProperties:
        headers = {k: v for k, v in (properties.headers or {}).items() if k not in DEAD_HEADERS}
        retries = headers.get(RETRIES_HEADER, 0)
        headers[RETRIES_HEADER] = (retries if isinstance(retries, int) else 0) + 1
        headers[PUBLISHED_MS_HEADER] = int(time.time() * 1000)
        return pika.BasicProperties(content_type=properties.content_type or "application/json",
                                    content_encoding=properties.content_encoding,
                                    delivery_mode=2, headers=headers)

    def browse(self, limit: int = 1000) -> list[DeadLetter]:
        seen: list[DeadLetter] = []

        def keep(letter: DeadLetter) -> str:
            seen.append(letter)
            return "keep"

        self._each(limit, keep)
        return seen

    def retry(self, ids: Iterable[str] | None, limit: int = 100_000) -> list[DeadLetter]:
        """Publish the chosen (all, with None) to the stage queue, confirmed, then ack."""
        chosen = None if ids is None else set(ids)
        return self._each(limit, lambda d: "retry" if chosen is None or d.id in chosen
                          else "keep")

    def purge(self, ids: Iterable[str] | None, limit: int = 100_000) -> list[DeadLetter]:
        chosen = None if ids is None else set(ids)
        return self._each(limit, lambda d: "drop" if chosen is None or d.id in chosen
                          else "keep")
