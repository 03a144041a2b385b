"""Fast loads and dumps for marshmallow schemas, compiled from the schemas' own fields.

Takes a marshmallow ``Schema`` instance; gives :func:`compile_loader` and
:func:`compile_dumper`, plain functions that do what ``schema.load`` and ``schema.dump`` do
for the field types the stage documents use (strings, integers, booleans, ISO datetimes,
nested schemas, lists, dicts), about ten times faster: the codec was a third of each
stage's CPU.  The schemas in ``shared.schemas`` stay the only definition of each document;
any other field type is handled by the field's own methods.

A loader accepts only input it can vouch for -- the JSON types each field expects, no
unknown keys, validators passed -- and gives exactly what ``schema.load`` gives; for
anything else it raises :class:`Uncertain`, and the caller asks marshmallow, which gives
the result or the ``ValidationError`` with its messages.  So the fast path changes speed,
never which documents are accepted or how a rejection reads.  A dumper gives what
``schema.dump`` gives for dicts; anything unexpected on the way makes it hand the whole
object to ``schema.dump``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, missing

Convert = Callable[[Any], Any]


class Uncertain(Exception):
    """The fast path cannot vouch for this input: ask marshmallow."""


def _plain_schema(schema: Schema) -> bool:
    """No hooks, no partial loading, one object at a time: what the loop below does."""
    return (not schema.many and not schema.partial and not any(schema._hooks.values())
            and all(field.attribute is None and "." not in name
                    for name, field in schema.fields.items()))


# -- loading -------------------------------------------------------------------------------
def compile_loader(schema: Schema, unknown: str | None = None) -> Convert:
    """``schema.load`` for dicts it can vouch for; raises :class:`Uncertain` otherwise."""
    unknown = unknown or schema.unknown
    if not _plain_schema(schema) or unknown not in (RAISE, EXCLUDE):
        return _marshmallow_load(schema, unknown)
    specs = []
    for name, field in schema.load_fields.items():
        key = field.data_key if field.data_key is not None else name
        specs.append((key, name, _value_loader(field), field.required, field.allow_none,
                      field.load_default))
    known = frozenset(spec[0] for spec in specs)
    check_unknown = unknown == RAISE

    def load(data: Any) -> dict[str, Any]:
        if type(data) is not dict or (check_unknown and not known.issuperset(data)):
            raise Uncertain()
        out: dict[str, Any] = {}
        for key, name, convert, required, allow_none, default in specs:
            value = data.get(key, missing)
            if value is missing:
                if required:
                    raise Uncertain()
                if default is not missing:
                    out[name] = default() if callable(default) else default
            elif value is None:
                if not allow_none:
                    raise Uncertain()
                out[name] = None
            else:
                out[name] = convert(value)
        return out

    return load


def _marshmallow_load(schema: Schema, unknown: str | None) -> Convert:
    def load(data: Any) -> Any:
        try:
            return schema.load(data, unknown=unknown)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise Uncertain() from exc
    return load


def _element_loader(field: fields.Field) -> Convert:
    """``field.deserialize`` of a value that is present (a list item, a dict key or value)."""
    convert = _value_loader(field)
    allow_none = field.allow_none

    def load(value: Any) -> Any:
        if value is None:
            if not allow_none:
                raise Uncertain()
            return None
        return convert(value)

    return load


def _value_loader(field: fields.Field) -> Convert:
    """What ``field.deserialize`` does with a present value other than None."""
    convert = _converter(field)
    if field.pre_load or field.post_load:
        convert = _field_deserialize(field)
    elif field.validators:
        checked, validators = convert, tuple(field.validators)

        def convert(value: Any) -> Any:
            out = checked(value)
            for validator in validators:
                try:
                    passed = validator(out)
                except ValidationError as exc:
                    raise Uncertain() from exc
                if passed is False:  # a plain function's "no" (stricter than And: fine)
                    raise Uncertain()
            return out

    return convert


def _converter(field: fields.Field) -> Convert:
    if type(field) is fields.String:
        return _exact_type(str)
    if type(field) is fields.Integer:
        return _exact_type(int)
    if type(field) is fields.Boolean and True in field.truthy and False in field.falsy:
        return _exact_type(bool)
    if type(field) is fields.AwareDateTime and field.format in ("iso", "iso8601") \
            and field.default_timezone is None:
        return _aware_datetime
    if type(field) is fields.Nested and not field.many and field.only is None \
            and not field.exclude and isinstance(field.schema, Schema):
        nested = compile_loader(field.schema, field.unknown)
        return nested
    if type(field) is fields.List:
        item = _element_loader(field.inner)

        def load_list(value: Any) -> list[Any]:
            if type(value) is not list:
                raise Uncertain()
            return [item(each) for each in value]

        return load_list
    if type(field) is fields.Dict:
        return _dict_loader(field)
    return _field_deserialize(field)


def _exact_type(wanted: type) -> Convert:
    def load(value: Any) -> Any:
        if type(value) is not wanted:
            raise Uncertain()
        return value
    return load


def _aware_datetime(value: Any) -> datetime:
    if type(value) is not str:
        raise Uncertain()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Uncertain() from exc
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise Uncertain()
    return parsed


def _without_floats(value: Any) -> Any:
    """``value``, a JSON value of no declared type, when it holds no float.

    No document has floats, and a JSON reader may have made one of an integer too big for
    it (see ``shared.fastjson``): the caller then reads the bytes again.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            raise Uncertain()
        if type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return value


