"""A test double of ``RuntimeManager`` that records calls; real-engine tests sit beside it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from cluster.orchestrator import LoadedRuntime, LoadFailed, ModelNotFound, RuntimeDead, Target


class FakeManager:
    """Resolves ``known`` models to engine 1; loads wait on ``gate`` when it is set up."""

    def __init__(self, known: Mapping[str, float | None] | None = None) -> None:
        self.known = dict(known or {"m": None})
        self.loads: list[str] = []
        self.unloads: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.fail_next_load: str | None = None
        self.dead = False
        self.ready_checks = 0
        self.pid = 1000

    async def resolve(self, model: str) -> Target:
        if model not in self.known:
            raise ModelNotFound(f"no model {model!r}")
        return Target(model=model, engine_registry_id=1,
                      model_registry_id=sorted(self.known).index(model) + 1,
                      provider="fake", keep_alive_s=self.known[model])

    async def load(self, target: Target, requested_by: Mapping[str, Any] | None,
                   job_id: str) -> LoadedRuntime:
        self.loads.append(target.model)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.fail_next_load:
            message, self.fail_next_load = self.fail_next_load, None
            raise LoadFailed(message)
        self.pid += 1
        return LoadedRuntime(url="http://fake", node_id="n1", engine_model=target.model,
                             pid=self.pid)

    async def unload(self, target: Target, runtime: LoadedRuntime, reason: str,
                     requested_by: Mapping[str, Any] | None) -> None:
        self.unloads.append((target.model, reason))

    async def wait_ready(self, target: Target, runtime: LoadedRuntime) -> LoadedRuntime:
        self.ready_checks += 1
        if self.dead:
            self.dead = False
            raise RuntimeDead("engine gone")
        return runtime
