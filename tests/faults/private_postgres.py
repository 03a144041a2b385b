"""A private PostgreSQL server for fault tests that stop or restart the database.

Takes the Debian PostgreSQL 15 binaries; gives :class:`PrivatePostgres`, a cluster of its own
(``initdb`` in a temporary folder, a free port, trust authentication) run as the ``postgres``
user, which a test may stop (``immediate`` kills every backend mid-transaction) and start
again.  The machine's shared server on :5432 is never touched.  Fails with
:class:`PostgresError` (with the server's log tail) when a ``pg_ctl`` step fails.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.ports import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresError(RuntimeError):
    """pg_ctl or initdb failed."""


class PrivatePostgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroute-postgres-"))
        self.data = self.root / "data"
        self.port = free_port()
        user = pwd.getpwnam("postgres")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str, timeout: float = 120) -> str:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *command],
                                capture_output=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise PostgresError(f"{' '.join(command)} failed: "
                                f"{result.stderr.decode(errors='replace')}\n{self.log_tail()}")
        return result.stdout.decode(errors="replace")

    def start(self) -> PrivatePostgres:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                  "-w", "-t", "120", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop; ``immediate`` aborts every open transaction, as a crash would."""
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        result = subprocess.run(["runuser", "-u", "postgres", "--", str(BIN / "pg_ctl"),
                                 "-D", str(self.data), "status"], capture_output=True,
                                check=False)
        return result.returncode == 0

    def create_database(self, name: str) -> str:
        self._run(str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), name)
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            self.stop("immediate")
        deadline = time.monotonic() + 10
        while self.root.exists():
            shutil.rmtree(self.root, ignore_errors=time.monotonic() < deadline)
