"""parse.headers' fast path for plain address headers gives exactly what the standard
library's ``getaddresses`` gives, on the corpus and on generated values, and declines
anything that is not plain (which ``getaddresses`` then parses as before); comments in and
around ``Name <addr>`` are dropped as ``policy.default`` drops them."""

from __future__ import annotations

import email
from email import policy
from email.utils import getaddresses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parse.headers import _plain_addresses, parse_addresses
from tests.corpus import corpus_folder

ATOM = st.text("aZ09!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=6)
ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", ATOM, ATOM)
PHRASE = st.lists(ATOM, max_size=3).map(" ".join)
SPACE = st.sampled_from(["", " ", "  ", "\t"])
ITEM = st.one_of(
    st.builds(lambda a, s1, s2: f"{s1}{a}{s2}", ADDRESS, SPACE, SPACE),
    st.builds(lambda p, a, s1, s2: f"{s1}{p}{s2}<{a}>{s1}", PHRASE, ADDRESS, SPACE, SPACE),
)
PLAIN_VALUE = st.lists(ITEM, min_size=1, max_size=4).map(",".join)


def library(value: str) -> list[tuple[str, str]]:
    return [(name, address) for name, address in getaddresses([value]) if name or address]


@settings(max_examples=3000)
@given(PLAIN_VALUE)
def test_plain_values_parse_as_the_library_parses_them(value: str) -> None:
    fast = _plain_addresses(value)
    assert fast is not None, value
    assert fast == library(value)


@settings(max_examples=3000)
@given(st.text("aZ0.-@<>, \t\"()\\;:[]é", max_size=16))
def test_anything_taken_is_what_the_library_gives(value: str) -> None:
    fast = _plain_addresses(value)
    if fast is not None:
        assert fast == library(value)


@pytest.mark.parametrize("value", [
    '"Doe, John" <john@example.com>',  # quotes
    "john@example.com (John)",  # comment
    "Team: ann@example.com, bob@example.com;",  # group
    "<@route.example:ann@example.com>",  # source route
    "Zoë <zoe@example.com>",  # non-ASCII
    "ann@example.com@evil.test",  # two @
    "ann@example.com <eve@evil.test>",  # address in front of <...>
])
def test_anything_unusual_is_left_to_the_library(value: str) -> None:
    assert _plain_addresses(value) is None


def test_the_corpus_address_headers_parse_as_before() -> None:
    folder = corpus_folder()
    if not folder.is_dir():
        pytest.skip(f"no corpus at {folder}")
    taken = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.compat32)
        for header in ("from", "to", "cc", "reply-to", "sender"):
            for raw in message.get_all(header) or []:
                value = " ".join(str(raw).split())
                fast = _plain_addresses(value)
                if fast is not None:
                    taken += 1
                    assert fast == library(value), (path.name, value)
    assert taken > 500  # the corpus's plain headers do take the fast path


def test_parse_addresses_reads_plain_and_unusual_values_alike() -> None:
    defects: list[str] = []
    assert parse_addresses("to", ["Ann Lee <Ann@Example.COM>, bob@example.com",
                                  '"Doe, John" <john@example.com>'], defects) == [
        {"name": "Ann Lee", "address": "Ann@Example.COM"},  # as written
        {"name": "", "address": "bob@example.com"},
        {"name": "Doe, John", "address": "john@example.com"},
    ]
    assert defects == []


# -- comments: no part of a display name, as policy.default reads them ---------------------
WORD = st.text("aZ09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=5)
COMMENT = st.builds(lambda words, nested: "(" + " ".join(words) + (f" ({nested})" if nested
                                                                    else "") + ")",
                    st.lists(WORD, min_size=1, max_size=2), st.one_of(st.just(""), WORD))
NAME_PART = st.one_of(WORD, COMMENT)
LOCAL = st.text("aZ09", min_size=1, max_size=5)


@st.composite
def name_addr_with_comments(draw: st.DrawFn) -> str:
    parts = draw(st.lists(NAME_PART, min_size=1, max_size=4))
    local, domain = draw(LOCAL), draw(LOCAL)
    inside = draw(st.sampled_from(["", "local", "domain"]))
    comment = draw(COMMENT)
    address = (f"{local}{comment}@{domain}" if inside == "local"
               else f"{local}@{comment}{domain}" if inside == "domain"
               else f"{local}@{domain}")
    after = draw(st.one_of(st.just(""), COMMENT))
    return f"{' '.join(parts)} <{address}> {after}".strip()


def library_mailboxes(value: str) -> list[tuple[str, str]]:
    message = email.message_from_string(f"From: {value}\n\n", policy=policy.default)
    return [(a.display_name, a.addr_spec) for a in message["from"].addresses]


@settings(max_examples=500)
@given(st.lists(name_addr_with_comments(), min_size=1, max_size=3).map(", ".join))
def test_comments_in_and_around_name_addr_are_dropped_as_the_library_drops_them(
        value: str) -> None:
    defects: list[str] = []
    ours = [(a["name"], a["address"]) for a in parse_addresses("from", [value], defects)]
    assert ours == library_mailboxes(value), value
    assert defects == []
