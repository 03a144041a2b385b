"""The persist stage: the end of the pipeline, where routed documents become records.

Takes decoded ``routed`` documents; writes each batch in one database transaction through
:class:`~persist.store.EmailStore` and produces no output documents (the runtime acks the
batch once ``handle_batch`` returns, i.e. after the commit).  Fails with ``PermanentError``
(reason ``unstorable``) when a document cannot be stored -- for a batch the runtime then
retries the documents one by one -- and ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

import logging
from typing import Any

from persist.store import EmailStore, SaveResult
from shared.schemas import Edge
from shared.stage import Output


class PersistStage:
    name = "persist"
    input_edge: Edge = "routed"

    def __init__(self, store: EmailStore) -> None:
        self._store = store
        self._log = logging.getLogger("mailroute.persist")

    def handle(self, document: dict[str, Any]) -> list[Output]:
        return self.handle_batch([document])[0]

    def handle_batch(self, documents: list[dict[str, Any]]) -> list[list[Output]]:
        results = self._store.save(documents)
        for result in results:
            self._log_result(result)
        return [[] for _ in documents]

    def _log_result(self, result: SaveResult) -> None:
        if not self._log.isEnabledFor(logging.DEBUG):
            return
        self._log.debug(
            "saved email %s (%s) new=%s deliveries=%s",
            result.email_id,
            result.dedup_key,
            result.email_new,
            ", ".join(f"{d.principal_kind}:{d.principal}{'*' if d.new else ''}"
                      for d in result.deliveries),
        )
