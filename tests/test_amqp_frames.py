"""``shared.amqp_frames``: the batch framer writes what py-amqp's publish would, byte for byte.

The byte comparison runs py-amqp's own frame writer (``amqp.method_framing.frame_writer``)
into a recording transport, so it needs no server; the round trip through a real RabbitMQ
(bodies larger than ``frame_max``, every header type, confirms for every message) is below.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import amqp
import pytest
from amqp import spec
from amqp.method_framing import frame_writer
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Queue

from shared import amqp_frames
from shared.amqp_frames import encode_table, publish_batch
from shared.settings import BrokerSettings
from shared.transport import Broker, Envelope
from tests.broker_fixtures import Vhost

FRAME_MAX = 4096  # small, so that modest bodies need several body frames


class RecordingTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.timeouts: list[float | None] = []

    def write(self, data: Any) -> None:
        self.written += bytes(data)
        self.writes += 1

    @contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[None]:
        self.timeouts.append(timeout)
        yield


def fake_channel(frame_max: int = FRAME_MAX, channel_id: int = 3) -> SimpleNamespace:
    connection = SimpleNamespace(frame_max=frame_max, transport=RecordingTransport(),
                                 bytes_sent=0)
    return SimpleNamespace(connection=connection, channel_id=channel_id)


def py_amqp_bytes(messages: list[tuple[bytes, str, str, dict[str, Any]]],
                  frame_max: int = FRAME_MAX, channel_id: int = 3) -> bytes:
    """What py-amqp's basic_publish writes for the same messages (as kombu prepares them)."""
    transport = RecordingTransport()
    write = frame_writer(SimpleNamespace(frame_max=frame_max, bytes_sent=0), transport)
    for body, exchange, routing_key, headers in messages:
        message = amqp.Message(body, priority=0, content_type="application/json",
                               content_encoding="utf-8", application_headers=headers,
                               delivery_mode=2)
        args = amqp.serialization.dumps("Bssbb", (0, exchange, routing_key, True, False))
        write(1, channel_id, spec.Basic.Publish, args, message)
    return bytes(transport.written)


def ours(messages: list[tuple[bytes, str, str, dict[str, Any]]],
         frame_max: int = FRAME_MAX, channel_id: int = 3) -> tuple[bytes, SimpleNamespace]:
    channel = fake_channel(frame_max, channel_id)
    assert publish_batch(channel, messages, timeout=7.0) == len(messages)
    return bytes(channel.connection.transport.written), channel


HEADERS = {"x-mailroute-trace": "abc", "x-mailroute-publish-tag": 7,
           "x-mailroute-published-ms": 1_795_000_000_000, "flag": True, "off": False,
           "negative": -5, "most-negative": -2_147_483_648, "unicode": "grüße ✉"}


@pytest.mark.parametrize("size", [0, 1, FRAME_MAX - 8, FRAME_MAX - 7, 3 * (FRAME_MAX - 8) + 1,
                                  40_000])
def test_frames_equal_py_amqp_for_every_body_size(size: int) -> None:
    messages = [(bytes(range(256)) * (size // 256) + b"x" * (size % 256), "mail", "mail.parse",
                 HEADERS)]
    written, _ = ours(messages)
    assert written == py_amqp_bytes(messages)


def test_a_batch_is_one_write_and_counts_for_the_heartbeat() -> None:
    messages = [(b"{}" * 100, "mail", f"mail.q{i % 3}", {**HEADERS, "n": i})
                for i in range(50)]
    written, channel = ours(messages, frame_max=131072)
    assert written == py_amqp_bytes(messages, frame_max=131072)
    transport = channel.connection.transport
    assert transport.writes == 1
    assert transport.timeouts == [7.0]
    assert channel.connection.bytes_sent == 50


def test_large_bodies_are_written_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqp_frames, "FLUSH_BYTES", 10_000)
    body = b"y" * 100_000
    written, channel = ours([(body, "", "q", {})])
    assert written == py_amqp_bytes([(body, "", "q", {})])
    assert channel.connection.transport.writes >= 100_000 // (10_000 + FRAME_MAX)


def test_a_text_body_is_encoded_as_py_amqp_encodes_it() -> None:
    """py-amqp hands received bodies over as text when they carry a content encoding."""
    messages: list[tuple[Any, str, str, dict[str, Any]]] = [("grüße ✉" * 100, "x", "y", {})]
    assert ours(messages)[0] == py_amqp_bytes(messages)


def test_other_header_types_go_through_py_amqps_encoder() -> None:
    headers = {"nested": {"a": 1}, "ratio": 0.5, "none": None, "list": [1, "two"]}
    assert encode_table(headers) == amqp.serialization.dumps("F", [headers])
    messages = [(b"body", "x", "y", headers)]
    assert ours(messages)[0] == py_amqp_bytes(messages)


def test_an_overlong_routing_key_is_refused_before_anything_is_written() -> None:
    channel = fake_channel()
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        publish_batch(channel, [(b"x", "", "k" * 256, {})], timeout=None)
    assert channel.connection.transport.writes == 0


header_values = st.one_of(st.text(max_size=40), st.booleans(),
                          st.integers(min_value=-(2**63), max_value=2**63 - 1))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20).filter(
           lambda k: len(k.encode("utf-8", "surrogatepass")) <= 255),
       header_values, max_size=8),
       st.binary(max_size=3 * FRAME_MAX))
def test_any_simple_headers_and_body_frame_as_py_amqp(headers: dict[str, Any],
                                                        body: bytes) -> None:
    messages = [(body, "mail", "mail.route", headers)]
    assert ours(messages)[0] == py_amqp_bytes(messages)


def test_round_trip_through_rabbitmq_with_confirms(rabbit_vhost: Vhost) -> None:
    """Bodies larger than the broker's frame_max, all header types: every message arrives
    whole, with its headers and properties, and every one is confirmed."""
    broker = Broker(BrokerSettings(url=rabbit_vhost.url))
    exchange = Exchange("frames-test", type="direct", durable=True)
    queue = Queue("frames-test", exchange=exchange, routing_key="frames-test", durable=True)
    with Connection(rabbit_vhost.url) as connection:
        queue(connection.channel()).declare()
    bodies = [uuid.uuid4().bytes * n for n in (0, 1, 1000, 40_000)]  # up to 640 KB
    # (the publisher sets the two x-mailroute-publish* headers itself)
    headers = {key: value for key, value in HEADERS.items()
               if not key.startswith("x-mailroute-publish")}
    envelopes = [Envelope(body, "frames-test", "frames-test", {**headers, "n": index})
                 for index, body in enumerate(bodies)]
    publisher = broker.publisher()
    try:
        publisher.publish_envelopes(envelopes)  # raises unless every message is confirmed
    finally:
        publisher.close()
    received = []
    with Connection(rabbit_vhost.url) as connection:
        bound = queue(connection.channel())
        while (message := bound.get(no_ack=False)) is not None:
            received.append(message)
            message.ack()
    # (kombu hands an empty body over as '')
    assert [m.body or b"" for m in received] == bodies
    for index, message in enumerate(received):
        received_headers = dict(message.headers)
        assert received_headers.pop("x-mailroute-publish-tag") == index + 1
        assert isinstance(received_headers.pop("x-mailroute-published-ms"), int)
        assert received_headers == {**headers, "n": index}
        assert message.content_type == "application/json"
        assert message.content_encoding == "utf-8"
        assert message.properties["delivery_mode"] == 2
