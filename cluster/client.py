"""The Python SDK: ``sdk.models.engine_registry``, ``sdk.models.model_registry``,
``sdk.engines``, ``sdk.nodes`` and ``sdk.audit``, shaped as the module SDK describes.

The SDK talks to a backend: ``open_local(home)`` runs the control plane in this
process on the embedded store; ``cluster.connect(...)`` (the Ray layer) talks to
the control-plane actor. Both expose exactly the same methods.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from actors.control_plane import ControlPlane
from events.settings import Settings


class Backend(Protocol):
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def close(self) -> None: ...


class LocalBackend:
    """Runs commands on an in-process ControlPlane."""

    def __init__(self, control_plane: ControlPlane) -> None:
        self.control_plane = control_plane

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        node_method = getattr(self, f"_node_{method}", None)
        if node_method is not None:  # the cluster-wide questions, answered for this node
            return await asyncio.to_thread(node_method, *args, **kwargs)
        return getattr(self.control_plane, method)(*args, **kwargs)

    def _local_node(self) -> Any:
        from engines.node import Node

        cp = self.control_plane
        return Node.local(cp.settings, node_id=cp.source_node_id)

    def _node_check_ready(self, engine_registry_id: int) -> dict[str, Any]:
        from actors.node_install import aggregate_ready, check_ready_on

        engine = self.control_plane.get_engine(engine_registry_id)
        return aggregate_ready(engine, [check_ready_on(self._local_node(), engine)])

    def _node_is_supported(self, engine_registry_id: int) -> dict[str, Any]:
        from actors.node_install import support_by_node

        cp = self.control_plane
        return support_by_node(cp.get_engine(engine_registry_id), cp.list_nodes())

    def _node_sync_runtime(self) -> dict[str, Any]:
        """In-process there are no agents: this process plays its own node when that node
        has joined, running each due install to the end before returning."""
        from actors.node_install import run_install

        cp = self.control_plane
        node_id = cp.source_node_id
        if not any(n["node_id"] == node_id and n["alive"] for n in cp.list_nodes()):
            return {"nodes": []}
        node = self._local_node()
        desired = cp.desired_installs(node_id)
        for item in desired:
            run_install(item, node, lambda method, *a: getattr(cp, method)(*a))
        return {"nodes": [{"node_id": node_id,
                           "started": [d["engine_registry_id"] for d in desired],
                           "running": []}]}

    async def close(self) -> None:
        self.control_plane.close()


class EngineRegistry:
    """Configured engine rows. Configuration only: lifecycle belongs to ``sdk.engines``."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def create(self, provider: str, name: str, config: dict[str, Any] | None = None,
                     requested_by: dict[str, Any] | None = None,
                     organization_id: int | str | None = None) -> dict[str, Any]:
        """Create a row; returns it (with its integer ``id``). Refuses unknown providers,
        duplicate names and malformed config."""
        return await self._b.call("create_engine", provider, name, config,
                                  requested_by=requested_by, organization_id=organization_id)

    async def get(self, id: int) -> dict[str, Any]:
        return await self._b.call("get_engine", id)

    async def list(self, provider: str | None = None,
                   organization_id: int | str | None = None) -> list[dict[str, Any]]:
        return await self._b.call("list_engines", provider, organization_id)

    async def update(self, id: int, /, requested_by: dict[str, Any] | None = None,
                     **fields: Any) -> dict[str, Any]:
        """Change ``name`` and/or ``config``. Lifecycle fields (``status``, ``supported``…)
        are refused with an error naming the method to use instead."""
        return await self._b.call("update_engine", id, fields, requested_by=requested_by)

    async def delete(self, id: int,
                     requested_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._b.call("delete_engine", id, requested_by=requested_by)


class ModelRegistry:
    """Registered models. Registration records events and downloads nothing."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def create(self, name: str, source: dict[str, Any], display_name: str | None = None,
                     format: str = "gguf", engine_kinds: list[str] | None = None,
                     requested_by: dict[str, Any] | None = None,
                     keep_alive_s: int | None = None) -> dict[str, Any]:
        """Register a model; ``keep_alive_s`` is how long a loaded runtime may idle (None =
        the default, 0 = unload after each request, -1 = never)."""
        return await self._b.call("create_model", name, display_name, source, format,
                                  engine_kinds, requested_by=requested_by,
                                  keep_alive_s=keep_alive_s)

    async def get(self, id: int) -> dict[str, Any]:
        return await self._b.call("get_model", id)

    async def list(self) -> list[dict[str, Any]]:
        return await self._b.call("list_models")

    async def update(self, id: int, /, requested_by: dict[str, Any] | None = None,
                     **fields: Any) -> dict[str, Any]:
        return await self._b.call("update_model", id, fields, requested_by=requested_by)

    async def delete(self, id: int,
                     requested_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._b.call("delete_model", id, requested_by=requested_by)


class Models:
    def __init__(self, backend: Backend) -> None:
        self.engine_registry = EngineRegistry(backend)
        self.model_registry = ModelRegistry(backend)


class Engines:
    """Engine lifecycle: installs, readiness, activation."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def begin_install(self, engine_registry_id: int, force: bool = False,
                            requested_by: dict[str, Any] | None = None,
                            task_id: str | None = None) -> dict[str, Any]:
        """Publish an install request for a row.

        Returns ``{engine_registry_id, provider, event, status}``."""
        return await self._b.call("begin_install", engine_registry_id, force=force,
                                  requested_by=requested_by, task_id=task_id)

    async def request_install(self, engine_id: str, force: bool = False,
                              requested_by: dict[str, Any] | None = None,
                              task_id: str | None = None) -> dict[str, Any]:
        """Provider-level install request → the ``engine.install.requested`` event payload."""
        return await self._b.call("request_install", engine_id, force=force,
                                  requested_by=requested_by, task_id=task_id)

    async def install_status(self, engine_registry_id: int) -> dict[str, Any]:
        return await self._b.call("install_status", engine_registry_id)

    async def activation_requirements(self, engine_registry_id: int) -> dict[str, Any]:
        return await self._b.call("activation_requirements", engine_registry_id)

    async def activate_instance(self, engine_registry_id: int,
                                requested_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._b.call("activate_instance", engine_registry_id,
                                  requested_by=requested_by)

    async def deactivate_instance(self, engine_registry_id: int,
                                  requested_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._b.call("deactivate_instance", engine_registry_id,
                                  requested_by=requested_by)

    async def check_runtime_config(self, engine_id: str,
                                   config: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._b.call("check_runtime_config", engine_id, config)

    async def provider_requirements(self, engine_id: str) -> dict[str, Any]:
        return await self._b.call("provider_requirements", engine_id)

    async def list_providers(self) -> list[dict[str, Any]]:
        return await self._b.call("list_providers")

    async def evaluate_model_resources(self, model_registry_id: int, context_length: int,
                                       runtime_overrides: dict[str, Any] | None = None
                                       ) -> dict[str, Any]:
        """``{weights_bytes, kv_cache_bytes, compute_bytes, vram_bytes, ram_bytes, nodes}``
        for a registered model at ``context_length``; ``nodes`` says where it fits."""
        return await self._b.call("evaluate_model_resources", model_registry_id,
                                  context_length, runtime_overrides)

    async def resolve_model(self, model_reference: str | int) -> dict[str, Any]:
        """Resolved metadata of a model (registered name/id, path or ref), without loading."""
        return await self._b.call("resolve_model", model_reference)

    async def plan_runtime(self, model_registry_id: int, **config: Any) -> dict[str, Any]:
        """The runtime plan (engine, node, device, GPU layers, context, KV type, fallback)
        for a registered model, without loading it; refused when nothing truthful fits."""
        return await self._b.call("plan_runtime", model_registry_id, **config)

    async def check_ready(self, engine_registry_id: int) -> dict[str, Any]:
        """Readiness of a row on every node, found by looking at each node's installed
        engine: ``{engine_registry_id, engine_id, ready, nodes: [{node_id, ready,
        missing_shared, missing_local, engine_version}]}``; ready when every node is."""
        return await self._b.call("check_ready", engine_registry_id)

    async def is_supported(self, engine_registry_id: int) -> dict[str, Any]:
        """Whether each alive node can run the row's provider, from the facts it reported:
        ``{engine_registry_id, engine_id, supported, nodes: [{node_id, supported, reason}]}``."""
        return await self._b.call("is_supported", engine_registry_id)

    async def sync_runtime(self) -> dict[str, Any]:
        """Make every node reconcile now (start the installs that are due; never loads a
        model): ``{nodes: [{node_id, started, running}]}``."""
        return await self._b.call("sync_runtime")


class Media:
    """The shared artifact store: weights and engine assets, fetched once, verified, shared."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def add_model_from_source(self, name: str, source: dict[str, Any],
                                    progress: Any = None, display_name: str | None = None,
                                    format: str | None = None,
                                    engine_kinds: list[str] | None = None,
                                    requested_by: dict[str, Any] | None = None,
                                    task_id: str | None = None) -> str:
        """Store a ``huggingface`` / ``local`` / ``url`` source and return its storage ref.

        ``progress(filename, bytes_downloaded, total_bytes_or_None, file_index)`` is
        called as it downloads. The artifact (every file's sha256 and size) is recorded
        on the model registered under ``name``, registering one if there is none.
        """
        return await self._b.call("add_model_from_source", name, source, progress,
                                  display_name, format, engine_kinds,
                                  requested_by=requested_by, task_id=task_id)


class Nodes:
    """The cluster's nodes, and the reports node agents make (tests play nodes with these)."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def list(self) -> list[dict[str, Any]]:
        return await self._b.call("list_nodes")

    async def joined(self, node_id: str, facts: dict[str, Any] | None = None) -> bool:
        return await self._b.call("record_node_joined", node_id, facts)

    async def lost(self, node_id: str, reason: str = "node died") -> bool:
        return await self._b.call("record_node_lost", node_id, reason)

    async def install_started(self, engine_registry_id: int, node_id: str,
                              request_event_id: str, plan: dict[str, Any] | None = None) -> None:
        await self._b.call("record_install_started", engine_registry_id, node_id,
                           request_event_id, plan)

    async def install_progress(self, engine_registry_id: int, node_id: str,
                               request_event_id: str, fraction: float, message: str = "") -> None:
        await self._b.call("record_install_progress", engine_registry_id, node_id,
                           request_event_id, fraction, message)

    async def install_succeeded(self, engine_registry_id: int, node_id: str,
                                request_event_id: str, engine_version: str,
                                record: dict[str, Any] | None = None) -> None:
        await self._b.call("record_install_succeeded", engine_registry_id, node_id,
                           request_event_id, engine_version, record)

    async def install_failed(self, engine_registry_id: int, node_id: str,
                             request_event_id: str, error: str) -> None:
        await self._b.call("record_install_failed", engine_registry_id, node_id,
                           request_event_id, error)


class Audit:
    """The event log, for audit, and proof that the views match it."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def events(self, engine_registry_id: int | None = None,
                     model_registry_id: int | None = None, user_id: int | str | None = None,
                     organization_id: int | str | None = None, node_id: str | None = None,
                     event_name: str | None = None, since: str | None = None,
                     until: str | None = None, after_position: int = 0,
                     limit: int = 1000) -> list[dict[str, Any]]:
        return await self._b.call(
            "audit_events", engine_registry_id, model_registry_id, user_id, organization_id,
            node_id, event_name, since, until, after_position, limit,
        )

    async def verify(self) -> dict[str, Any]:
        """Rebuild the views from the log in a scratch database and diff them with the live
        ones → ``{events, tables, differences}``."""
        return await self._b.call("verify")

    async def rebuild(self) -> int:
        return await self._b.call("rebuild")


class SDK:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.models = Models(backend)
        self.engines = Engines(backend)
        self.nodes = Nodes(backend)
        self.media = Media(backend)
        self.audit = Audit(backend)

    async def close(self) -> None:
        await self._backend.close()

    async def __aenter__(self) -> SDK:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_local(home: str | Path | None = None, settings: Settings | None = None,
               node_id: str | None = None) -> SDK:
    """The SDK on an in-process control plane (no Ray): embedded SQLite in ``home``
    (default ``ROUNDHOUSE_HOME``), or PostgreSQL when the settings name one."""
    if settings is None:
        settings = Settings.from_env()
        if home is not None:
            settings = settings.model_copy(update={"home": Path(home)})
    elif home is not None:
        settings = settings.model_copy(update={"home": Path(home)})
    return SDK(LocalBackend(ControlPlane(settings, node_id=node_id)))


def run(coro: Any) -> Any:
    """Run an SDK coroutine from synchronous code."""
    return asyncio.run(coro)
