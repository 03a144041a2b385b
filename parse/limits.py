"""Cheap checks of a raw message against the configured limits, before any MIME parsing.

Takes the raw bytes and :class:`~shared.settings.LimitSettings`; gives nothing when the message
is within them, else raises :class:`~shared.errors.PermanentError` with the reason
``message-too-large``, ``header-too-large``, ``too-many-parts`` or ``nesting-too-deep``;
:class:`Budget` is the per-message time budget (``parse-time-exceeded``).
The part count and depth come from one regular-expression pass over the delimiter lines and
the multipart / message Content-Type headers, so a hostile message costs a linear scan, not
a parse.  They are estimates: a part the scan cannot see (inside a base64-encoded attached
message) is checked again when that message is parsed.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable

from shared.errors import PermanentError
from shared.settings import LimitSettings

_HEADER_END = re.compile(rb"\r?\n\r?\n")
# A line starting with "--", or a multipart / message Content-Type (with its folded lines).
# The literal leading newline keeps the scan fast (a "^" in MULTILINE mode is 8x slower);
# the first line of the message is matched on its own.
_EVENT_BODY = (rb"(?:--([^\r\n]*)|(?i:content-type):[ \t]*((?i:multipart|message))"
               rb"/([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))")
_EVENT = re.compile(rb"\n" + _EVENT_BODY)
_FIRST_EVENT = re.compile(_EVENT_BODY)
_BOUNDARY = re.compile(rb"""boundary\s*=\s*(?:"([^"\r\n]*)"|([^\s;"]+))""", re.IGNORECASE)


def header_block_size(raw: bytes | memoryview) -> int:
    """Bytes before the blank line ending the header block (all of them when there is none)."""
    match = _HEADER_END.search(raw)
    return match.start() if match else len(raw)


def check_limits(raw: bytes | memoryview, limits: LimitSettings,
                 base_depth: int = 0) -> None:
    """Raise PermanentError when ``raw`` is over a limit; ``base_depth`` counts enclosing levels."""
    if len(raw) > limits.max_message_bytes:
        raise PermanentError(
            "message-too-large", f"{len(raw)} bytes > {limits.max_message_bytes}")
    header_size = header_block_size(raw)
    if header_size > limits.max_header_bytes:
        raise PermanentError(
            "header-too-large", f"{header_size} bytes > {limits.max_header_bytes}")
    parts, depth = estimate_structure(raw)
    if parts > limits.max_parts:
        raise PermanentError("too-many-parts", f"about {parts} parts > {limits.max_parts}")
    if depth + base_depth > limits.max_depth:
        raise PermanentError(
            "nesting-too-deep", f"about {depth + base_depth} levels > {limits.max_depth}")


def estimate_structure(raw: bytes | memoryview) -> tuple[int, int]:
    """(number of body parts, nesting depth) seen from delimiters and Content-Type lines."""
    # The stack holds the boundaries of the open multiparts; None marks an open message/* part,
    # which ends with the next delimiter of an enclosing multipart.
    stack: list[bytes | None] = []
    open_boundaries: dict[bytes, int] = {}
    parts = 0
    depth = 0
    first = _FIRST_EVENT.match(raw)
    for match in itertools.chain([first] if first else [], _EVENT.finditer(raw)):
        line, maintype, rest = match.groups()
        if line is None:
            if maintype.lower() == b"multipart":
                found = _BOUNDARY.search(rest)
                if found is None:
                    continue
                boundary = (found.group(1) if found.group(1) is not None else found.group(2))
                stack.append(boundary)
                open_boundaries[boundary] = open_boundaries.get(boundary, 0) + 1
            else:
                stack.append(None)
            depth = max(depth, len(stack))
            continue
        line = line.rstrip()
        closing = False
        if line not in open_boundaries and line.endswith(b"--"):
            line = line[:-2]
            closing = True
        if not open_boundaries.get(line):
            continue
        while stack and stack[-1] != line:
            _pop(stack, open_boundaries)
        if closing:
            _pop(stack, open_boundaries)
        else:
            parts += 1
    return parts, depth


def _pop(stack: list[bytes | None], open_boundaries: dict[bytes, int]) -> None:
    boundary = stack.pop()
    if boundary is not None:
        open_boundaries[boundary] -= 1


class Budget:
    """A per-message wall-clock deadline, checked between parts and inner messages.

    Pure Python cannot interrupt a running call safely, so the parse checks the deadline at
    every part and every inner message; each step between two checks is itself bounded by
    the limits above (header size, part count, depth).  ``check`` raises
    ``PermanentError("parse-time-exceeded")`` once the deadline has passed.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seconds = seconds
        self._deadline = clock() + seconds

    def check(self) -> None:
        if self._clock() > self._deadline:
            raise PermanentError("parse-time-exceeded",
                                 f"parsing took longer than {self._seconds:g} s")

    @classmethod
    def unlimited(cls) -> Budget:
        return cls(float("inf"))
