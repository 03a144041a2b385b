"""The tests' own Dovecot: it starts, serves IMAP/IMAPS/STARTTLS/POP3, and cleans up."""

from __future__ import annotations

import poplib
import ssl

import pytest
from imapclient import IMAPClient

from tests.dovecot import DovecotServer, dovecot_fixture

dovecot = dovecot_fixture(scope="module")

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hello\r\n\r\nbody line\r\n"


def test_login_append_and_fetch_back(dovecot: DovecotServer) -> None:
    dovecot.add_user("alice", "alice-pw")
    uid = dovecot.deliver("alice", MESSAGE)
    with dovecot.client("alice", "INBOX") as imap:
        fetched = imap.fetch([uid], [b"BODY.PEEK[]"])
    assert fetched[uid][b"BODY[]"] == MESSAGE
    assert dovecot.uids("alice") == [uid]


def test_users_added_after_start_can_log_in_at_once(dovecot: DovecotServer) -> None:
    dovecot.add_user("first", "pw1")
    assert dovecot.uids("first") == []  # Dovecot has read the user files by now
    dovecot.add_user("second", "pw2")
    assert dovecot.uids("second") == []


def test_wrong_password_is_refused(dovecot: DovecotServer) -> None:
    dovecot.add_user("carol", "right")
    imap = IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=10)
    with pytest.raises(Exception, match="AUTHENTICATIONFAILED"):
        imap.login("carol", "wrong")
    imap.shutdown()


def test_deliver_to_other_folder_and_flags(dovecot: DovecotServer) -> None:
    dovecot.add_user("dave", "pw")
    uid = dovecot.deliver("dave", MESSAGE, folder="Archive/2024", flags=[b"\\Flagged"])
    assert dovecot.uids("dave", "Archive/2024") == [uid]
    assert dovecot.flags("dave", "Archive/2024") == {uid: (b"\\Flagged",)}
    assert dovecot.uids("dave") == []


def test_imaps_and_starttls_verify_against_the_test_certificate(dovecot: DovecotServer) -> None:
    dovecot.add_user("erin", "pw")
    context = ssl.create_default_context(cafile=str(dovecot.cert_path))
    with IMAPClient("localhost", port=dovecot.imaps_port, ssl=True, ssl_context=context,
                    timeout=10) as imap:
        imap.login("erin", "pw")
    with IMAPClient("127.0.0.1", port=dovecot.imap_port, ssl=False, timeout=10) as imap:
        imap.starttls(context)
        imap.login("erin", "pw")
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient("127.0.0.1", port=dovecot.imaps_port, ssl=True,
                   ssl_context=ssl.create_default_context(), timeout=10)


def test_pop3_serves_the_same_mailbox(dovecot: DovecotServer) -> None:
    dovecot.add_user("frank", "pw")
    dovecot.deliver("frank", MESSAGE)
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        pop.user("frank")
        pop.pass_("pw")
        count, _size = pop.stat()
        assert count == 1
        _resp, lines, _octets = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    finally:
        pop.quit()


def test_doveadm_changes_uidvalidity(dovecot: DovecotServer) -> None:
    dovecot.add_user("gina", "pw")
    dovecot.deliver("gina", MESSAGE)
    before = dovecot.uidvalidity("gina")
    dovecot.set_uidvalidity("gina", before + 1000)
    assert dovecot.uidvalidity("gina") == before + 1000
    assert "INBOX" in dovecot.doveadm("mailbox", "list", "-u", "gina")


def test_restart_keeps_users_and_mail_and_stop_removes_everything() -> None:
    server = DovecotServer()
    try:
        server.start()
        server.add_user("hank", "pw")
        uid = server.deliver("hank", MESSAGE)
        server.restart()
        assert server.running
        assert server.uids("hank") == [uid]
    finally:
        server.stop()
    assert not server.running
    assert not server.root.exists()


def test_plain_only_server_without_tls() -> None:
    with DovecotServer(tls=False) as server:
        server.add_user("ivy", "pw")
        assert server.uids("ivy") == []
        assert server.imaps_port == 0
