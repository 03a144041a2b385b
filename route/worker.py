"""The route stage: a parsed email in, the same email with its deliveries and records out.

Takes parsed documents, one at a time or a batch (whose threading lookups are then asked at
once: ``Router.history_for``; so are a single email's when it has more than one kind of
lookup); gives one routed document each.  The decisions are
``route.router.Router.decide`` (pure apart from read-only lookups of stored mail through
``route.history.History``); a message no one may receive is a ``PermanentError`` with the
reason, which the runtime dead-letters; a lookup that cannot reach the database is a
``TransientError`` (retried).  Each untracked delivery is counted in
``mailroute_messages_untracked_total{stage="route",reason}``.  A canary (mailroute's test
message) goes out as a routed document with ``canary`` set, for persist to mark it seen.
"""

from __future__ import annotations

from typing import Any

from route.directory import Directory
from route.forwarding import ForwardPolicy
from route.history import History
from route.router import Router, TimedFacts
from shared.metrics import Metrics
from shared.schemas import Edge
from shared.settings import Settings
from shared.stage import Output


class RouteStage:
    name = "route"
    input_edge: Edge = "parsed"

    def __init__(self, router: Router | Directory, forwarding: ForwardPolicy | None = None,
                 *, metrics: Metrics | None = None) -> None:
        # A bare Directory (older callers) routes with default settings and no history.
        self.router = router if isinstance(router, Router) else Router(
            Settings(), router, forwarding=forwarding)
        self.directory = self.router.directory
        self._metrics = metrics

    def handle(self, document: dict[str, Any]) -> list[Output]:
        facts = self.router.threading_facts(document)
        outputs = self._route(document, self.router.history_for([document], [facts]), facts)
        self._count_untracked(outputs)
        return outputs

    def handle_batch(self, documents: list[dict[str, Any]]) -> list[list[Output]]:
        """The batch's threading lookups asked at once, then each email routed as alone.
        A document that cannot be routed fails the batch: the runtime then routes each
        document alone, so that only that one is dead-lettered."""
        facts = [self.router.threading_facts(document) for document in documents]
        history = self.router.history_for(documents, facts)
        results = [self._route(document, history, thread)
                   for document, thread in zip(documents, facts, strict=True)]
        for outputs in results:  # counted once the whole batch has succeeded
            self._count_untracked(outputs)
        return results

    def _route(self, document: dict[str, Any], history: History,
               facts: TimedFacts | None = None) -> list[Output]:
        decision = self.router.decide(document, history, facts)
        routed = {
            "trace_id": document["trace_id"],
            "source": document["source"],
            "envelope": document["envelope"],
            "email": decision.email,
            "deliveries": decision.deliveries,
            "correlation": decision.correlation,
            "records": decision.records,
        }
        if decision.canary is not None:  # absent otherwise: ordinary documents keep their shape
            routed["canary"] = decision.canary
        return [Output("routed", routed)]

    def _count_untracked(self, outputs: list[Output]) -> None:
        if self._metrics is None:
            return
        for output in outputs:
            if "canary" in output.document:
                continue  # mailroute's own test message, not mail left untracked
            for delivery in output.document["deliveries"]:
                if not delivery["tracked"]:
                    self._metrics.messages_untracked.labels(
                        stage="route", reason=delivery["untracked_reason"]).inc()
