"""NodeInstall: the install of one engine instance on one node.

One aggregate per (engine row, node), so that many nodes reporting at once
never contend on a single aggregate. States (``InstallState``)::

    (new) --queue--> pending
    pending | installing | installed | error --queue(new request)--> pending
    pending --start--> installing
    installing --progress--> installing   (only when fraction or message changed)
    installing --succeed--> installed
    pending | installing --fail--> error

Every state-changing command names the install request it answers
(``event_id`` of the engine's InstallRequested); a report for an older request
is refused with StaleInstallReport, so a slow node cannot overwrite a newer
request's row.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from eventsourcing.domain import Aggregate, event

from events.common import DomainError, InvalidTransition, node_install_id


class InstallState(StrEnum):
    PENDING = "pending"
    INSTALLING = "installing"
    INSTALLED = "installed"
    ERROR = "error"


INSTALL_COMMANDS: dict[str, set[InstallState]] = {
    "queue": set(InstallState),
    "start": {InstallState.PENDING},
    "progress": {InstallState.INSTALLING},
    "succeed": {InstallState.INSTALLING},
    "fail": {InstallState.PENDING, InstallState.INSTALLING},
}


class StaleInstallReport(DomainError):
    """A node reported on an install request that has been superseded."""


class NodeInstall(Aggregate):
    @staticmethod
    def create_id(engine_row_id: int, node_id: str) -> uuid.UUID:
        return node_install_id(engine_row_id, node_id)

    @event("Queued")
    def __init__(self, engine_row_id: int, node_id: str, request_event_id: str,
                 force: bool, requested_by: dict[str, Any], task_id: str | None) -> None:
        self.engine_row_id = engine_row_id
        self.node_id = node_id
        self.request_event_id = request_event_id
        self.force = force
        self.task_id = task_id
        self.state = InstallState.PENDING
        self.last_error = ""
        self.engine_version = ""
        self.fraction = 0.0
        self.message = ""

    def _check(self, command: str, request_event_id: str | None = None) -> None:
        if request_event_id is not None and request_event_id != self.request_event_id:
            raise StaleInstallReport(
                f"node {self.node_id} reported on install request {request_event_id} of engine "
                f"{self.engine_row_id}, but the current request is {self.request_event_id}; "
                "reconcile against the latest request"
            )
        if self.state not in INSTALL_COMMANDS[command]:
            allowed = sorted(c for c, s in INSTALL_COMMANDS.items() if self.state in s)
            raise InvalidTransition(
                "install of engine", f"{self.engine_row_id} on node {self.node_id}",
                self.state.value, command, allowed,
            )

    @property
    def agent(self) -> dict[str, Any]:
        """``requested_by`` of the reports this node's agent makes."""
        return {"user_id": None, "organization_id": None, "actor": f"node:{self.node_id}"}

    def queue(self, request_event_id: str, force: bool, requested_by: dict[str, Any],
              task_id: str | None = None) -> bool:
        """Answer a new install request; False (nothing recorded) if it is the current one."""
        if request_event_id == self.request_event_id:
            return False
        self._requeued(request_event_id=request_event_id, force=force,
                       requested_by=requested_by, task_id=task_id)
        return True

    @event("Requeued")
    def _requeued(self, request_event_id: str, force: bool, requested_by: dict[str, Any],
                  task_id: str | None) -> None:
        self.request_event_id = request_event_id
        self.force = force
        self.task_id = task_id
        self.state = InstallState.PENDING
        self.last_error = ""
        self.fraction = 0.0
        self.message = ""

    def start(self, request_event_id: str, plan: dict[str, Any]) -> None:
        self._check("start", request_event_id)
        self._started(request_event_id=request_event_id, plan=plan, requested_by=self.agent,
                      task_id=self.task_id)

    @event("Started")
    def _started(self, request_event_id: str, plan: dict[str, Any],
                 requested_by: dict[str, Any], task_id: str | None) -> None:
        self.state = InstallState.INSTALLING

    def progress(self, request_event_id: str, fraction: float, message: str) -> bool:
        self._check("progress", request_event_id)
        fraction = min(1.0, max(0.0, float(fraction)))
        if fraction == self.fraction and message == self.message:
            return False
        self._progressed(request_event_id=request_event_id, fraction=fraction, message=message,
                         requested_by=self.agent, task_id=self.task_id)
        return True

    @event("Progressed")
    def _progressed(self, request_event_id: str, fraction: float, message: str,
                    requested_by: dict[str, Any], task_id: str | None) -> None:
        self.fraction = fraction
        self.message = message

    def succeed(self, request_event_id: str, engine_version: str, record: dict[str, Any]) -> None:
        self._check("succeed", request_event_id)
        self._succeeded(request_event_id=request_event_id, engine_version=engine_version,
                        record=record, requested_by=self.agent, task_id=self.task_id)

    @event("Succeeded")
    def _succeeded(self, request_event_id: str, engine_version: str,
                   record: dict[str, Any], requested_by: dict[str, Any],
                   task_id: str | None) -> None:
        self.state = InstallState.INSTALLED
        self.engine_version = engine_version
        self.fraction = 1.0

    def fail(self, request_event_id: str, error: str) -> None:
        self._check("fail", request_event_id)
        self._failed(request_event_id=request_event_id, error=error, requested_by=self.agent,
                     task_id=self.task_id)

    @event("Failed")
    def _failed(self, request_event_id: str, error: str, requested_by: dict[str, Any],
                task_id: str | None) -> None:
        self.state = InstallState.ERROR
        self.last_error = error


def aggregate_install_status(states: list[str]) -> str:
    """The engine-level install status from its node rows.

    Rule, in order: no node rows → ``pending``; any ``error`` → ``error``;
    any ``pending`` or ``installing`` → ``installing``; all ``installed`` → ``installed``.
    """
    if not states:
        return InstallState.PENDING.value
    if InstallState.ERROR in states:
        return InstallState.ERROR.value
    if InstallState.PENDING in states or InstallState.INSTALLING in states:
        return InstallState.INSTALLING.value
    return InstallState.INSTALLED.value
