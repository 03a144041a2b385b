"""shared.fastjson writes what the standard library's json writes: JSON that reads back to the
same values, and the same exceptions; on corpus documents, on what orjson refuses or would
write otherwise, and on random values."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persist.store import _json_value
from shared import fastjson
from tests.corpus import corpus_documents


def _stdlib(value: Any, default: Any = None) -> bytes:
    return json.dumps(value, default=default, separators=(",", ":")).encode("utf-8")


def test_corpus_documents_are_written_as_the_standard_library_writes_them() -> None:
    values = [value for found in corpus_documents().values() for value in found]
    assert len(values) > 40
    non_ascii = 0
    for value in values:
        written = fastjson.dumps(value)
        assert json.loads(written) == value
        if written != _stdlib(value):
            assert not written.isascii()  # the one difference: UTF-8 instead of \u escapes
            non_ascii += 1
    assert non_ascii, "the corpus should hold text outside ASCII"


@dataclass
class _Point:
    x: int
    y: int


@pytest.mark.parametrize("value", [
    "lone \udcff surrogate", {"k": ["\ud800"]}, 2**70, -(2**64), {1: "a", 2: None},
    [datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)],
], ids=["surrogate", "surrogate-in-list", "big-int", "big-negative", "int-keys",
        "aware-datetime"])
def test_what_orjson_refuses_or_would_write_otherwise_is_written_as_json_writes_it(
        value: Any) -> None:
    assert fastjson.dumps(value, default=_json_value) == _stdlib(value, default=_json_value)


def test_nesting_past_orjsons_limit_is_written_as_json_writes_it() -> None:
    value: Any = "leaf"
    for _ in range(400):
        value = [value]
    assert fastjson.dumps(value) == _stdlib(value)


@pytest.mark.parametrize("value, error", [
    ([datetime(2026, 1, 2)], ValueError),  # naive: refused by persist's default
    ({"x": object()}, TypeError),
    ([_Point(1, 2)], TypeError),  # orjson would write a dataclass; json refuses it
], ids=["naive-datetime", "object", "dataclass"])
def test_refusals_raise_the_standard_librarys_exception(value: Any,
                                                        error: type[Exception]) -> None:
    with pytest.raises(error) as ours:
        fastjson.dumps(value, default=_json_value)
    with pytest.raises(error) as theirs:
        _stdlib(value, default=_json_value)
    assert str(ours.value) == str(theirs.value)


def test_a_circular_value_raises_as_json_does() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        fastjson.dumps(loop)


def test_without_a_default_a_timestamp_is_refused_as_json_refuses_it() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        fastjson.dumps({"at": datetime(2026, 1, 2, tzinfo=UTC)})


def test_text_outside_ascii_is_written_as_utf8_and_nan_as_null() -> None:
    assert fastjson.dumps({"s": "é \u2028 ✓"}) == '{"s":"é \u2028 ✓"}'.encode()
    assert fastjson.dumps([math.nan, math.inf]) == b"[null,null]"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_value_reads_back_as_what_json_writes_for_it(value: Any) -> None:
    assert json.loads(fastjson.dumps(value)) == json.loads(_stdlib(value))


# -- reading -------------------------------------------------------------------------------
def test_corpus_documents_are_read_as_the_standard_library_reads_them() -> None:
    values = [value for found in corpus_documents().values() for value in found]
    for value in values:
        written = _stdlib(value)
        assert fastjson.loads(written) == json.loads(written)
        assert fastjson.loads(written.decode("utf-8")) == json.loads(written)


@pytest.mark.parametrize("text", [
    b"NaN", b"[Infinity]", b"1e400", b'"lone \\ud800 surrogate"', b"\xef\xbb\xbf{}",
    b"[" * 2000 + b"]" * 2000,
], ids=["nan", "infinity", "infinite-number", "lone-surrogate", "byte-order-mark",
        "deep-nesting"])
def test_what_orjson_refuses_is_read_as_json_reads_it(text: bytes) -> None:
    try:
        expected: Any = json.loads(text)
    except RecursionError:
        with pytest.raises(RecursionError):
            fastjson.loads(text)
        return
    got = fastjson.loads(text)
    assert repr(got) == repr(expected)  # repr: NaN is not equal to itself


@pytest.mark.parametrize("text", [b"", b"{", b'{"a":1,}', b"\xff\xfe", b"[1] x", "{'a': 1}"])
def test_what_is_not_json_raises_the_standard_librarys_exception(text: bytes | str) -> None:
    with pytest.raises(ValueError) as ours:
        fastjson.loads(text)
    with pytest.raises(ValueError) as theirs:
        json.loads(text)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


def test_an_integer_past_64_bits_is_the_one_difference() -> None:
    """What shared.schemas guards against (tests/test_fastschema.py)."""
    assert fastjson.loads(b"[18446744073709551615]") == [2**64 - 1]
    assert fastjson.loads(b"[18446744073709551616]") == [float(2**64)]
    assert json.loads(b"[18446744073709551616]") == [2**64]


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_value_within_64_bits_is_read_as_json_reads_it(value: Any) -> None:
    written = _stdlib(value)
    expected = json.loads(written)
    if any(type(n) is int and not -(2**63) <= n < 2**64 for n in _numbers(expected)):
        return
    assert repr(fastjson.loads(written)) == repr(expected)


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [value]
