"""The compiled loads and dumps (shared.fastschema) give exactly what marshmallow gives.

Real documents (corpus mail parsed and routed) load and dump identically both ways; and for
documents damaged at random (Hypothesis), the fast loader either gives marshmallow's result
or says it is not sure -- never accepts what marshmallow rejects, never differs.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError, fields

from shared.fastschema import Uncertain, compile_dumper, compile_loader
from shared.schemas import Codec, Edge, ParsedSchema, RawSchema, RoutedSchema
from tests import documents
from tests.corpus import corpus_documents

SCHEMAS = {"raw": RawSchema(), "parsed": ParsedSchema(), "routed": RoutedSchema()}


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[dict[str, Any]]]:
    found = corpus_documents()
    found["raw"].append(json.loads(Codec().encode("raw", documents.raw())))
    found["parsed"].append(json.loads(Codec().encode("parsed", documents.parsed())))
    return found


def _marshmallow(edge: str, data: Any) -> Any:
    return SCHEMAS[edge].load(copy.deepcopy(data))


@pytest.mark.parametrize("edge", ["raw", "parsed", "routed"])
def test_real_documents_load_and_dump_as_marshmallow_does(
        corpus: dict[str, list[dict[str, Any]]], edge: Edge) -> None:
    load, dump = compile_loader(SCHEMAS[edge]), compile_dumper(SCHEMAS[edge])
    if edge != "routed":
        assert len(corpus[edge]) > 1
    for data in corpus[edge]:
        loaded = load(copy.deepcopy(data))
        assert loaded == _marshmallow(edge, data)
        assert dump(loaded) == SCHEMAS[edge].dump(loaded)
        assert json.dumps(dump(loaded)) == json.dumps(SCHEMAS[edge].dump(loaded))


def test_the_codec_gives_the_same_bytes_and_documents_as_marshmallow_alone() -> None:
    codec = Codec()
    parsed = documents.parsed()
    parsed["email"]["date"] = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    parsed["email"]["headers"] = {"auto-submitted": ["no"]}
    encoded = codec.encode("parsed", parsed)
    plain = json.dumps(SCHEMAS["parsed"].dump({"schema_version": 1, **parsed}),
                       separators=(",", ":")).encode()
    assert encoded == plain
    assert codec.decode("parsed", encoded) == SCHEMAS["parsed"].load(json.loads(plain))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False)
    | st.sampled_from(["", "1", "true", "direct", "user", "forward", "AAAA", "a@b",
                       "2026-01-02T03:04:05", "2026-01-02T03:04:05+00:00", "not a date"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["name", "address", "x", "kind"]), inner, max_size=3),
    max_leaves=6)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


def _damage(data: Any, path: tuple[Any, ...], how: str, value: Any) -> Any:
    data = copy.deepcopy(data)
    if not path:
        return value
    holder = data
    for step in path[:-1]:
        holder = holder[step]
    if how == "delete" and isinstance(holder, dict):
        del holder[path[-1]]
    elif how == "extra" and isinstance(holder, dict):
        holder["unexpected"] = value
    else:
        holder[path[-1]] = value
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(edge=st.sampled_from(["raw", "parsed", "routed"]), data=st.data(),
       how=st.sampled_from(["replace", "delete", "extra"]), value=JSON_VALUES)
def test_damaged_documents_get_marshmallows_answer_or_none(
        edge: Edge, data: st.DataObject, how: str, value: Any) -> None:
    codec = Codec()
    base = {"raw": documents.raw(), "parsed": documents.parsed(),
            "routed": {**documents.parsed(), "deliveries": [{
                "principal_kind": "user", "principal": "alice", "address": "a@example.com",
                "mailbox": "alice", "method": "direct"}]}}[edge]
    if edge != "raw":
        base["email"]["attachments"] = [{"filename": "a.txt", "content_type": "text/plain",
                                         "size": 1, "sha256": "0", "content": b"x"}]
    valid = json.loads(codec.encode(edge, base))
    path = data.draw(st.sampled_from(_paths(valid)))
    damaged = _damage(valid, path, how, value)
    try:
        expected: Any = _marshmallow(edge, damaged)
    except ValidationError:
        expected = ValidationError
    try:
        got: Any = compile_loader(SCHEMAS[edge])(copy.deepcopy(damaged))
    except Uncertain:
        return
    assert expected is not ValidationError, f"accepted what marshmallow rejects: {damaged}"
    assert got == expected


def test_fields_of_other_types_use_their_own_methods() -> None:
    from marshmallow import Schema

    class Odd(Schema):
        when = fields.Date(required=True)
        ratio = fields.Float(load_default=0.5)
        flag = fields.Boolean(load_default=False)

    load, dump = compile_loader(Odd()), compile_dumper(Odd())
    assert load({"when": "2026-01-02", "ratio": 1}) == Odd().load(
        {"when": "2026-01-02", "ratio": 1})
    with pytest.raises(Uncertain):
        load({"when": "soon"})
    with pytest.raises(Uncertain):
        load({"when": "2026-01-02", "flag": "yes"})  # marshmallow accepts: it decides
    loaded = Odd().load({"when": "2026-01-02", "flag": "yes"})
    assert dump(loaded) == Odd().dump(loaded)


def _routed() -> dict[str, Any]:
    return {**documents.parsed(), "deliveries": [{
        "principal_kind": "user", "principal": "alice", "address": "a@example.com",
        "mailbox": "alice", "method": "direct"}]}


@pytest.mark.parametrize("where", ["records", "evidence", "typed"])
def test_an_integer_past_64_bits_is_decoded_exactly(where: str) -> None:
    """The codec reads with orjson, which makes a float of such an integer; a float is in no
    document, so the fast loader refuses it and the codec reads the bytes again with json."""
    codec = Codec()
    big = 2**64 + 1
    routed = _routed()
    if where == "typed":
        routed["source"]["uidvalidity"] = big
    elif where == "records":
        routed["records"] = {"case_id": big, "nested": [{"n": big}]}
    else:
        routed["deliveries"][0]["evidence"] = {"count": big}
    decoded = codec.decode("routed", codec.encode("routed", routed))
    got = {"typed": lambda: decoded["source"]["uidvalidity"],
           "records": lambda: decoded["records"]["nested"][0]["n"],
           "evidence": lambda: decoded["deliveries"][0]["evidence"]["count"]}[where]()
    assert type(got) is int and got == big


def test_a_float_in_an_untyped_value_is_left_to_marshmallow() -> None:
    schema = RoutedSchema()
    data = json.loads(Codec().encode("routed", _routed()))
    data["records"] = {"ratio": 0.5}
    with pytest.raises(Uncertain):
        compile_loader(schema)(copy.deepcopy(data))
    assert schema.load(data)["records"] == {"ratio": 0.5}
