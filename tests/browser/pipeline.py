"""The pipeline the browser tests look at: Dovecot, RabbitMQ, PostgreSQL, four workers, the web.

Takes a folder under pytest's basetemp and a migrated PostgreSQL engine; gives
:func:`running_pipeline`, a :class:`Pipeline` whose one Dovecot holds the mailboxes alice
(direct), support (a queue's mailbox whose configured password Dovecot does not take) and
forward (the forward mailbox of bob and, once the test configures her, carol); a private
vhost; ``mailroute worker`` for each stage and ``mailroute web --port 0`` as subprocesses
logging into that folder.  Before the workers start, the forward mailbox receives carol's
forward (dead-lettered by route: carol is not configured yet), mallory's (never configured)
and bob's note without an attachment (dead-lettered by parse), and support receives one
message.  Passwords and the admin token are random per run and written only to the YAML
configuration.  Fails with the processes' logs when something does not come up in time.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import Engine

from tests import mailgen
from tests.broker_fixtures import Vhost, private_vhost
from tests.dovecot import DovecotServer
from tests.processes import REPO, Workers, wait_for

STAGES = ("ingest", "parse", "route", "persist")
DOMAIN = "corp.example.com"
FORWARD = f"forward@{DOMAIN}"
CAROL_MESSAGE_ID = "carol-quote-17@customer.example"
CAROL_SUBJECT = "Quote 17 for carol"
MALLORY_SUBJECT = "Spoofed forward"
SUPPORT_MESSAGE_ID = "support-invoice-4711@customer.example"
WEB_ADDRESS = re.compile(r"mailroute web: (http://\S+?)/?\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Credentials:
    """Random per run; the YAML configuration is the only file that holds them."""

    alice: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    support: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    support_before: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    forward: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def all(self) -> set[str]:
        return {self.alice, self.support, self.support_before, self.forward, self.admin_token}


def free_port_block(count: int) -> int:
    """A base port with ``count`` free ports from it (the workers' metrics: base + 0..3)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        taken: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()
        return base
    raise AssertionError(f"found no {count} consecutive free ports")


def write_config(path: Path, dovecot: DovecotServer, vhost: Vhost, engine: Engine,
                 credentials: Credentials, metrics_base: int, with_carol: bool) -> None:
    profile = dovecot.server_profile()
    box = {"kind": "imap", "server": "dovecot", "interval": 0.5}
    users = [{"name": "alice", "address": f"alice@{DOMAIN}", "mailbox": "alice"},
             {"name": "bob", "address": f"bob@{DOMAIN}", "forward": "forward"}]
    if with_carol:
        users.append({"name": "carol", "address": f"carol@{DOMAIN}", "forward": "forward"})
    config: dict[str, Any] = {
        "broker": {"url": vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 2, "initial_delay": 0.05, "max_delay": 0.5},
        "metrics": {"base_port": metrics_base},
        "servers": [{"name": "dovecot", "host": profile.host, "port": profile.port,
                     "tls": "none"}],
        "mailboxes": [
            {**box, "name": "alice", "username": "alice", "password": credentials.alice},
            {**box, "name": "support", "username": "support", "password": credentials.support},
            {**box, "name": "forward", "username": "forward", "password": credentials.forward,
             "forward": True, "address": FORWARD},
        ],
        "users": users,
        "queues": [{"name": "support", "address": f"support@{DOMAIN}", "mailbox": "support"}],
        "web": {"admin_token": credentials.admin_token,
                "metrics_urls": [f"http://127.0.0.1:{metrics_base + offset}/metrics"
                                 for offset in range(len(STAGES))]},
    }
    path.write_text(yaml.safe_dump(config))


def deliver_scenario(dovecot: DovecotServer) -> None:
    """The mail the mailbox and dead-letter tests need, there before any worker polls."""
    dovecot.deliver("support", mailgen.message(
        "billing@customer.example", [f"support@{DOMAIN}"], "Invoice 4711", "Please pay.",
        message_id=f"<{SUPPORT_MESSAGE_ID}>"))
    dovecot.deliver("forward", mailgen.forward_envelope(
        f"carol@{DOMAIN}", FORWARD, mailgen.message(
            "buyer@customer.example", [f"carol@{DOMAIN}"], CAROL_SUBJECT, "Your quote?",
            message_id=f"<{CAROL_MESSAGE_ID}>")))
    dovecot.deliver("forward", mailgen.forward_envelope(
        "mallory@evil.example", FORWARD, mailgen.message(
            "mallory@evil.example", [f"ceo@{DOMAIN}"], MALLORY_SUBJECT, "Trust me.",
            message_id="<spoofed-1@evil.example>")))
    dovecot.deliver("forward", mailgen.message(
        f"bob@{DOMAIN}", [FORWARD], "Forgot the attachment", "See attached (not).",
        message_id=f"<no-original@{DOMAIN}>"))


class WebServer:
    """``mailroute web --port 0`` as a subprocess; its address read from its first line."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "--config", str(self.config), "web",
                 "--port", "0"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        process = self.process
        wait_for(lambda: process.poll() is not None or self._address() is not None,
                 "mailroute web to print its address", 60, self.log_tail)
        address = self._address()
        assert process.poll() is None and address, \
            f"mailroute web did not start\n{self.log_tail()}"
        self.url = address
        return address

    def _address(self) -> str | None:
        found = WEB_ADDRESS.search(self.log_path.read_text(errors="replace"))
        return found.group(1) if found else None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no web log)"


@dataclass
class Pipeline:
    folder: Path
    config: Path
    dovecot: DovecotServer
    vhost: Vhost
    engine: Engine
    credentials: Credentials
    metrics_base: int
    workers: Workers
    web: WebServer

    def diagnostics(self) -> str:
        return f"{self.workers.logs()}\n===== web\n{self.web.log_tail()}"

    def await_workers(self) -> None:
        """Wait until every worker says it runs; fail at once with the logs if one ended."""
        processes = self.workers.processes
        wait_for(lambda: all(processes[s].poll() is not None or self.workers.started(s)
                             for s in STAGES), "the workers to start", 60, self.diagnostics)
        ended = {s: p.returncode for s, p in processes.items() if p.poll() is not None}
        assert not ended, f"workers ended at start: {ended}\n{self.diagnostics()}"

    def deliver_batch(self, count: int, prefix: str) -> list[str]:
        """``count`` messages to alice in one IMAP MULTIAPPEND; gives their Message-IDs."""
        ids = [f"{prefix}-{i}@customer.example" for i in range(count)]
        with self.dovecot.client("alice") as imap:
            imap.multiappend("INBOX", [mailgen.message(
                "orders@customer.example", [f"alice@{DOMAIN}"], f"Order {prefix} {i}",
                f"Order number {i}.", message_id=f"<{mid}>") for i, mid in enumerate(ids)])
        return ids

    def fix_support_password(self) -> None:
        """Give Dovecot's support user the configured password; wait until it takes it."""
        self.dovecot.add_user("support", self.credentials.support)

        def logs_in() -> bool:
            try:
                with self.dovecot.client("support"):
                    return True
            except Exception:
                return False

        wait_for(logs_in, "Dovecot to take support's new password", 30)

    def configure_carol(self) -> None:
        """Add carol to the configuration and restart route so it knows her."""
        write_config(self.config, self.dovecot, self.vhost, self.engine, self.credentials,
                     self.metrics_base, with_carol=True)
        assert self.workers.kill("route", signal.SIGTERM) == 0, self.workers.logs()
        self.workers.start("route")
        self.await_workers()


@contextmanager
def running_pipeline(folder: Path, engine: Engine) -> Iterator[Pipeline]:
    credentials = Credentials()
    with ExitStack() as stack:
        dovecot = DovecotServer(tls=False)
        stack.callback(dovecot.stop)
        dovecot.add_user("alice", credentials.alice)
        dovecot.add_user("support", credentials.support_before)  # not what mailroute has
        dovecot.add_user("forward", credentials.forward)
        dovecot.start()
        deliver_scenario(dovecot)
        vhost = stack.enter_context(private_vhost())
        config = folder / "mailroute.yaml"
        metrics_base = free_port_block(len(STAGES))
        write_config(config, dovecot, vhost, engine, credentials, metrics_base,
                     with_carol=False)
        workers = Workers(config, folder)
        web = WebServer(config, folder / "web.log")
        pipeline = Pipeline(folder, config, dovecot, vhost, engine, credentials, metrics_base,
                            workers, web)
        try:
            workers.start(*STAGES)
            web.start()
            pipeline.await_workers()
            yield pipeline
        finally:
            web_code = web.stop()
            codes = workers.stop_all()
        assert set(codes.values()) == {0}, f"workers did not stop cleanly: {codes}\n" \
            f"{workers.logs()}"
        assert web_code in (0, None), f"mailroute web ended with {web_code}\n{web.log_tail()}"
