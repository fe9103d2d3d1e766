"""Model runtimes as Ray Serve applications: ``runtime-<engine>-<model>``, one replica pinned
to the chosen node (label selector ``ray.io/node-id``; GPUs requested through Serve), owning
one supervised engine process (``actors.runtime.EngineRuntime``).

Requests do not pass through the replica: the gateway sends them to the engine URL the
replica reports, so a runtime adds no hop to the hot path. The replica is the process
owner: Serve keeps it alive, its health check fails once the supervisor gave up, and
deleting the application stops the engine process group. The replica records its
supervisor's restarts (new pid) and giving up (unloaded, reason ``crashed``) with the
control plane; the gateway's watch then removes a crashed application.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from actors.handles import control_plane_handle
from actors.node_agent import agent_settings
from actors.runtime import (
    EngineRuntime,
    RuntimeManagerBase,
    RuntimeSpec,
    app_name,
    record_supervisor_report,
)
from actors.runtime_types import LoadFailed, RuntimeDead
from cluster.ray_backend import RayBackend
from engines.node import Node
from engines.supervisor import EngineState

RUNTIME_PREFIX = "runtime-"


@serve.deployment(num_replicas=1, max_ongoing_requests=64, health_check_period_s=2,
                  graceful_shutdown_timeout_s=30)
class ModelRuntimeDeployment:
    """One replica = one engine process for one (engine instance, model)."""

    async def __init__(self, spec: RuntimeSpec) -> None:  # type: ignore[misc]
        settings = agent_settings(spec.node_id) if spec.node_id else None
        node = Node.local(settings, node_id=spec.node_id or None)
        backend = RayBackend(control_plane_handle())

        async def report(kind: str, spec: RuntimeSpec, pid: int | None) -> None:
            await record_supervisor_report(backend, kind, spec, pid)

        self.runtime = EngineRuntime(spec, node, reporter=report)
        try:
            await self.runtime.start()
        except BaseException:
            await self.runtime.stop()
            raise

    def info(self) -> dict[str, Any]:
        """``{url, pid, node_id, engine_model, model_path, memory_bytes, app_name, state}``."""
        return self.runtime.info()

    async def wait_ready(self) -> dict[str, Any]:
        """Wait for the supervisor's restart after a crash; RuntimeDead if it gave up."""
        return await self.runtime.wait_ready()

    def check_health(self) -> None:
        sup = self.runtime.supervisor
        if sup is None or sup.state is EngineState.FAILED:
            raise RuntimeError("the engine process is gone and its supervisor gave up")

    async def __del__(self) -> None:
        await self.runtime.stop()


class ServeRuntimeManager(RuntimeManagerBase):
    """Places runtimes on any node of the Ray cluster as pinned Serve applications."""

    async def start_runtime(self, spec: RuntimeSpec) -> dict[str, Any]:
        actor_options: dict[str, Any] = {
            "num_cpus": 0,
            "num_gpus": len(spec.gpu_indices),
            "label_selector": {"ray.io/node-id": spec.node_id},
        }
        app = ModelRuntimeDeployment.options(  # type: ignore[attr-defined]
            ray_actor_options=actor_options).bind(spec)
        try:
            handle = await asyncio.to_thread(serve.run, app, name=spec.app_name,
                                             route_prefix=None)
        except Exception as exc:
            await asyncio.to_thread(serve.delete, spec.app_name)
            raise LoadFailed(f"the runtime application {spec.app_name} did not start on node "
                             f"{spec.node_id}: {exc}") from exc
        return dict(await handle.info.remote())

    async def stop_runtime(self, engine_registry_id: int, model_registry_id: int) -> None:
        await asyncio.to_thread(serve.delete, app_name(engine_registry_id, model_registry_id))

    async def runtime_ready(self, engine_registry_id: int,
                            model_registry_id: int) -> dict[str, Any]:
        try:
            handle = serve.get_app_handle(app_name(engine_registry_id, model_registry_id))
            return dict(await handle.wait_ready.remote())
        except RuntimeDead:
            raise
        except Exception as exc:
            raise RuntimeDead(f"the runtime is gone ({type(exc).__name__}); the next request "
                              "loads it again") from exc

    async def running_apps(self) -> set[str] | None:
        status = await asyncio.to_thread(serve.status)
        return {name for name in status.applications if name.startswith(RUNTIME_PREFIX)}
