"""Free TCP ports on the loopback for the tests' own servers.

Takes nothing; gives :func:`free_port`, a port the kernel just handed out and released, so
a server started on it at once finds it free (another process may take it in between: the
servers' start-up checks say so).  Fails with ``OSError`` if no port can be bound.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
