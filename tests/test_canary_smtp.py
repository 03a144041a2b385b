"""Canaries handed over by SMTP with TLS and a login, to a real SMTP server (aiosmtpd, started
by the test on a free port with a certificate of its own): STARTTLS whenever offered, SMTPS,
the certificate checked, the login sent only over TLS, every failure named."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from ingest.canary import Handover
from shared.secrets import Keyring, Secret
from shared.settings import CanarySettings, ConfigError, load_settings
from tests.ports import free_port
from tests.tls import self_signed_certificate

SENDER = "mailroute-canary@corp.example.com"
USER, PASSWORD = "canary-sender", "s3cret-pass"
MESSAGE = b"From: a@corp.example.com\r\nTo: b@corp.example.com\r\nSubject: c\r\n\r\nbody\r\n"


@dataclass
class Received:
    """What the server saw: each message, and whether its session was TLS and logged in."""

    messages: list[tuple[str, list[str], bytes, bool, Any]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # session.ssl is set by STARTTLS; an SMTPS connection is TLS from its transport on
        over_tls = session.ssl is not None or \
            server.transport.get_extra_info("ssl_object") is not None
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                              over_tls, session.auth_data))
        return "250 OK"


def _authenticator(received: Received) -> Any:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            received.logins.append(data.login.decode())
            if data.login.decode() == USER and data.password.decode() == PASSWORD:
                return AuthResult(success=True, auth_data=USER)
        return AuthResult(success=False, handled=False)
    return check


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("smtp-cert"))


@dataclass
class Server:
    received: Received
    port: int
    ca_file: str


@pytest.fixture
def smtp_server(request: pytest.FixtureRequest,
                certificate: tuple[Path, Path]) -> Iterator[Server]:
    """``starttls`` (STARTTLS offered), ``smtps`` (TLS from the start) or ``plain``."""
    kind = request.param
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    received = Received()
    port = free_port()
    # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; SMTPS is TLS all along
    options: dict[str, Any] = {"authenticator": _authenticator(received),
                               "auth_require_tls": kind == "starttls"}
    if kind == "starttls":
        options["tls_context"] = context
    elif kind == "smtps":
        options["ssl_context"] = context
    controller = Controller(received, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield Server(received, port, str(cert))
    finally:
        controller.stop()


def send(handover: Handover) -> str | None:
    [result] = handover.send(SENDER, [("b@corp.example.com", MESSAGE)])
    return result


@pytest.mark.parametrize("smtp_server, scheme", [("starttls", "smtp"), ("smtps", "smtps")],
                         indirect=["smtp_server"])
def test_a_canary_goes_over_tls_logged_in(smtp_server: Server, scheme: str) -> None:
    handover = Handover(f"{scheme}://127.0.0.1:{smtp_server.port}", timeout=10,
                        ca_file=smtp_server.ca_file, username=USER, password=Secret(PASSWORD))
    assert send(handover) is None
    [(sender, recipients, content, over_tls, logged_in)] = smtp_server.received.messages
    assert (sender, recipients, over_tls, logged_in) == (
        SENDER, ["b@corp.example.com"], True, USER)
    assert content.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("smtp_server", ["starttls"], indirect=True)
def test_starttls_is_used_whenever_offered_even_without_a_login(smtp_server: Server) -> None:
    handover = Handover(f"smtp://127.0.0.1:{smtp_server.port}", timeout=10,
                        ca_file=smtp_server.ca_file)
    assert send(handover) is None
    [(_, _, _, over_tls, logged_in)] = smtp_server.received.messages
    assert over_tls and logged_in is None


@pytest.mark.parametrize("smtp_server, scheme", [("starttls", "smtp"), ("smtps", "smtps")],
                         indirect=["smtp_server"])
def test_a_certificate_that_cannot_be_checked_fails_the_handover(smtp_server: Server,
                                                                  scheme: str) -> None:
    """No ca_file: the self-signed certificate is not trusted, and nothing falls back."""
    url = f"{scheme}://127.0.0.1:{smtp_server.port}"
    result = send(Handover(url, timeout=10, username=USER, password=Secret(PASSWORD)))
    assert result is not None and result.startswith(f"cannot reach {url}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in result
    assert smtp_server.received.messages == [] and smtp_server.received.logins == []


@pytest.mark.parametrize("smtp_server", ["plain"], indirect=True)
def test_the_login_is_never_sent_without_tls(smtp_server: Server) -> None:
    url = f"smtp://127.0.0.1:{smtp_server.port}"
    result = send(Handover(url, timeout=10, username=USER, password=Secret(PASSWORD)))
    assert result == (f"cannot reach {url}: SMTPNotSupportedError: the server offers no "
                      "STARTTLS, and the login is never sent in plain text")
    assert smtp_server.received.messages == [] and smtp_server.received.logins == []
    # without a login, a server that offers no TLS gets the canary as before
    assert send(Handover(url, timeout=10)) is None
    assert [over_tls for *_, over_tls, _ in smtp_server.received.messages] == [False]


@pytest.mark.parametrize("smtp_server", ["starttls"], indirect=True)
def test_a_refused_login_is_named(smtp_server: Server) -> None:
    url = f"smtp://127.0.0.1:{smtp_server.port}"
    result = send(Handover(url, timeout=10, ca_file=smtp_server.ca_file, username=USER,
                           password=Secret("wrong")))
    assert result is not None and result.startswith(f"{url} refused the login: 535 ")
    # smtplib tries each mechanism the server offers (PLAIN, then LOGIN)
    assert set(smtp_server.received.logins) == {USER} and smtp_server.received.messages == []


def test_canary_settings_carry_the_login_and_refuse_half_of_one(tmp_path: Path) -> None:
    def load(canaries: str, environ: dict[str, str] | None = None) -> CanarySettings:
        path = tmp_path / "mailroute.yaml"
        path.write_text("canaries:\n" + canaries)
        return load_settings(path, environ=environ or {}).canaries

    settings = load("  delivery_url: smtp://mail.example.com:587\n  username: u\n"
                    "  password: p4ss-w0rd\n  ca_file: /etc/ssl/private-ca.pem\n")
    handover = Handover.from_settings(settings)
    assert (handover.ca_file, handover.login) == ("/etc/ssl/private-ca.pem",
                                                  ("u", Secret("p4ss-w0rd")))
    assert "p4ss-w0rd" not in repr(settings)
    with pytest.raises(ConfigError, match="username and password go together"):
        load("  delivery_url: smtp://mail.example.com\n  username: u\n")
    with pytest.raises(ConfigError, match="LMTP has no login"):
        load("  delivery_url: lmtp://mail.example.com\n  username: u\n  password: p\n")
    key = Keyring.new_key()
    encrypted = load(f"  delivery_url: smtps://mail.example.com\n  username: u\n"
                     f"  password: {Keyring([key]).encrypt('p4ss-w0rd')}\n",
                     {"MAILROUTE_SECRETS__KEYS": key})
    assert encrypted.password == Secret("p4ss-w0rd")
