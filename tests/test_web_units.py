"""The operations page's parts without a server: the ``web`` settings, the session key and
CSRF checks, the metrics window's rates and latency quantiles, dead-letter headers."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml

from shared.dead_letters import describe
from shared.metrics import Metrics
from shared.secrets import Keyring, Secret
from shared.settings import ConfigError, Settings, load_settings
from shared.web import auth
from shared.web.app import metric_sources
from shared.web.data import original_headers
from shared.web.metrics_window import MetricsWindow, quantile, registry_source

TOKEN = "admin-token-for-the-unit-tests"


def settings_from(tmp_path: Path, web: Mapping[str, object], **environ: str) -> Settings:
    path = tmp_path / "mailroute.yaml"
    path.write_text(yaml.safe_dump({"web": web}))
    return load_settings(path, environ=environ)


def test_web_settings_defaults_and_overrides(tmp_path: Path) -> None:
    web = load_settings(None, environ={}).web
    assert (web.enabled, web.host, web.port, web.admin_token, web.metrics_urls) == (
        True, "127.0.0.1", 8025, None, ())
    loaded = settings_from(tmp_path, {"admin_token": TOKEN, "metrics_urls":
                                      ["http://127.0.0.1:9401/metrics"]},
                           MAILROUTE_WEB__PORT="0")
    assert loaded.web.port == 0
    assert isinstance(loaded.web.admin_token, Secret)
    assert TOKEN not in repr(loaded)


def test_web_settings_are_validated_naming_the_key(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"admin_token": "short"}, "web.admin_token"),
        ({"port": 70000}, "web.port"),
        ({"host": ""}, "web.host"),
        ({"metrics_urls": ["localhost:9400"]}, "web.metrics_urls"),
        ({"colour": "blue"}, "web: unknown key(s) colour")]
    for web, named in cases:
        with pytest.raises(ConfigError, match=re.escape(named)):
            settings_from(tmp_path, web)


def test_an_encrypted_admin_token_is_decrypted_like_the_other_secrets(tmp_path: Path) -> None:
    key = Keyring.new_key()
    loaded = settings_from(tmp_path, {"admin_token": Keyring([key]).encrypt(TOKEN)},
                           MAILROUTE_SECRETS__KEYS=key)
    assert loaded.web.admin_token is not None and loaded.web.admin_token.reveal() == TOKEN
    with pytest.raises(ConfigError, match=r"web\.admin_token: cannot decrypt"):
        settings_from(tmp_path, {"admin_token": Keyring([key]).encrypt(TOKEN)},
                      MAILROUTE_SECRETS__KEYS=Keyring.new_key())


def test_metric_sources_default_to_the_workers_ports(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"base_port": 9400}}))
    assert len(metric_sources(load_settings(path, environ={}))) == 4
    path.write_text(yaml.safe_dump({"metrics": {"base_port": 0}}))
    assert metric_sources(load_settings(path, environ={})) == []


def test_the_session_key_comes_from_the_token_and_csrf_tokens_compare_exactly() -> None:
    assert auth.session_key(Secret(TOKEN)) == auth.session_key(Secret(TOKEN))
    assert auth.session_key(Secret(TOKEN)) != auth.session_key(Secret(TOKEN + "x"))
    assert auth.session_key(None) != auth.session_key(None)  # random per process
    assert auth.token_matches(Secret(TOKEN), TOKEN)
    assert not auth.token_matches(Secret(TOKEN), TOKEN[:-1])
    assert not auth.token_matches(None, "")
    session: dict[str, object] = {}
    token = auth.csrf_token(session)
    assert auth.csrf_token(session) == token  # one per session
    assert auth.csrf_valid(session, token)
    assert not auth.csrf_valid(session, token + "x") and not auth.csrf_valid(session, None)
    assert not auth.csrf_valid({}, token)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_are_the_increase_over_the_last_readings_scaled_to_a_minute() -> None:
    metrics, clock = Metrics(), Clock()
    window = MetricsWindow([registry_source(metrics.registry)], clock=clock)
    first = window.read()
    assert first.stages["parse"].per_minute is None and first.sources_up == 1
    metrics.messages_in.labels(stage="parse").inc(30)
    metrics.mailbox_fetched.labels(mailbox="a").inc(10)
    clock.now += 10
    second = window.read()
    assert second.stages["parse"].per_minute == pytest.approx(180.0)
    assert second.stages["ingest"].per_minute == pytest.approx(60.0)
    assert second.stages["parse"].total == 30
    clock.now += 120  # the reading from 130 s ago is too old for a rate; the one at 10 s is
    metrics.messages_in.labels(stage="parse").inc(12)
    assert window.read().stages["parse"].per_minute is None
    clock.now += 30
    assert window.read().stages["parse"].per_minute == pytest.approx(0.0)


def test_a_restarted_worker_counts_from_zero_and_a_silent_one_is_left_out() -> None:
    texts = {"a": "mailroute_stage_messages_in_total{stage=\"route\"} 100\n",
             "b": "mailroute_stage_messages_in_total{stage=\"route\"} 50\n"}
    up = {"a": True, "b": True}

    def source(name: str) -> Callable[[], str]:
        def read() -> str:
            if not up[name]:
                raise ConnectionRefusedError("down")
            return "# TYPE mailroute_stage_messages_in counter\n" + texts[name]
        return read

    clock = Clock()
    window = MetricsWindow([source("a"), source("b")], clock=clock)
    window.read()
    texts["a"] = "mailroute_stage_messages_in_total{stage=\"route\"} 6\n"  # restarted
    up["b"] = False
    clock.now += 60
    reading = window.read()
    assert reading.sources_up == 1 and reading.sources == 2
    assert reading.stages["route"].per_minute == pytest.approx(6.0)
    assert reading.stages["route"].total == 6


def test_latency_quantiles_follow_histogram_quantile_and_the_window_is_the_last_hour() -> None:
    buckets = {0.1: 0.0, 0.5: 50.0, 1.0: 99.0, 5.0: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.5)
    assert quantile(0.99, buckets) == pytest.approx(1.0)
    assert quantile(0.25, buckets) == pytest.approx(0.3)
    assert quantile(0.5, {math.inf: 0.0}) is None
    assert quantile(0.99, {1.0: 0.0, math.inf: 3.0}) == 1.0  # beyond the last bound

    metrics, clock = Metrics(), Clock()
    window = MetricsWindow([registry_source(metrics.registry)], clock=clock)
    for _ in range(10):
        metrics.end_to_end_seconds.observe(100)  # slow mail, over an hour ago
    early = window.read()
    assert early.latency_window.startswith("since the workers started")
    assert early.latency_p50_ms is not None and early.latency_p50_ms > 60_000
    clock.now += 3700
    for _ in range(10):
        metrics.end_to_end_seconds.observe(0.2)
    recent = window.read()
    assert recent.latency_window == "last hour" and recent.latency_count == 10
    assert recent.latency_p99_ms is not None and recent.latency_p99_ms <= 250


def test_dead_letter_headers_come_from_the_raw_mail_or_the_parsed_email() -> None:
    raw = (b"From: =?utf-8?q?M=C3=BCller?= <m@example.org>\r\nTo: ann@corp.example\r\n"
           b"Subject: <b>hi</b>\r\nMessage-ID: <x1@example.org>\r\n\r\nbody")
    letter = describe("parse", {"x-mailroute-reason": "bad-document"},
                      json.dumps({"raw": base64.b64encode(raw).decode()}).encode())
    assert original_headers(letter) == {"From": "Müller <m@example.org>",
                                        "To": "ann@corp.example", "Subject": "<b>hi</b>",
                                        "Message-ID": "<x1@example.org>"}
    parsed = {"email": {"from": [{"address": "a@x.example"}], "to": [{"address": "b@y"}],
                        "subject": "S", "message_id": "m@x"}}
    letter = describe("route", {}, json.dumps(parsed).encode())
    assert original_headers(letter) == {"From": "a@x.example", "To": "b@y", "Subject": "S",
                                        "Message-ID": "<m@x>"}
    assert original_headers(describe("route", {}, b"not json")) == {}
