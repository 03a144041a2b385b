"""pika connections for the RabbitMQ-specific tools (journal reads, queue inspection, dead letters).

Takes the broker URL of the settings (kombu style: ``amqp://``, ``pyamqp://``, ``amqps://``);
gives a ``pika.BlockingConnection``.  Fails with ``ConnectionError`` naming the host (callers
turn it into a one-line message).  The stage workers never use pika: kombu is their transport.
"""

from __future__ import annotations

from typing import Any

import pika


def pika_url(url: str) -> str:
    for scheme, replacement in (("pyamqp://", "amqp://"), ("librabbitmq://", "amqp://")):
        if url.startswith(scheme):
            return replacement + url[len(scheme):]
    return url


def connect_blocking(url: str, timeout: float = 10.0, heartbeat: int = 60) -> Any:
    parameters = pika.URLParameters(pika_url(url))
    parameters.socket_timeout = timeout
    parameters.blocked_connection_timeout = timeout * 6
    parameters.heartbeat = heartbeat
    parameters.connection_attempts = 1
    try:
        return pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPConnectionError as exc:
        cause = str(exc) or repr(exc.args[0] if exc.args else exc)
        raise ConnectionError(f"cannot connect to RabbitMQ at {parameters.host}:"
                              f"{parameters.port} ({type(exc).__name__}: {cause})") from exc
