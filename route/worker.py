"""The route stage: a parsed email in, the same email with its deliveries out.

Takes parsed documents; gives one routed document each.  Routing decisions are the pure
function ``route.router.route``; a message no one may receive is a ``PermanentError`` with
the reason, which the runtime dead-letters.
"""

from __future__ import annotations

from typing import Any

from route.directory import Directory
from route.router import route
from shared.schemas import Edge
from shared.stage import Output


class RouteStage:
    name = "route"
    input_edge: Edge = "parsed"

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def handle(self, document: dict[str, Any]) -> list[Output]:
        deliveries = route(document, self.directory)
        return [Output("routed", {
            "trace_id": document["trace_id"],
            "source": document["source"],
            "envelope": document["envelope"],
            "email": document["email"],
            "deliveries": deliveries,
        })]
