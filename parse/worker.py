"""The parse stage: one raw message in, one ``parsed`` document per email it carries out.

Takes a decoded ``raw`` document (``trace_id``, ``source``, ``raw`` bytes; see
``shared.schemas.RawSchema``) and gives ``Output("parsed", {trace_id, source, envelope,
email})`` for the message itself (direct mailbox, or a message redirected to a forward
mailbox) or for each message attached to a forward envelope, all under the same
``trace_id`` with the envelope's ``index`` telling them apart.
Fails with the :class:`~shared.errors.PermanentError` of :func:`parse.extract.parse_raw`
(limits, ``parse-time-exceeded``, ``invalid-forward-mail-item``, ``unparseable``); it has
no other failure mode.
"""

from __future__ import annotations

from typing import Any

from parse.extract import parse_raw
from shared.settings import LimitSettings
from shared.stage import Output


class ParseStage:
    name = "parse"
    input_edge = "raw"

    def __init__(self, limits: LimitSettings) -> None:
        self._limits = limits

    def handle(self, document: dict[str, Any]) -> list[Output]:
        source = document["source"]
        result = parse_raw(document["raw"], source["mailbox_kind"], self._limits)
        return [
            Output("parsed", {"trace_id": document["trace_id"], "source": source,
                              "envelope": envelope, "email": email})
            for envelope, email in result.items()
        ]
