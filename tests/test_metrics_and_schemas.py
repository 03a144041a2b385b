"""The metrics endpoint a worker serves, and the edge documents' encode/decode contract."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import fastjson
from shared.errors import PermanentError
from shared.metrics import Metrics, MetricsServer
from shared.schemas import Codec
from tests import documents


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer, list[bool]]]:
    metrics = Metrics()
    readiness = [False]
    server = MetricsServer(metrics, "127.0.0.1", 0, lambda: readiness).start()
    yield metrics, server, readiness
    server.stop()


def get(server: MetricsServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_endpoint_serves_the_stage_counters(
        served: tuple[Metrics, MetricsServer, list[bool]]) -> None:
    metrics, server, _ = served
    metrics.messages_in.labels(stage="parse").inc(3)
    metrics.messages_dead.labels(stage="route", reason="untrusted-forwarder").inc()
    metrics.processing_seconds.labels(stage="parse").observe(0.02)
    status, body = get(server, "/metrics")
    assert status == 200
    assert 'mailroute_stage_messages_in_total{stage="parse"} 3.0' in body
    assert ('mailroute_stage_messages_dead_lettered_total{reason="untrusted-forwarder",'
            'stage="route"} 1.0') in body
    assert 'mailroute_stage_processing_seconds_count{stage="parse"} 1.0' in body


def test_metrics_endpoint_serves_only_the_samples_named(
        served: tuple[Metrics, MetricsServer, list[bool]]) -> None:
    metrics, server, _ = served
    metrics.messages_in.labels(stage="parse").inc(3)
    metrics.end_to_end_seconds.observe(0.02)
    status, body = get(server, "/metrics?name[]=mailroute_end_to_end_latency_seconds_count"
                               "&name%5B%5D=mailroute_stage_messages_in_total")
    assert status == 200
    samples = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert sorted(samples) == ["mailroute_end_to_end_latency_seconds_count 1.0",
                               'mailroute_stage_messages_in_total{stage="parse"} 3.0']
    whole = get(server, "/metrics")[1]
    assert "mailroute_end_to_end_latency_seconds_bucket" in whole
    assert len(whole) > 10 * len(body)
    assert get(server, "/metrics?name[]=no_such_metric") == (200, "")


def test_health_is_liveness_and_readiness_follows_the_stages(
        served: tuple[Metrics, MetricsServer, list[bool]]) -> None:
    _, server, readiness = served
    assert get(server, "/healthz") == (200, "ok\n")
    assert get(server, "/readyz") == (503, "not ready\n")
    readiness[0] = True
    assert get(server, "/readyz") == (200, "ready\n")
    assert get(server, "/other")[0] == 404


def test_documents_round_trip_with_bytes_and_datetimes() -> None:
    codec = Codec()
    raw = documents.raw(b"\x00\xffbinary")
    decoded = codec.decode("raw", codec.encode("raw", raw))
    assert decoded["raw"] == b"\x00\xffbinary"
    assert decoded["source"]["received_at"] == raw["source"]["received_at"]
    assert decoded["schema_version"] == 1


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.pop("trace_id"), "trace_id"),
    (lambda d: d.update(raw="not base64!"), "raw"),
    (lambda d: d["source"].update(mailbox_kind="sideways"), "mailbox_kind"),
    (lambda d: d.update(extra="field"), "extra"),
])
def test_a_document_that_does_not_match_its_schema_is_a_permanent_error(
        mutate: object, fragment: str) -> None:
    codec = Codec()
    document = json.loads(codec.encode("raw", documents.raw()))
    mutate(document)  # type: ignore[operator]
    with pytest.raises(PermanentError) as error:
        codec.decode("raw", json.dumps(document).encode())
    assert error.value.reason == "bad-document"
    assert fragment in error.value.detail


@pytest.mark.parametrize("text", [
    "QUJD\nREVG",  # a line break (MIME's base64, not the documents')
    "QUJD REVG",  # a blank
    "QUJDREVG=",  # padding to spare after a whole group
    "QUJDRA=",  # padding short of a whole group
    "QUJDRA",  # no padding
    "QUJD\u00e9",  # not ASCII
])
def test_raw_text_that_is_not_canonical_base64_is_refused(text: str) -> None:
    codec = Codec()
    document = json.loads(codec.encode("raw", documents.raw()))
    document["raw"] = text
    with pytest.raises(PermanentError, match="not valid base64") as error:
        codec.decode("raw", json.dumps(document).encode())
    assert error.value.reason == "bad-document"
    document["raw"] = "QUJDREVG"
    assert codec.decode("raw", json.dumps(document).encode())["raw"] == b"ABCDEF"


def test_routed_document_needs_a_delivery() -> None:
    codec = Codec()
    routed = {**documents.parsed(), "deliveries": []}
    with pytest.raises(PermanentError, match="deliveries"):
        codec.decode("routed", codec.encode("routed", routed))


BIG = 70_000  # over the size from which byte strings bypass marshmallow and json (64 KB)


def _attachment(content: bytes, name: str = "a.bin") -> dict[str, object]:
    return {"filename": name, "content_type": "application/octet-stream",
            "size": len(content), "sha256": "0" * 64, "content": content}


def _plain_encode(codec: Codec, edge: str, document: dict[str, object]) -> bytes:
    """What Codec.encode gave before big byte strings were spliced in."""
    dumped = codec._schemas[edge].dump({"schema_version": 1, **document})
    return fastjson.dumps(dumped)


@pytest.mark.parametrize("size", [0, 10, 1023, 1024, 20_000, BIG - 1, BIG, 3 * 256 * 1024 + 1,
                                  2_000_003])
def test_big_raw_messages_encode_to_the_same_bytes_and_round_trip(size: int) -> None:
    codec = Codec()
    document = documents.raw(bytes(range(256)) * (size // 256) + b"\xff" * (size % 256))
    encoded = codec.encode("raw", document)
    assert encoded == _plain_encode(codec, "raw", document)
    assert codec.decode("raw", encoded)["raw"] == document["raw"]


def test_big_attachments_encode_to_the_same_bytes_without_touching_the_document() -> None:
    codec = Codec()
    document = documents.parsed()
    document["email"]["attachments"] = [
        _attachment(b"\x01" * BIG, "one"), _attachment(b"small", "two"),
        _attachment(b"\x02" * 1_000_001, "three"), _attachment(b"", "four")]
    document["email"]["subject"] = 'quote " and \u00e9'
    before = repr(document)
    encoded = codec.encode("parsed", document)
    assert encoded == _plain_encode(codec, "parsed", document)
    assert repr(document) == before
    decoded = codec.decode("parsed", encoded)
    assert [a["content"] for a in decoded["email"]["attachments"]] == [
        a["content"] for a in document["email"]["attachments"]]
    assert decoded["email"]["subject"] == 'quote " and \u00e9'


ALICE_DELIVERY = {"principal_kind": "user", "principal": "alice", "address": "alice@example.com",
                  "mailbox": "alice", "method": "direct"}


def test_big_base64_text_outside_the_byte_fields_is_read_as_text() -> None:
    codec = Codec()
    looks_like_base64 = "QUJD" * (BIG // 4 + 1)
    document = {**documents.parsed(), "deliveries": [ALICE_DELIVERY],
        "records": {"content": looks_like_base64},
        "correlation": {"note": f'"raw":"{looks_like_base64}"'}}
    document["email"]["text"] = f'"content":"{looks_like_base64}'
    document["email"]["attachments"] = [_attachment(b"\x03" * BIG)]
    encoded = codec.encode("routed", document)
    assert b'\\"raw\\":\\"QUJD' in encoded  # escaped inside a string: must stay text
    decoded = codec.decode("routed", encoded)
    assert decoded["records"] == {"content": looks_like_base64}
    assert decoded["correlation"] == {"note": f'"raw":"{looks_like_base64}"'}
    assert decoded["email"]["text"] == f'"content":"{looks_like_base64}'
    assert decoded["email"]["attachments"][0]["content"] == b"\x03" * BIG


def test_big_text_of_any_kind_outside_the_byte_fields_is_read_as_json_reads_it() -> None:
    codec = Codec()
    text = "\u00e9t\u00e9 \U0001f600 caf\u00e9 " * (BIG // 10)  # no escapes: cut out, read back
    escaped = 'tab\there, quote " there ' * (BIG // 20)  # escapes: left to the JSON reader
    document = {**documents.parsed(), "deliveries": [ALICE_DELIVERY],
        "records": {"content": text, "other": {"content": escaped},
                    "late": {"content": text + 'an escaped " after the first 64 KB'}}}
    document["email"]["attachments"] = [_attachment(b"\x05" * BIG)]
    encoded = codec.encode("routed", document)
    assert text.encode("utf-8") in encoded  # orjson writes it unescaped
    decoded = codec.decode("routed", encoded)
    assert decoded["records"] == document["records"]
    assert decoded["email"]["attachments"][0]["content"] == b"\x05" * BIG


def test_a_big_member_written_with_escaped_slashes_is_read() -> None:
    """JSON may escape "/" (PHP's json_encode does): such a member stays with the reader."""
    codec = Codec()
    content = bytes(range(256)) * (BIG // 256 + 1)
    encoded = codec.encode("raw", documents.raw(content))
    assert b"/" in encoded
    assert codec.decode("raw", encoded.replace(b"/", b"\\/"))["raw"] == content


@pytest.mark.parametrize("damage", [
    lambda text: text.rstrip("=")[:-1],  # a length base64 cannot have
    lambda text: "=" + text[1:],  # padding first
    lambda text: text[:1000] + " " + text[1000:],  # a blank inside
    lambda text: text[:1000] + "\u00e9" + text[1000:],  # not ASCII
    lambda text: text[:1000] + "\n" + text[1000:],  # a line break (written escaped)
])
def test_a_big_invalid_base64_member_is_a_permanent_error(damage: object) -> None:
    codec = Codec()
    document = json.loads(codec.encode("raw", documents.raw(b"\x04" * BIG)))
    document["raw"] = damage(document["raw"])  # type: ignore[operator]
    with pytest.raises(PermanentError) as error:
        codec.decode("raw", json.dumps(document).encode())
    assert error.value.reason == "bad-document"
    assert "raw" in error.value.detail


# written as they are (a big string of these alone is cut out of the JSON and read back) ...
_PLAIN_PIECES = ["QUJD", "\u00e9", "\U0001f600", "=", "/", "x" * 100, " "]
# ... and written escaped, or looking like a member inside a string
_ESCAPED_PIECES = ['"raw":"', '"content": "', "\\", '"', "\n"]


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.lists(st.sampled_from(_PLAIN_PIECES), min_size=1, max_size=8),
                 st.lists(st.sampled_from(_PLAIN_PIECES + _ESCAPED_PIECES), min_size=1,
                          max_size=8)),
       st.integers(1, 2000),
       st.sampled_from(["content", "raw", "note"]), st.integers(0, 3),
       st.sampled_from([0, 100, BIG - 1, BIG, BIG + 1]))
def test_documents_with_big_strings_of_any_kind_round_trip(
        pieces: list[str], repeat: int, key: str, nesting: int, size: int) -> None:
    """Whatever big text sits beside big byte fields (quotes, escapes, member-like text),
    decoding gives back what was encoded."""
    codec = Codec()
    text = "".join(pieces) * repeat
    value: object = text
    for _ in range(nesting):
        value = {key: value}
    document = {**documents.parsed(), "deliveries": [ALICE_DELIVERY], "records": {key: value}}
    document["email"]["text"] = text
    document["email"]["attachments"] = [_attachment(bytes(range(256)) * (size // 256) + b"\x07"
                                                    * (size % 256))]
    decoded = codec.decode("routed", codec.encode("routed", document))
    assert decoded["records"] == {key: value}
    assert decoded["email"]["text"] == text
    assert decoded["email"]["attachments"][0]["content"] == \
        document["email"]["attachments"][0]["content"]
