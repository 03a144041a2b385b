"""Test fixtures for the broker: a private RabbitMQ vhost per test, and queue inspection.

Takes the RabbitMQ on 127.0.0.1:5672 (guest/guest) with its management API on :15672 (the
Makefile enables the plugin); gives an AMQP URL for a fresh vhost that is deleted afterwards,
so runs never see each other's queues.  Fails the test with a clear message if RabbitMQ is
not there.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from kombu import Connection, Queue

MANAGEMENT = "http://127.0.0.1:15672"
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def management(method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        MANAGEMENT + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": AUTH, "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


@dataclass
class Vhost:
    name: str
    url: str

    def queue_info(self, queue: str) -> dict[str, Any]:
        quoted = urllib.parse.quote(self.name, safe="")
        result: dict[str, Any] = management("GET", f"/api/queues/{quoted}/{queue}")
        return result

    def policies(self) -> list[dict[str, Any]]:
        quoted = urllib.parse.quote(self.name, safe="")
        result: list[dict[str, Any]] = management("GET", f"/api/policies/{quoted}")
        return result


@pytest.fixture
def rabbit_vhost() -> Iterator[Vhost]:
    with private_vhost() as vhost:
        yield vhost


@contextmanager
def private_vhost() -> Iterator[Vhost]:
    """A fresh vhost for the block (for fixtures of a wider scope than ``rabbit_vhost``)."""
    name = f"mailroute-test-{uuid.uuid4().hex[:10]}"
    quoted = urllib.parse.quote(name, safe="")
    try:
        management("PUT", f"/api/vhosts/{quoted}", {})
    except (urllib.error.URLError, OSError) as exc:
        pytest.fail(f"RabbitMQ management API on {MANAGEMENT} not reachable ({exc}); "
                    "run `make services`")
    management("PUT", f"/api/permissions/{quoted}/guest",
               {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield Vhost(name, f"amqp://guest:guest@127.0.0.1:5672/{quoted}")
    finally:
        management("DELETE", f"/api/vhosts/{quoted}")


def drain_queue(url: str, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Take (and ack) every message now in ``queue``: (body, headers) pairs."""
    taken = []
    with Connection(url) as connection:
        bound = Queue(queue, no_declare=True)(connection.channel())
        while True:
            message = bound.get(no_ack=False, accept=["json"])
            if message is None:
                break
            body = message.body if isinstance(message.body, bytes) else message.body.encode()
            taken.append((body, dict(message.headers or {})))
            message.ack()
    return taken
