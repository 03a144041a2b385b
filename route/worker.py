"""The route stage: a parsed email in, the same email with its deliveries out.

Takes parsed documents; gives one routed document each.  Routing decisions are the pure
function ``route.router.route``; a message no one may receive is a ``PermanentError`` with
the reason, which the runtime dead-letters.
"""

from __future__ import annotations

from typing import Any

from route.directory import Directory
from route.forwarding import ForwardPolicy
from route.router import route
from shared.schemas import Edge
from shared.stage import Output


class RouteStage:
    name = "route"
    input_edge: Edge = "parsed"

    def __init__(self, directory: Directory, forwarding: ForwardPolicy | None = None) -> None:
        self.directory = directory
        self.forwarding = forwarding or ForwardPolicy()

    def handle(self, document: dict[str, Any]) -> list[Output]:
        deliveries = route(document, self.directory, self.forwarding)
        return [Output("routed", {
            "trace_id": document["trace_id"],
            "source": document["source"],
            "envelope": document["envelope"],
            "email": document["email"],
            "deliveries": deliveries,
        })]
