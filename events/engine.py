"""EngineInstance: one configured engine registry row, and the name claims that keep names unique.

States and allowed commands (``EngineStatus``)::

    registered --request_install--> installing --complete_install--> installed
    installing --fail_install--> error
    registered | installing | installed | error --activate--> active
    active --deactivate--> installed
    installed | error | registered --request_install--> installing
    active --request_install--> active          (install request recorded; stays active)
    any but removed --update_config | rename--> (same state)
    any but removed --remove--> removed

No command emits an event that changes nothing: an unchanged config or name is
not recorded, and a repeated state change raises InvalidTransition.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from eventsourcing.domain import Aggregate, event

from events.common import InvalidTransition, engine_id, name_claim_id


class EngineStatus(StrEnum):
    REGISTERED = "registered"
    INSTALLING = "installing"
    INSTALLED = "installed"
    ACTIVE = "active"
    ERROR = "error"
    REMOVED = "removed"


_LIVE: set[EngineStatus] = {s for s in EngineStatus if s is not EngineStatus.REMOVED}

ENGINE_COMMANDS: dict[str, set[EngineStatus]] = {
    "update_config": _LIVE,
    "rename": _LIVE,
    "request_install": _LIVE,
    "complete_install": {EngineStatus.INSTALLING},
    "fail_install": {EngineStatus.INSTALLING},
    "activate": {
        EngineStatus.REGISTERED,
        EngineStatus.INSTALLING,
        EngineStatus.INSTALLED,
        EngineStatus.ERROR,
    },
    "deactivate": {EngineStatus.ACTIVE},
    "remove": _LIVE,
}


def allowed_engine_commands(status: EngineStatus) -> list[str]:
    return sorted(c for c, states in ENGINE_COMMANDS.items() if status in states)


class EngineInstance(Aggregate):
    @staticmethod
    def create_id(row_id: int) -> uuid.UUID:
        return engine_id(row_id)

    @event("Registered")
    def __init__(
        self,
        row_id: int,
        provider: str,
        name: str,
        config: dict[str, Any],
        organization_id: int | str | None,
        requested_by: dict[str, Any],
        task_id: str | None,
    ) -> None:
        self.row_id = row_id
        self.provider = provider
        self.name = name
        self.config = config
        self.organization_id = organization_id
        self.status = EngineStatus.REGISTERED
        self.last_install_event_id: str | None = None
        self.install_error = ""

    def _check(self, command: str) -> None:
        if self.status not in ENGINE_COMMANDS[command]:
            raise InvalidTransition(
                "engine", self.row_id, self.status.value, command,
                allowed_engine_commands(self.status),
            )

    def update_config(self, config: dict[str, Any], requested_by: dict[str, Any],
                      task_id: str | None = None) -> bool:
        """Record a new config; returns False (and records nothing) when it is unchanged."""
        self._check("update_config")
        if config == self.config:
            return False
        self._config_updated(config=config, requested_by=requested_by, task_id=task_id)
        return True

    @event("ConfigUpdated")
    def _config_updated(self, config: dict[str, Any], requested_by: dict[str, Any],
                        task_id: str | None) -> None:
        self.config = config

    def rename(self, name: str, requested_by: dict[str, Any], task_id: str | None = None) -> bool:
        self._check("rename")
        if name == self.name:
            return False
        self._renamed(name=name, requested_by=requested_by, task_id=task_id)
        return True

    @event("Renamed")
    def _renamed(self, name: str, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.name = name

    def request_install(self, event_id: str, force: bool, manifest_version: int,
                        engine_version: str, source_node_id: str,
                        requested_by: dict[str, Any], task_id: str | None) -> bool:
        """Record an install request; False (nothing recorded) if ``event_id`` is current."""
        self._check("request_install")
        if event_id == self.last_install_event_id:
            return False
        self._install_requested(
            event_id=event_id, force=force, manifest_version=manifest_version,
            engine_version=engine_version, source_node_id=source_node_id,
            requested_by=requested_by, task_id=task_id,
        )
        return True

    @event("InstallRequested")
    def _install_requested(self, event_id: str, force: bool, manifest_version: int,
                           engine_version: str, source_node_id: str,
                           requested_by: dict[str, Any], task_id: str | None) -> None:
        self.last_install_event_id = event_id
        self.install_error = ""
        if self.status is not EngineStatus.ACTIVE:
            self.status = EngineStatus.INSTALLING

    def complete_install(self, event_id: str, requested_by: dict[str, Any],
                         task_id: str | None = None) -> None:
        self._check("complete_install")
        self._install_completed(event_id=event_id, requested_by=requested_by, task_id=task_id)

    @event("InstallCompleted")
    def _install_completed(self, event_id: str, requested_by: dict[str, Any],
                           task_id: str | None) -> None:
        self.status = EngineStatus.INSTALLED

    def fail_install(self, event_id: str, error: str, requested_by: dict[str, Any],
                     task_id: str | None = None) -> None:
        self._check("fail_install")
        self._install_failed(event_id=event_id, error=error, requested_by=requested_by,
                             task_id=task_id)

    @event("InstallFailed")
    def _install_failed(self, event_id: str, error: str, requested_by: dict[str, Any],
                        task_id: str | None) -> None:
        self.status = EngineStatus.ERROR
        self.install_error = error

    def activate(self, requested_by: dict[str, Any], task_id: str | None = None) -> None:
        self._check("activate")
        self._activated(requested_by=requested_by, task_id=task_id)

    @event("Activated")
    def _activated(self, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.status = EngineStatus.ACTIVE

    def deactivate(self, requested_by: dict[str, Any], task_id: str | None = None) -> None:
        self._check("deactivate")
        self._deactivated(requested_by=requested_by, task_id=task_id)

    @event("Deactivated")
    def _deactivated(self, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.status = EngineStatus.INSTALLED

    def remove(self, requested_by: dict[str, Any], task_id: str | None = None) -> None:
        self._check("remove")
        self._removed(requested_by=requested_by, task_id=task_id)

    @event("Removed")
    def _removed(self, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.status = EngineStatus.REMOVED


class NameClaim(Aggregate):
    """Who holds a unique name of a kind ("engine", "model").

    Claims are saved in the same transaction as the row that takes the name, so
    two writers racing for one name cannot both win: the loser's save conflicts.
    """

    @staticmethod
    def create_id(kind: str, name: str) -> uuid.UUID:
        return name_claim_id(kind, name)

    @event("Claimed")
    def __init__(self, kind: str, name: str, owner_row_id: int,
                 requested_by: dict[str, Any] | None = None, task_id: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.owner_row_id: int | None = owner_row_id

    def reclaim(self, owner_row_id: int, requested_by: dict[str, Any] | None = None,
                task_id: str | None = None) -> None:
        if self.owner_row_id is not None:
            raise InvalidTransition("name", self.name, "claimed", "claim", ["release"])
        self._reclaimed(owner_row_id=owner_row_id, requested_by=requested_by, task_id=task_id)

    @event("Reclaimed")
    def _reclaimed(self, owner_row_id: int, requested_by: dict[str, Any] | None,
                   task_id: str | None) -> None:
        self.owner_row_id = owner_row_id

    def release(self, requested_by: dict[str, Any] | None = None,
                task_id: str | None = None) -> None:
        if self.owner_row_id is None:
            raise InvalidTransition("name", self.name, "free", "release", ["claim"])
        self._released(requested_by=requested_by, task_id=task_id)

    @event("Released")
    def _released(self, requested_by: dict[str, Any] | None, task_id: str | None) -> None:
        self.owner_row_id = None
