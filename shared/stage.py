"""The contract between the worker runtime and a stage.

A stage is a small class with a ``name``, the ``input_edge`` it consumes, and
``handle(document) -> list[Output]``: it takes one decoded document (plain data, see
``shared.schemas``) and gives the documents it produces, each tagged with the edge it goes
out on.  It raises ``PermanentError`` for bad input and anything else for a passing failure.
A stage that can do a batch cheaper than one at a time (persist: one transaction) also
defines ``handle_batch(documents) -> list[list[Output]]``; the runtime falls back to
``handle`` one by one when a batch fails, so one bad message never takes others with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from shared.schemas import Edge


@dataclass(frozen=True)
class Output:
    edge: Edge
    document: dict[str, Any]


@runtime_checkable
class Stage(Protocol):
    name: str
    input_edge: Edge

    def handle(self, document: dict[str, Any]) -> list[Output]: ...


@runtime_checkable
class BatchStage(Stage, Protocol):
    def handle_batch(self, documents: list[dict[str, Any]]) -> list[list[Output]]: ...
