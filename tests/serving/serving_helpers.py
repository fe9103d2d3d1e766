"""Helpers for the serving tests: a control plane with an active engine and a registered
model, the fake engine as a PreparedEngine, and a gateway served by uvicorn on a free port."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from actors.runtime import ProcessRuntimeManager, RuntimeSpec
from cluster.client import SDK, open_local
from cluster.gateway import build_app
from cluster.gateway_auth import GatewayAuth, Principal
from cluster.orchestrator_service import Serving, orchestrator_from_settings
from engines.base import NodeFacts
from engines.launch import ModelRef, PreparedEngine
from engines.node import Node
from engines.sandbox import sanitized_env
from engines.supervisor import RestartPolicy
from events.settings import Settings

FAKE_ENGINE = Path(__file__).with_name("fake_openai_engine.py")
ADMIN_TOKEN = "test-admin-token"
OTHER_ORG_TOKEN = "test-other-org-token"
WHO = {"user_id": 42, "organization_id": 7}


def fake_preparer(tokens: int = 5, token_delay: float = 0.0
                  ) -> Callable[[RuntimeSpec, Node, int], PreparedEngine]:
    def prepare(spec: RuntimeSpec, node: Node, port: int) -> PreparedEngine:
        return PreparedEngine(
            engine="fake", bin=sys.executable,
            args=[str(FAKE_ENGINE), "--port", str(port), "--model", spec.model_name,
                  "--tokens", str(tokens), "--token-delay", str(token_delay)],
            env=sanitized_env(), port=port, workdir=str(node.runtime_dir),
            provisioning_mode="binary", engine_version="fake",
            model=ModelRef(id=spec.model_name, path=Path(spec.model_path)),
        )
    return prepare


@dataclass
class Stack:
    sdk: SDK
    serving: Serving
    manager: ProcessRuntimeManager
    engine_id: int
    model_id: int
    node: Node
    url: str = ""


async def control_with_model(settings: Settings, node_id: str, model_path: Path,
                             record: dict[str, Any] | None = None,
                             model_name: str = "smollm2") -> tuple[SDK, int, int]:
    """A control plane where ``node_id`` has llama.cpp installed and active and
    ``model_name`` is registered from ``model_path``."""
    sdk = open_local(settings=settings, node_id=node_id)
    await sdk.nodes.joined(node_id, {"cpu_count": 2, "memory_bytes": 24 * 1024**3})
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    await sdk.nodes.install_started(row["id"], node_id, event_id)
    await sdk.nodes.install_succeeded(row["id"], node_id, event_id, "test", record)
    activated = await sdk.engines.activate_instance(row["id"], requested_by=WHO)
    assert activated["status"] == "active", activated
    model = await sdk.models.model_registry.create(
        name=model_name, source={"type": "local", "path": str(model_path)})
    return sdk, int(row["id"]), int(model["id"])


def gateway_auth() -> GatewayAuth:
    return GatewayAuth(admin_tokens={
        ADMIN_TOKEN: Principal(user_id=1, organization_id="acme"),
        OTHER_ORG_TOKEN: Principal(user_id=2, organization_id="globex")},
        organization_id="acme")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free local port in this event loop; yield its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def gateway_stack(tmp: Path, *, model_path: Path, node: Node | None = None,
                        record: dict[str, Any] | None = None, prepare: Any = None,
                        watch_interval_s: float = 0.0, **orch: Any) -> AsyncIterator[Stack]:
    """A full in-process gateway: control plane, process runtime manager, orchestrator
    (its runtime watch off unless ``watch_interval_s`` is given)."""
    settings = Settings(home=tmp / "home")
    node = node or Node(facts=NodeFacts(node_id="node-a", cpu_count=2),
                        settings=Settings.from_env({}, engine_root=str(tmp / "engines")))
    sdk, eid, mid = await control_with_model(settings, node.facts.node_id, model_path, record)
    manager = ProcessRuntimeManager(
        sdk._backend, node, prepare=prepare,
        restart=RestartPolicy(initial_backoff_s=0.1, max_restarts=3),
        ready_timeout_s=120)
    orch.setdefault("sweep_interval_s", 0.05)
    serving = Serving(manager, orchestrator_from_settings(manager, settings, **orch),
                      watch_interval_s=watch_interval_s)
    app = build_app(serving, gateway_auth())
    stack = Stack(sdk=sdk, serving=serving, manager=manager, engine_id=eid, model_id=mid,
                  node=node)
    try:
        async with served(app) as url:
            stack.url = url
            yield stack
    finally:
        await serving.close("stop_engine")
        await manager.close()
        await sdk.close()


async def wait_for(probe: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 60.0,
                   interval_s: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"
