"""Node: a Ray node as Roundhouse knows it.

States: ``alive --mark_lost--> lost --rejoin--> alive``; ``update_facts`` while
alive records only facts that changed.
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate, event

from events.common import InvalidTransition, node_id_of


class Node(Aggregate):
    @staticmethod
    def create_id(node_id: str) -> uuid.UUID:
        return node_id_of(node_id)

    @event("Joined")
    def __init__(self, node_id: str, facts: dict[str, Any], requested_by: dict[str, Any],
                 task_id: str | None = None) -> None:
        self.node_id = node_id
        self.facts = facts
        self.alive = True

    def update_facts(self, facts: dict[str, Any]) -> bool:
        if not self.alive:
            raise InvalidTransition("node", self.node_id, "lost", "update_facts", ["rejoin"])
        if facts == self.facts:
            return False
        self._facts_updated(facts=facts, requested_by=self.agent, task_id=None)
        return True

    @event("FactsUpdated")
    def _facts_updated(self, facts: dict[str, Any], requested_by: dict[str, Any],
                       task_id: str | None) -> None:
        self.facts = facts

    @property
    def agent(self) -> dict[str, Any]:
        """``requested_by`` of what this node's agent reports."""
        return {"user_id": None, "organization_id": None, "actor": f"node:{self.node_id}"}

    def mark_lost(self, reason: str, requested_by: dict[str, Any]) -> None:
        if not self.alive:
            raise InvalidTransition("node", self.node_id, "lost", "mark_lost", ["rejoin"])
        self._lost(reason=reason, requested_by=requested_by, task_id=None)

    @event("Lost")
    def _lost(self, reason: str, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.alive = False

    def rejoin(self, facts: dict[str, Any]) -> None:
        if self.alive:
            raise InvalidTransition(
                "node", self.node_id, "alive", "rejoin", ["mark_lost", "update_facts"]
            )
        self._rejoined(facts=facts, requested_by=self.agent, task_id=None)

    @event("Rejoined")
    def _rejoined(self, facts: dict[str, Any], requested_by: dict[str, Any],
                  task_id: str | None) -> None:
        self.facts = facts
        self.alive = True