def _dict_loader(field: fields.Dict) -> Convert:
    if field.key_field is None and field.value_field is None:
        def load_any(value: Any) -> dict[Any, Any]:
            if type(value) is not dict:
                raise Uncertain()
            return dict(_without_floats(value))
        return load_any
    key = _element_loader(field.key_field) if field.key_field is not None else None
    item = _element_loader(field.value_field) if field.value_field is not None else None

    def load(value: Any) -> dict[Any, Any]:
        if type(value) is not dict:
            raise Uncertain()
        if key is None:
            return {k: item(v) for k, v in value.items()}  # type: ignore[misc]
        if item is None:
            return {key(k): _without_floats(v) for k, v in value.items()}
        return {key(k): item(v) for k, v in value.items()}

    return load


def _field_deserialize(field: fields.Field) -> Convert:
    def load(value: Any) -> Any:
        try:
            return field.deserialize(value)
        except ValidationError as exc:
            raise Uncertain() from exc
    return load


# -- dumping -------------------------------------------------------------------------------
def compile_dumper(schema: Schema) -> Convert:
    """``schema.dump`` of a dict; anything unexpected is handed to ``schema.dump`` whole."""
    if not _plain_schema(schema) or any(
            field.dump_default is not missing or hasattr({}, name)
            for name, field in schema.dump_fields.items()):
        return schema.dump
    specs = [(name, field.data_key if field.data_key is not None else name,
              _serializer(field)) for name, field in schema.dump_fields.items()]

    def dump(obj: Any) -> Any:
        if type(obj) is not dict:
            return schema.dump(obj)
        try:
            out = {}
            for name, key, serialize in specs:
                value = obj.get(name, missing)
                if value is not missing:
                    out[key] = serialize(value)
            return out
        except Exception:  # whatever went wrong, marshmallow's own answer (or error) counts
            return schema.dump(obj)

    return dump


def _serializer(field: fields.Field) -> Convert:
    """What ``field._serialize`` gives for a value (None included)."""
    fallback = field._serialize
    if type(field) is fields.String:
        return lambda value: value if type(value) is str else fallback(value, None, None)
    if type(field) is fields.Integer and not field.as_string:
        return lambda value: value if type(value) is int else fallback(value, None, None)
    if type(field) is fields.Boolean and type(field)._serialize is fields.Field._serialize:
        return lambda value: value
    if isinstance(field, fields.DateTime) and field.format in ("iso", "iso8601") \
            and type(field) in (fields.AwareDateTime, fields.DateTime):
        return lambda value: value.isoformat() if type(value) is datetime \
            else fallback(value, None, None)
    if type(field) is fields.Nested and not field.many and field.only is None \
            and not field.exclude and isinstance(field.schema, Schema):
        nested = compile_dumper(field.schema)
        return lambda value: None if value is None else nested(value)
    if type(field) is fields.List:
        item = _serializer(field.inner)
        return lambda value: None if value is None else [item(each) for each in value]
    if type(field) is fields.Dict and field.key_field is None and field.value_field is None:
        return lambda value: None if value is None else dict(value)
    if type(field) is fields.Dict and field.key_field is not None and field.value_field is not None:
        key, item = _serializer(field.key_field), _serializer(field.value_field)
        return lambda value: None if value is None else {
            key(k): item(v) for k, v in value.items()}
    return lambda value: fallback(value, None, None)
