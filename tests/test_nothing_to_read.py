"""``nothing_to_read``: the cheap check a worker makes before draining a connection without
waiting, on real RabbitMQ connections."""

from __future__ import annotations

import os
import resource
import select
import socket

import pytest
from kombu import Connection, Consumer, Producer, Queue
from kombu.message import Message

from shared.transport import nothing_to_read
from tests.broker_fixtures import Vhost


def _socket(connection: Connection) -> socket.socket:
    sock: socket.socket = connection.connection.transport.sock
    return sock


def test_true_only_while_no_frame_is_waiting(rabbit_vhost: Vhost) -> None:
    with Connection(rabbit_vhost.url, heartbeat=0) as connection:
        connection.connect()
        channel = connection.channel()
        channel.queue_declare("reads", auto_delete=True)
        received: list[Message] = []
        Consumer(connection.channel(), queues=[Queue("reads", no_declare=True)],
                 on_message=received.append, no_ack=True).consume()
        assert nothing_to_read(connection)

        Producer(channel).publish(b"hello", routing_key="reads")
        assert select.select([_socket(connection)], [], [], 10)[0], "no delivery came"
        assert not nothing_to_read(connection)

        connection.drain_events(timeout=10)
        assert [m.body for m in received] == [b"hello"]
        assert nothing_to_read(connection)


def test_sockets_beyond_select_s_limit_are_asked_too(rabbit_vhost: Vhost) -> None:
    """A worker with many files open (ingest with a fleet of IMAP connections) gets socket
    descriptors above 1023, which select(2) refuses."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"the open-files limit ({soft}) is too low to reach descriptor 1024")
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1024:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        with Connection(rabbit_vhost.url, heartbeat=0) as connection:
            connection.connect()
            assert _socket(connection).fileno() > 1023
            assert nothing_to_read(connection)
    finally:
        for descriptor in fillers:
            os.close(descriptor)


def test_a_closed_socket_counts_as_something_to_read(rabbit_vhost: Vhost) -> None:
    with Connection(rabbit_vhost.url, heartbeat=0) as connection:
        connection.connect()
        _socket(connection).shutdown(socket.SHUT_RD)
        assert not nothing_to_read(connection)  # so its reader meets the end of the stream


def test_false_if_py_amqp_no_longer_keeps_its_read_buffer_where_it_did(
        rabbit_vhost: Vhost) -> None:
    with Connection(rabbit_vhost.url, heartbeat=0) as connection:
        connection.connect()
        transport = connection.connection.transport
        assert nothing_to_read(connection)
        del transport._read_buffer  # as a py-amqp that renamed it would look
        assert not nothing_to_read(connection)
        transport._read_buffer = b""


def test_false_where_it_cannot_tell(rabbit_vhost: Vhost) -> None:
    assert not nothing_to_read(None)
    memory = Connection("memory://")
    memory.connect()
    assert not nothing_to_read(memory)
    never_opened = Connection(rabbit_vhost.url)
    assert not nothing_to_read(never_opened)
    assert not never_opened.connected  # asking did not open it
    released = Connection(rabbit_vhost.url)
    released.connect()
    released.release()
    assert not nothing_to_read(released)
