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
    def __init__(self, node_id: str, facts: dict[str, Any]) -> None:
        self.node_id = node_id
        self.facts = facts
        self.alive = True

    def update_facts(self, facts: dict[str, Any]) -> bool:
        if not self.alive:
            raise InvalidTransition("node", self.node_id, "lost", "update_facts", ["rejoin"])
        if facts == self.facts:
            return False
        self._facts_updated(facts=facts)
        return True

    @event("FactsUpdated")
    def _facts_updated(self, facts: dict[str, Any]) -> None:
        self.facts = facts

    def mark_lost(self, reason: str) -> None:
        if not self.alive:
            raise InvalidTransition("node", self.node_id, "lost", "mark_lost", ["rejoin"])
        self._lost(reason=reason)

    @event("Lost")
    def _lost(self, reason: str) -> None:
        self.alive = False

    def rejoin(self, facts: dict[str, Any]) -> None:
        if self.alive:
            raise InvalidTransition(
                "node", self.node_id, "alive", "rejoin", ["mark_lost", "update_facts"]
            )
        self._rejoined(facts=facts)

    @event("Rejoined")
    def _rejoined(self, facts: dict[str, Any]) -> None:
        self.facts = facts
        self.alive = True
