"""``mailroute emails`` and ``mailroute directory`` on a SQLite database made by route and
persist (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from persist.database import create_engine_for, upgrade
from shared.cli import main
from shared.settings import load_settings
from tests.mailgen import crm_mail as mail
from tests.test_records_store import Pipeline


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailroute.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path / 'm.db'}"},
        "attachments": {"path": str(tmp_path / "blobs")},
        "mailboxes": [{"name": "ann", "kind": "maildir", "path": "a"},
                      {"name": "support", "kind": "maildir", "path": "s"}],
        "users": [{"name": "ann", "address": "ann@corp.example", "mailbox": "ann",
                   "track": "contacts"}],
        "queues": [{"name": "support", "address": "support@corp.example",
                    "mailbox": "support"}],
        "contacts": [{"name": "Carol", "addresses": ["carol@customer.example"]}],
        "rules": [{"name": "support case", "when": {"queue": "support"},
                   "then": {"create_case": True, "priority": "high"}}],
    }))
    return path


def invoke(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    return result.exit_code, result.output


def test_emails_list_and_show_explain_each_delivery(config: Path) -> None:
    settings = load_settings(config)
    engine = create_engine_for(settings.database.url)
    upgrade(engine)
    run = Pipeline(engine, settings, blobs=Path(settings.attachments.path))
    parent = run(mail("e1@c", attachments=(("run.exe", b"MZ"), ("reports/q3.pdf", b"%PDF"))),
                 "support")
    raw = mail("e2@c", sender="stranger@else.example", subject="Re: Order 17",
               reply_to="e1@c", to="ann@corp.example")
    reply = run.save(run.route(raw, "ann"))[0]
    engine.dispose()

    code, out = invoke(config, "emails", "list")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "FIRST", "SEEN", "TRACKED"]
    assert f"{reply:>6}" in lines[1] and "u:ann(untracked)" in lines[1]
    assert "in-reply-to" in lines[1] and "q:support" in lines[2]

    code, out = invoke(config, "emails", "show", str(parent))
    assert code == 0, out
    assert "queue support <support@corp.example>  via mailbox support (direct" in out
    assert "tracked  rule: support case" in out
    assert '"decided_by": "receiving-mailbox"' in out
    assert "queue item   support (active) priority high" in out
    assert "case" in out and "'Order 17' (open, created)" in out
    assert "'run.exe' application/octet-stream 2 bytes blocked-extension" in out
    assert "note         attachment-blocked:run.exe" in out
    assert "'q3.pdf' (declared 'reports/q3.pdf') " in out  # sanitised, and what was declared

    code, out = invoke(config, "emails", "show", str(reply))
    assert code == 0, out
    assert f"correlation  in-reply-to -> email {parent} (e1@c)" in out
    assert "untracked: sender-not-a-contact" in out

    code, out = invoke(config, "emails", "show", "999")
    assert code == 1 and "no email with id 999" in out


def test_directory_commands(config: Path, tmp_path: Path) -> None:
    code, out = invoke(config, "directory", "add", "account", "Acme",
                       "--domain", "acme.example")
    assert code == 0, out
    code, out = invoke(config, "directory", "add", "contact", "Dan", "dan@acme.example",
                       "--account", "Acme")
    assert code == 0, out
    csv_file = tmp_path / "people.csv"
    csv_file.write_text("kind,name,address,account,domain\ncontact,Fay,fay@fay.example,,\n")
    code, out = invoke(config, "directory", "import", str(csv_file))
    assert (code, out.strip()) == (0, "imported 0 account(s) and 1 contact(s)")
    code, out = invoke(config, "directory", "list")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert ["user", "ann", "config", "contacts", "ann@corp.example", "(mailbox", "ann)"] in rows
    assert ["account", "Acme", "cli", "*@acme.example"] in rows
    assert ["contact", "Carol", "config", "carol@customer.example"] in rows
    assert ["contact", "Dan", "cli", "dan@acme.example", "(account", "Acme)"] in rows
    assert ["contact", "Fay", "csv", "fay@fay.example"] in rows

    code, out = invoke(config, "directory", "add", "contact", "Bad", '"a@b"@evil.example')
    assert code == 2 and "not one unambiguous email address" in out
    code, out = invoke(config, "directory", "remove", "contact", "carol@customer.example")
    assert code == 2 and "configuration file" in out
    code, out = invoke(config, "directory", "remove", "contact", "fay@fay.example")
    assert (code, out.strip()) == (0, "removed contact Fay")
    bad = tmp_path / "bad.csv"
    bad.write_text("kind,name,address\nperson,X,x@y.example\n")
    code, out = invoke(config, "directory", "import", str(bad))
    assert code == 2 and "line 2: kind must be contact or account" in out
