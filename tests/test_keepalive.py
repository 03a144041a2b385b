"""HeartbeatsWhileBusy beats while, and only while, the consuming thread is in a handler.

send_heartbeat is tested on real RabbitMQ connections; the broker side of a handler that
outlasts three heartbeat intervals is tested in test_runtime.py and tests/faults/.
"""

from __future__ import annotations

import threading

from kombu import Connection

from shared.keepalive import HeartbeatsWhileBusy
from shared.transport import send_heartbeat
from tests.broker_fixtures import Vhost


class Beats:
    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def __call__(self) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait_for(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= count, timeout=10)


def test_beats_repeat_while_a_handler_runs_and_stop_when_it_returns() -> None:
    beats = Beats()
    with HeartbeatsWhileBusy(beats, 0.01, "test-keepalive") as keepalive:
        with keepalive.busy():
            assert beats.wait_for(3)
        after = beats.count
        # The helper loops many times meanwhile; none of those loops may beat.
        threading.Event().wait(0.1)
        assert beats.count == after
        with keepalive.busy():
            assert beats.wait_for(after + 1)


def test_no_beat_overlaps_the_consuming_threads_own_use_of_the_connections() -> None:
    inside = threading.Event()
    release = threading.Event()

    def slow_beat() -> None:
        inside.set()
        release.wait(10)

    with HeartbeatsWhileBusy(slow_beat, 0.01, "test-keepalive") as keepalive:
        left = threading.Event()

        def handler() -> None:
            with keepalive.busy():
                assert inside.wait(10)
            left.set()

        thread = threading.Thread(target=handler)
        thread.start()
        assert inside.wait(10)
        # The block cannot end while a beat is on the wire: the sockets are not shared.
        assert not left.wait(0.05)
        release.set()
        thread.join(10)
        assert left.is_set()


def test_closing_stops_the_helper_thread() -> None:
    keepalive = HeartbeatsWhileBusy(lambda: None, 0.01, "test-keepalive")
    with keepalive:
        assert keepalive._thread.is_alive()
    assert not keepalive._thread.is_alive()


def test_send_heartbeat_writes_a_frame_when_heartbeats_are_on(rabbit_vhost: Vhost) -> None:
    with Connection(rabbit_vhost.url, heartbeat=10) as connection:
        connection.connect()
        before = connection.connection.bytes_sent
        send_heartbeat(connection)
        assert connection.connection.bytes_sent > before
        connection.channel()  # the broker took the frame: the connection still works


def test_send_heartbeat_sends_nothing_without_heartbeats_and_never_reconnects(
        rabbit_vhost: Vhost) -> None:
    with Connection(rabbit_vhost.url, heartbeat=0) as connection:
        connection.connect()
        before = connection.connection.bytes_sent
        send_heartbeat(connection)
        assert connection.connection.bytes_sent == before
    connection = Connection(rabbit_vhost.url, heartbeat=10)
    connection.connect()
    connection.release()
    send_heartbeat(connection)  # closed: left for its user to find, not reopened here
    assert not connection.connected
    send_heartbeat(None)
