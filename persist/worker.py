"""The persist stage: the end of the pipeline, where routed documents become records.

Takes decoded ``routed`` documents; writes each batch in one database transaction through
:class:`~persist.store.EmailStore` and produces no output documents (the runtime acks the
batch once ``handle_batch`` returns, i.e. after the commit).  A canary (a document with
``canary`` set: mailroute's own test message, see ``route.canary``) is never stored as mail:
it is marked seen in ``persist.canaries`` for the principal route found, and counted in
``mailroute_canary_seen_total`` and ``mailroute_canary_roundtrip_seconds``.
Fails with ``PermanentError`` (reason ``unstorable``) when a document cannot be stored -- for
a batch the runtime then retries the documents one by one -- ``unknown-canary`` or
``canary-principal-mismatch`` for a canary mailroute did not send to that principal, and
``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

import logging
from typing import Any

from persist.canaries import CanaryStore
from persist.store import EmailStore, SaveResult
from shared.errors import PermanentError
from shared.metrics import Metrics
from shared.schemas import Edge
from shared.stage import Output


class PersistStage:
    name = "persist"
    input_edge: Edge = "routed"

    def __init__(self, store: EmailStore, canaries: CanaryStore | None = None,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._canaries = canaries
        self._metrics = metrics
        self._log = logging.getLogger("mailroute.persist")

    def handle(self, document: dict[str, Any]) -> list[Output]:
        return self.handle_batch([document])[0]

    def handle_batch(self, documents: list[dict[str, Any]]) -> list[list[Output]]:
        mail = [document for document in documents if "canary" not in document]
        for document in documents:
            if "canary" in document:
                self._canary_seen(document)
        results = self._store.save(mail)
        for result in results:
            self._log_result(result)
        return [[] for _ in documents]

    def _canary_seen(self, document: dict[str, Any]) -> None:
        """Mark a canary seen (idempotent: a redelivered one changes nothing)."""
        canary_id = document["canary"]
        deliveries = document["deliveries"]
        if self._canaries is None:
            raise PermanentError("unknown-canary",
                                 f"canary {canary_id}: this persist keeps no canaries")
        if len(deliveries) != 1:
            raise PermanentError(
                "canary-principal-mismatch",
                f"canary {canary_id} reached {len(deliveries)} users or queues, not the one "
                "it was sent to")
        delivery = deliveries[0]
        seen = self._canaries.mark_seen(canary_id, delivery["principal_kind"],
                                        delivery["principal"])
        if not seen.first:
            return
        roundtrip = seen.canary.roundtrip or 0.0
        if self._metrics is not None:
            self._metrics.canary_seen.labels(principal=seen.canary.principal).inc()
            self._metrics.canary_roundtrip.observe(roundtrip)
        if seen.late:
            self._log.warning("canary for %s %s arrived late, %.1f s after it was sent "
                              "(its alert clears)", seen.canary.principal_kind,
                              seen.canary.principal, roundtrip)
        else:
            self._log.info("canary for %s %s seen in forward mailbox %s after %.1f s",
                           seen.canary.principal_kind, seen.canary.principal,
                           seen.canary.forward_mailbox, roundtrip)

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
