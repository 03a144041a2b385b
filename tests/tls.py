"""A self-signed certificate for ``localhost``/``127.0.0.1``, for the tests' own TLS servers.

Takes a folder; gives the paths of ``cert.pem`` (which is also its own CA file) and
``key.pem`` (mode 0600), made with the ``openssl`` command, valid for two days.  Fails with
``subprocess.CalledProcessError`` when openssl refuses.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key
