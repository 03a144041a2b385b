"""The fuzz target of ``make fuzz`` in ``make test``: its seeds and mutations of them (fault 34).

A short deterministic run of the same target atheris drives (tests/fuzz_parse.py): every seed,
then each seed truncated, bit-flipped and spliced with another at random positions.  Each input
must end in a kept and routed message or a named ``PermanentError`` within the CPU budget; the
target raises anything else, which fails the test with the seed to repeat it.
"""

from __future__ import annotations

import random

import pytest

from tests.fuzz_parse import TIME_BUDGET, Target, seeds

MUTATIONS_PER_SEED = 4


def mutate(raw: bytes, other: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(4)
    if choice == 0 and len(raw) > 2:
        return raw[:rng.randrange(1, len(raw))]
    if choice == 1 and len(raw) > 1:
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 16)):
            position = rng.randrange(1, len(data))
            data[position] ^= 1 << rng.randrange(8)
        return bytes(data)
    if choice == 2:
        cut = rng.randrange(len(raw) + 1)
        return raw[:cut] + other[rng.randrange(len(other) + 1):]
    position = rng.randrange(1, len(raw) + 1) if len(raw) > 1 else 1
    return raw[:position] + rng.choice([b"\r\n--", b"=?utf-8?B?", b"\x00", b"\r\n\r\n",
                                        b"boundary=\"", b"Content-Type: message/rfc822\r\n"]) \
        + raw[position:]


@pytest.mark.parametrize("seed", [20261127])
def test_seeds_and_their_mutations_end_in_a_record_or_a_named_failure(seed: int) -> None:
    rng = random.Random(seed)
    target = Target(TIME_BUDGET)
    inputs = seeds()
    for raw in inputs:
        target(raw)
        for _ in range(MUTATIONS_PER_SEED):
            target(mutate(raw, rng.choice(inputs), rng))
    assert target.runs == len(inputs) * (1 + MUTATIONS_PER_SEED)
    # Both ends were reached: some inputs were kept, some failed by name.
    assert target.outcomes.get("kept", 0) > 0
    assert set(target.outcomes) - {"kept"}
