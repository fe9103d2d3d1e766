"""The gateway as a Ray Serve application (``roundhouse-gateway``): one replica, pinned to the
head node, holding the orchestrator (the job table's single owner), the Serve runtime
manager and the FastAPI app.

The replica serves the FastAPI app with its own uvicorn server on
``ROUNDHOUSE_GATEWAY_HOST:ROUNDHOUSE_GATEWAY_PORT`` rather than behind Serve's HTTP
proxy: a proxy hop measured 18 to 30 ms of extra time-to-first-token here, which alone
breaks the 10 ms budget, while one in-process proxy (this app → engine) costs a few ms.
Serve still owns the replica's life (placement, restart, delete on ``down``), and the
runtime-admin methods are reached through its handle (``GatewayServing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import ray
import uvicorn
from ray import serve

from actors.handles import control_plane_handle
from cluster.gateway import build_app
from cluster.gateway_auth import GatewayAuth
from cluster.orchestrator_service import Serving, orchestrator_from_settings
from cluster.ray_backend import RayBackend
from cluster.serve_runtime import ServeRuntimeManager
from events.settings import Settings

log = logging.getLogger("roundhouse.gateway")

GATEWAY_APP = "roundhouse-gateway"
#: Methods of ``Serving`` that handle callers may run.
SERVING_METHODS = frozenset({
    "list_loaded_models", "unload_loaded_model", "stop_engine", "activate_instance",
    "deactivate_instance", "list_active_jobs", "cancel_job", "sync_runtime", "warmup"})


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, health_check_period_s=5)
class GatewayDeployment:
    """The orchestrator + gateway replica; ``url()`` says where it listens."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        self.settings = Settings.model_validate(settings)
        backend = RayBackend(control_plane_handle())
        self.manager = ServeRuntimeManager(
            backend, placement_strategy=self.settings.placement_strategy,
            ready_timeout_s=self.settings.engine_ready_timeout_s)
        self.serving = Serving(self.manager,
                               orchestrator_from_settings(self.manager, self.settings))
        auth = GatewayAuth.from_settings(self.settings)
        app = build_app(self.serving, auth)
        config = uvicorn.Config(app, host=self.settings.gateway_host,
                                port=self.settings.gateway_port, log_level="warning",
                                lifespan="on", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError(f"the gateway could not listen on "
                                   f"{self.settings.gateway_host}:{self.settings.gateway_port}")
            await asyncio.sleep(0.02)

    def url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    async def serving_call(self, method: str, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        """Run ``Serving.<method>``; only the runtime-admin methods are allowed."""
        if method not in SERVING_METHODS:
            raise ValueError(f"{method!r} is not a serving method")
        return await getattr(self.serving, method)(*args, **kwargs)

    async def shutdown(self, unload_reason: str = "stop_engine") -> None:
        """Unload every runtime (recording why) and stop listening."""
        await self.serving.close(unload_reason)
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)

    def check_health(self) -> None:
        if self.task.done():
            raise RuntimeError("the gateway's HTTP server stopped")


class GatewayServing:
    """A ``Backend``-shaped caller of the gateway replica's runtime-admin methods."""

    def __init__(self, handle: Any | None = None) -> None:
        self.handle = handle or serve.get_app_handle(GATEWAY_APP)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.handle.serving_call.remote(method, args, kwargs)


def gateway_running() -> bool:
    """True when this Ray cluster runs Serve with the ``roundhouse-gateway`` application
    (never starts Serve)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return False
    if client is None:
        return False
    with contextlib.suppress(Exception):
        return GATEWAY_APP in serve.status().applications
    return False


def gateway_url() -> str | None:
    """The URL the running gateway listens on, or None."""
    if not gateway_running():
        return None
    with contextlib.suppress(Exception):
        return str(serve.get_app_handle(GATEWAY_APP).url.remote().result(timeout_s=30))
    return None


def start_gateway(settings: Settings, node_id: str | None = None) -> str:
    """Deploy the gateway on ``node_id`` (default: this driver's node) and return its URL.

    Serve is started without its HTTP proxy (the replica listens itself). Idempotent:
    a running gateway is kept.
    """
    serve.start(proxy_location="Disabled")
    with contextlib.suppress(Exception):
        status = serve.status().applications.get(GATEWAY_APP)
        if status is not None and str(status.status).endswith("RUNNING"):
            return str(serve.get_app_handle(GATEWAY_APP).url.remote().result())
    node = node_id or ray.get_runtime_context().get_node_id()
    app = GatewayDeployment.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0, "label_selector": {"ray.io/node-id": node}},
    ).bind(settings.model_dump(mode="json"))
    handle = serve.run(app, name=GATEWAY_APP, route_prefix=None)
    return str(handle.url.remote().result())


def stop_gateway(unload_reason: str = "stop_engine") -> None:
    """Unload every runtime, then delete the gateway and the runtime applications."""
    with contextlib.suppress(Exception):
        serve.get_app_handle(GATEWAY_APP).shutdown.remote(unload_reason).result(timeout_s=120)  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        for name in list(serve.status().applications):
            if name == GATEWAY_APP or name.startswith("runtime-"):
                serve.delete(name)
