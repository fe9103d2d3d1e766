"""What the orchestrator and the runtime managers share: the targets and runtimes they pass,
the ``RuntimeManager`` protocol, and the errors a request can meet (each with its HTTP
status and OpenAI error code). Lives in ``actors`` so that runtime managers need not
import ``cluster``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


# --- errors a request can meet (the gateway maps each to an HTTP status) ---------------------
class OrchestratorError(Exception):
    """Base of the errors a job can end with; ``status`` is the HTTP status to answer."""

    status = 500
    code = "internal_error"
    kind = "server_error"


class QueueFull(OrchestratorError):
    status, code, kind = 429, "queue_full", "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotFound(OrchestratorError):
    status, code, kind = 404, "model_not_found", "invalid_request_error"


class NoEngine(OrchestratorError):
    """The model is registered but no active engine instance can serve it."""

    status, code, kind = 503, "engine_unavailable", "server_error"


class LoadFailed(OrchestratorError):
    status, code, kind = 503, "model_load_failed", "server_error"


class RuntimeDead(OrchestratorError):
    """The engine process is gone and its supervisor gave up."""

    status, code, kind = 502, "engine_unavailable", "server_error"


class Cancelled(OrchestratorError):
    status, code, kind = 499, "cancelled", "server_error"


# --- the narrow interface to whoever starts engine processes ---------------------------------
@dataclass(frozen=True)
class Target:
    """What a model name resolved to: one engine instance and one registered model."""

    model: str
    engine_registry_id: int
    model_registry_id: int
    provider: str = ""
    #: Seconds to keep the runtime after its last request; None = the orchestrator default.
    keep_alive_s: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.engine_registry_id, self.model_registry_id)


@dataclass(frozen=True)
class LoadedRuntime:
    """A ready engine process: where to send requests and the model id it answers to."""

    url: str
    node_id: str
    engine_model: str
    pid: int | None = None
    app_name: str = ""


class RuntimeManager(Protocol):
    """Resolves model names and starts/stops runtimes; the orchestrator's only side effects."""

    async def resolve(self, model: str) -> Target:
        """The active engine instance and row for ``model``; raise ModelNotFound/NoEngine."""
        ...

    async def load(self, target: Target, requested_by: Mapping[str, Any] | None,
                   job_id: str) -> LoadedRuntime:
        """Start the runtime and return it ready; raise LoadFailed (with the reason)."""
        ...

    async def unload(self, target: Target, runtime: LoadedRuntime, reason: str,
                     requested_by: Mapping[str, Any] | None) -> None:
        """Stop the runtime's process and record why; must not raise for a vanished runtime."""
        ...

    async def wait_ready(self, target: Target, runtime: LoadedRuntime) -> LoadedRuntime:
        """After an engine error: wait for the supervisor's restart; raise RuntimeDead if gone."""
        ...
