"""A private RabbitMQ node for fault tests that stop, restart or alarm the broker.

Takes nothing but the Debian rabbitmq-server install; gives :class:`PrivateRabbit`, a node of
its own (own node name, AMQP, management and distribution ports, data and logs in a temporary
folder), run as the ``rabbitmq`` user so it shares that user's Erlang cookie with
``rabbitmqctl``.  The machine's shared node on :5672 is never touched.  The node is configured
for the faults: a short consumer timeout, checked every second.  Fails with
:class:`RabbitError` (with the node's log tail) when the node does not come up.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.ports import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
RABBIT_HOME = "/var/lib/rabbitmq"
CONSUMER_TIMEOUT_MS = 8000


class RabbitError(RuntimeError):
    """The private node did not do what it was told."""


class PrivateRabbit:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroute-rabbit-"))
        self.node = f"mrfault{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.management_port = free_port()
        self.dist_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"management.tcp.port = {self.management_port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
            "loopback_users = none\n")
        # The consumer timeout is checked on the channel's tick (60 s by default).
        (self.root / "advanced.config").write_text(
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (self.root / "enabled_plugins").write_text("[rabbitmq_management].\n")
        user = pwd.getpwnam("rabbitmq")
        for path in [self.root, *self.root.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def amqp_url(self, port: int | None = None) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port or self.port}/%2F"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _env(self) -> list[str]:
        r = self.root
        return [f"HOME={RABBIT_HOME}", f"RABBITMQ_NODENAME={self.node}",
                f"RABBITMQ_NODE_PORT={self.port}", f"RABBITMQ_DIST_PORT={self.dist_port}",
                f"RABBITMQ_CONFIG_FILE={r / 'rabbitmq.conf'}",
                f"RABBITMQ_ADVANCED_CONFIG_FILE={r / 'advanced.config'}",
                f"RABBITMQ_ENABLED_PLUGINS_FILE={r / 'enabled_plugins'}",
                f"RABBITMQ_MNESIA_BASE={r / 'mnesia'}", f"RABBITMQ_LOG_BASE={r / 'log'}",
                f"RABBITMQ_PID_FILE={r / 'pid'}"]

    def _as_rabbitmq(self, *command: str) -> list[str]:
        return ["runuser", "-u", "rabbitmq", "--", "env", *self._env(), *command]

    def start(self) -> PrivateRabbit:
        log = open(self.root / "server.out", "ab")  # noqa: SIM115 - the child keeps it
        self._process = subprocess.Popen(self._as_rabbitmq(SERVER), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.close()
        try:
            self.ctl("wait", str(self.root / "pid"), "--timeout", "120", timeout=150)
        except RabbitError:
            self.stop()
            raise
        return self

    def ctl(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(self._as_rabbitmq(CTL, "-n", self.node, *args),
                                capture_output=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RabbitError(f"rabbitmqctl {' '.join(args)} failed: "
                              f"{result.stderr.decode(errors='replace')}\n{self.log_tail()}")
        return result.stdout.decode(errors="replace")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")

    def set_memory_alarm(self, on: bool) -> None:
        """Raise (or clear) the memory alarm: publishers get ``connection.blocked``."""
        self.ctl("set_vm_memory_high_watermark", "0.000001" if on else "0.4")

    def management(self, method: str, path: str, body: Any = None) -> Any:
        token = base64.b64encode(b"guest:guest").decode()
        request = urllib.request.Request(
            self.management_url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"authorization": f"Basic {token}", "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def add_vhost(self) -> str:
        """A fresh vhost for one test; gives its AMQP URL."""
        name = f"fault-{uuid.uuid4().hex[:8]}"
        self.management("PUT", f"/api/vhosts/{name}", {})
        self.management("PUT", f"/api/permissions/{name}/guest",
                        {"configure": ".*", "write": ".*", "read": ".*"})
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"

    def delete_vhost(self, url: str) -> None:
        with contextlib.suppress(OSError):
            self.management("DELETE", f"/api/vhosts/{url.rsplit('/', 1)[1]}")

    def queue_info(self, vhost_url: str, queue: str) -> dict[str, Any]:
        vhost = vhost_url.rsplit("/", 1)[1]
        result: dict[str, Any] = self.management("GET", f"/api/queues/{vhost}/{queue}")
        return result

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in [self.root / "server.out", *sorted((self.root / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(RabbitError, subprocess.TimeoutExpired):
                self.ctl("stop", str(self.root / "pid"), timeout=60)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + 10
        while self.root.exists():
            shutil.rmtree(self.root, ignore_errors=time.monotonic() < deadline)
