"""ModelRegistration (a registered model) and ModelRuntime (a model loaded on a node).

ModelRegistration states: ``registered --remove--> removed``; ``update`` and
``store_artifact`` while registered record only real changes.

ModelRuntime, one per (engine row, model row, node)::

    (new) | unloaded | failed --request_load--> loading
    loading --loaded--> loaded
    loaded --restarted(new pid)--> loaded
    loading --fail_load--> failed
    loading | loaded --unload(reason)--> unloaded

Unload reasons: user, idle, stop_engine, deactivated, node_lost, crashed.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from eventsourcing.domain import Aggregate, event

from events.common import SYSTEM_ACTOR, DomainError, InvalidTransition, model_id, runtime_id

UNLOAD_REASONS = ("user", "idle", "stop_engine", "deactivated", "node_lost", "crashed")


class ModelRegistration(Aggregate):
    @staticmethod
    def create_id(row_id: int) -> uuid.UUID:
        return model_id(row_id)

    @event("Registered")
    def __init__(self, row_id: int, name: str, display_name: str, source: dict[str, Any],
                 format: str, engine_kinds: list[str], requested_by: dict[str, Any],
                 task_id: str | None, keep_alive_s: int | None = None) -> None:
        self.row_id = row_id
        self.name = name
        self.display_name = display_name
        self.source = source
        self.format = format
        self.engine_kinds = engine_kinds
        #: Seconds a loaded runtime may idle before it is unloaded (None = the default;
        #: 0 = after each request; -1 = never).
        self.keep_alive_s = keep_alive_s
        self.removed = False
        self.artifact: dict[str, Any] | None = None

    def _check(self, command: str) -> None:
        if self.removed:
            raise InvalidTransition("model", self.row_id, "removed", command, [])

    def update(self, fields: dict[str, Any], requested_by: dict[str, Any],
               task_id: str | None = None) -> bool:
        """Record changed registration fields; False (nothing recorded) if none changed."""
        self._check("update")
        changed = {k: v for k, v in fields.items() if getattr(self, k) != v}
        if not changed:
            return False
        self._updated(fields=changed, requested_by=requested_by, task_id=task_id)
        return True

    @event("Updated")
    def _updated(self, fields: dict[str, Any], requested_by: dict[str, Any],
                 task_id: str | None) -> None:
        for key, value in fields.items():
            setattr(self, key, value)

    def store_artifact(self, artifact: dict[str, Any], requested_by: dict[str, Any],
                       task_id: str | None = None) -> bool:
        self._check("store_artifact")
        if artifact == self.artifact:
            return False
        self._artifact_stored(artifact=artifact, requested_by=requested_by, task_id=task_id)
        return True

    @event("ArtifactStored")
    def _artifact_stored(self, artifact: dict[str, Any], requested_by: dict[str, Any],
                         task_id: str | None) -> None:
        self.artifact = artifact

    def remove(self, requested_by: dict[str, Any], task_id: str | None = None) -> None:
        self._check("remove")
        self._removed(requested_by=requested_by, task_id=task_id)

    @event("Removed")
    def _removed(self, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.removed = True


class RuntimeState(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    UNLOADED = "unloaded"


RUNTIME_COMMANDS: dict[str, set[RuntimeState]] = {
    "request_load": {RuntimeState.FAILED, RuntimeState.UNLOADED},
    "loaded": {RuntimeState.LOADING},
    "restarted": {RuntimeState.LOADED},
    "fail_load": {RuntimeState.LOADING},
    "unload": {RuntimeState.LOADING, RuntimeState.LOADED},
}


class BadUnloadReason(DomainError):
    """An unload named a reason outside ``UNLOAD_REASONS``."""


class ModelRuntime(Aggregate):
    @staticmethod
    def create_id(engine_row_id: int, model_row_id: int, node_id: str) -> uuid.UUID:
        return runtime_id(engine_row_id, model_row_id, node_id)

    @event("LoadRequested")
    def __init__(self, engine_row_id: int, model_row_id: int, node_id: str,
                 requested_by: dict[str, Any], task_id: str | None) -> None:
        self.engine_row_id = engine_row_id
        self.model_row_id = model_row_id
        self.node_id = node_id
        self.state = RuntimeState.LOADING
        self.pid: int | None = None

    def _check(self, command: str) -> None:
        if self.state not in RUNTIME_COMMANDS[command]:
            allowed = sorted(c for c, s in RUNTIME_COMMANDS.items() if self.state in s)
            raise InvalidTransition(
                "runtime", f"{self.engine_row_id}/{self.model_row_id}@{self.node_id}",
                self.state.value, command, allowed,
            )

    def request_load(self, requested_by: dict[str, Any], task_id: str | None = None) -> None:
        self._check("request_load")
        self._reload_requested(requested_by=requested_by, task_id=task_id)

    @event("ReloadRequested")
    def _reload_requested(self, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.state = RuntimeState.LOADING
        self.pid = None

    def mark_loaded(self, pid: int, model_path: str, memory_bytes: int, url: str,
                    app_name: str) -> None:
        self._check("loaded")
        self._loaded(pid=pid, model_path=model_path, memory_bytes=memory_bytes, url=url,
                     app_name=app_name, requested_by=SYSTEM_ACTOR, task_id=None)

    @event("Loaded")
    def _loaded(self, pid: int, model_path: str, memory_bytes: int, url: str,
                app_name: str, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.state = RuntimeState.LOADED
        self.pid = pid

    def restarted(self, pid: int, reason: str) -> bool:
        """The supervisor restarted the engine process; False if ``pid`` is not new."""
        self._check("restarted")
        if pid == self.pid:
            return False
        self._restarted(pid=pid, reason=reason, requested_by=SYSTEM_ACTOR, task_id=None)
        return True

    @event("Restarted")
    def _restarted(self, pid: int, reason: str, requested_by: dict[str, Any],
                   task_id: str | None) -> None:
        self.pid = pid

    def fail_load(self, error: str) -> None:
        self._check("fail_load")
        self._load_failed(error=error, requested_by=SYSTEM_ACTOR, task_id=None)

    @event("LoadFailed")
    def _load_failed(self, error: str, requested_by: dict[str, Any],
                     task_id: str | None) -> None:
        self.state = RuntimeState.FAILED

    def unload(self, reason: str, requested_by: dict[str, Any], task_id: str | None = None) -> None:
        if reason not in UNLOAD_REASONS:
            raise BadUnloadReason(
                f"unknown unload reason {reason!r}; use one of {', '.join(UNLOAD_REASONS)}"
            )
        self._check("unload")
        self._unloaded(reason=reason, requested_by=requested_by, task_id=task_id)

    @event("Unloaded")
    def _unloaded(self, reason: str, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.state = RuntimeState.UNLOADED
        self.pid = None
