"""The serving half of the SDK: ``sdk.ai`` and the runtime methods of ``sdk.engines``
(``list_loaded_models``, ``unload_loaded_model``, ``stop_engine``, ``list_active_jobs``,
``sync_runtime`` of runtimes), shaped as the module SDK describes.

They talk to a ``Serving`` port: ``LocalServing(serving)`` in-process, or
``cluster.serve_gateway.GatewayServing()`` (the gateway replica on Ray).
``attach_serving(sdk, port)`` adds them to an SDK object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cluster.orchestrator_service import Serving


class ServingPort(Protocol):
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


class LocalServing:
    """A ``ServingPort`` over an in-process ``Serving``."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.serving, method)(*args, **kwargs)


@dataclass(frozen=True)
class ProviderHandle:
    """A lazily loaded provider: the model it serves; nothing is loaded by creating one."""

    model_registry_id: int
    model: str
    engine_kinds: tuple[str, ...]


class AI:
    """``sdk.ai``: provider handles by model, and warmup."""

    def __init__(self, backend: Any, serving: ServingPort) -> None:
        self._b = backend
        self._s = serving

    async def get_provider_by_model_registry_id(self, model_registry_id: int) -> ProviderHandle:
        """The provider handle of a registered model, without loading it."""
        row = await self._b.call("get_model", model_registry_id)
        return ProviderHandle(model_registry_id=int(row["id"]), model=str(row["name"]),
                              engine_kinds=tuple(row.get("engine_kinds") or ()))

    async def warmup_provider(self, provider: ProviderHandle, wait: bool = True
                              ) -> dict[str, Any]:
        """Load the provider's model now; ``wait=False`` returns while it loads."""
        return dict(await self._s.call("warmup", provider.model, wait=wait))


class RuntimeEngines:
    """The runtime methods of ``sdk.engines``."""

    def __init__(self, serving: ServingPort) -> None:
        self._s = serving

    async def list_loaded_models(self, engine_registry_id: int | None = None
                                 ) -> list[dict[str, Any]]:
        return list(await self._s.call("list_loaded_models", engine_registry_id))

    async def unload_loaded_model(self, engine_registry_id: int, model_registry_id: int,
                                  requested_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(await self._s.call("unload_loaded_model", engine_registry_id,
                                       model_registry_id, requested_by))

    async def stop_engine(self, engine_registry_id: int,
                          requested_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(await self._s.call("stop_engine", engine_registry_id, requested_by))

    async def list_active_jobs(self) -> list[dict[str, Any]]:
        return list(await self._s.call("list_active_jobs"))

    async def sync_runtime(self) -> dict[str, Any]:
        return dict(await self._s.call("sync_runtime"))


def attach_serving(sdk: Any, serving: ServingPort) -> Any:
    """Give ``sdk`` an ``ai`` namespace and the runtime methods on ``sdk.engines``.

    ``sdk.engines.sync_runtime`` then reconciles nodes (control plane) and runtime
    applications (gateway) and returns both under ``nodes`` and ``runtime``.
    """
    sdk.ai = AI(sdk._backend, serving)
    runtime = RuntimeEngines(serving)
    engines = sdk.engines
    node_sync = getattr(engines, "sync_runtime", None)
    for name in ("list_loaded_models", "unload_loaded_model", "stop_engine",
                 "list_active_jobs"):
        setattr(engines, name, getattr(runtime, name))

    async def sync_runtime() -> dict[str, Any]:
        result: dict[str, Any] = dict(await node_sync()) if node_sync else {}
        result["runtime"] = await runtime.sync_runtime()
        return result

    engines.sync_runtime = sync_runtime
    return sdk
