"""``mailroute parse FILE...``: one JSON object per file, exit 0 when every file was handled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests import mailgen

REPO = Path(__file__).resolve().parents[1]


def run_parse(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--config", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "shared.cli", *prefix, "parse", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def reports(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_parse_reports_each_envelope_kind_and_every_message(tmp_path: Path) -> None:
    original = mailgen.message("customer@example.net", ["bob@corp.example.com"], "help",
                               "please", message_id="<orig@example.net>")
    wrapped = tmp_path / "wrapped.eml"
    wrapped.write_bytes(mailgen.forward_envelope("bob@corp.example.com", "f@corp.example.com",
                                                 original))
    redirected = tmp_path / "redirected.eml"
    redirected.write_bytes(b"Resent-From: bob@corp.example.com\r\n" + original)
    direct = tmp_path / "direct.eml"
    direct.write_bytes(original)
    result = run_parse(str(wrapped), str(redirected), str(direct))
    assert result.returncode == 0, result.stderr
    by_file = {Path(r["file"]).name: r for r in reports(result.stdout)}
    assert [by_file[n]["envelope"]["kind"] for n in ("wrapped.eml", "redirected.eml",
                                                     "direct.eml")] == [
        "wrapped", "redirected", "direct"]
    [inner] = by_file["wrapped.eml"]["messages"]
    assert inner["forwarded_by"] == "bob@corp.example.com"
    assert inner["headers"]["message_id"] == "orig@example.net"
    assert inner["parts"]["text"]["preview"].strip() == "please"
    assert by_file["redirected.eml"]["envelope"]["forwarder_header"] == "resent-from"
    assert by_file["direct.eml"]["parsed_as"] == "direct"


def test_a_message_judged_bad_is_reported_and_still_exit_0(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("limits: {max_message_bytes: 2000}\n")
    big = tmp_path / "big.eml"
    big.write_bytes(b"Subject: x\r\n\r\n" + b"x" * 5000)
    note = tmp_path / "note.eml"
    note.write_bytes(b"From: bob@corp.example.com\r\nSubject: no original\r\n\r\nhi\r\n")
    result = run_parse("--as", "forward", str(big), str(note), config=config)
    assert result.returncode == 0, result.stderr
    big_report, note_report = reports(result.stdout)
    assert (big_report["ok"], big_report["error"]["reason"]) == (False, "message-too-large")
    assert note_report["error"]["reason"] == "invalid-forward-mail-item"


def test_an_unreadable_file_is_the_tool_failing(tmp_path: Path) -> None:
    result = run_parse(str(tmp_path / "missing.eml"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr
