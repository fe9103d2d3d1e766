"""The serving service: the orchestrator, its runtime manager and the control plane behind
the SDK's runtime methods (``list_loaded_models``, ``unload_loaded_model``,
``stop_engine``, ``list_active_jobs``, ``sync_runtime``, warmup).

One ``Serving`` lives in the gateway (in-process for tests and the one-process mode,
inside the gateway's Serve replica on Ray); the HTTP routes and the Ray handle calls
both go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from actors.errors import NotFound
from actors.runtime import DEFAULT_CONTEXT, RuntimeManagerBase, app_name
from cluster.orchestrator import Orchestrator, Target
from events.settings import Settings

log = logging.getLogger("roundhouse.serving")


def orchestrator_from_settings(manager: RuntimeManagerBase, settings: Settings,
                               **overrides: Any) -> Orchestrator:
    """An Orchestrator with the queue, keep-alive and drain settings of ``settings``."""
    kwargs: dict[str, Any] = {
        "max_running": settings.gateway_max_running, "max_queue": settings.gateway_max_queue,
        "default_keep_alive_s": settings.keep_alive_s,
        "drain_timeout_s": settings.drain_timeout_s,
        "retry_after_s": settings.gateway_retry_after_s,
    }
    kwargs.update(overrides)
    return Orchestrator(manager, **kwargs)


class Serving:
    """Runtime administration on top of one orchestrator; every method is a coroutine."""

    def __init__(self, manager: RuntimeManagerBase, orchestrator: Orchestrator, *,
                 watch_interval_s: float = 2.0) -> None:
        self.manager = manager
        self.backend = manager.backend
        self.orchestrator = orchestrator
        self.watch_interval_s = watch_interval_s
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the orchestrator's idle sweeper and the runtime watch (``watch_once`` every
        ``watch_interval_s``; 0 turns the watch off). Idempotent."""
        self.orchestrator.start()
        if self.watch_interval_s > 0 and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch_forever())
            self.orchestrator._spawn(self._warm_estimates())

    async def _warm_estimates(self) -> None:
        """Read every registered model's metadata once, off the request path: the first
        memory estimate of a GGUF parses its whole tokenizer (seconds), later ones hit
        the control plane's cache, so a cold load does not pay it."""
        with contextlib.suppress(Exception):
            for model in await self.backend.call("list_models"):
                kinds = [k for k in model.get("engine_kinds") or [] if k in ("llamacpp",
                                                                              "vllm")]
                if kinds:
                    with contextlib.suppress(Exception):
                        await self.backend.call("evaluate_model_resources", model["id"],
                                                DEFAULT_CONTEXT, None, provider=kinds[0])

    async def close(self, unload_reason: str | None = "stop_engine") -> None:
        """Stop the watch and the sweeper; unload every runtime (recorded with
        ``unload_reason``)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.orchestrator.close(unload_reason)

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval_s)
            try:
                await self.watch_once()
            except Exception:
                log.exception("runtime watch failed; retrying")

    async def watch_once(self) -> dict[str, list[str]]:
        """Follow what happened to runtimes outside this gateway; never loads anything.

        - runtimes on a node the control plane recorded as lost are unloaded with
          reason ``node_lost`` (held ones through the orchestrator, so waiting jobs
          reload elsewhere; others straight from the view);
        - held runtimes the view no longer lists (their supervisor gave up and the
          runtime recorded ``crashed``) are dropped and their applications deleted.

        Returns ``{node_lost, crashed}`` (application names).
        """
        nodes = await self.backend.call("list_nodes")
        lost = {n["node_id"] for n in nodes if not n.get("alive", True)}
        rows = await self.backend.call("list_loaded_models")
        listed = {(int(r["engine_row_id"]), int(r["model_registry_id"])): r for r in rows}
        usage = self.orchestrator.usage()
        node_lost: list[str] = []
        crashed: list[str] = []
        for key, use in usage.items():
            row = listed.get(key)
            held_node = self.orchestrator.runtime_node(*key)
            if held_node is not None and held_node in lost:
                await self.orchestrator.unload(*key, reason="node_lost")
                node_lost.append(app_name(*key))
            elif row is None and use.get("loaded"):
                await self.orchestrator.unload(*key, reason="crashed")
                crashed.append(app_name(*key))
        for key, row in listed.items():
            if row["node_id"] in lost and key not in usage \
                    and await self._stop_unowned(row, "node_lost", None):
                node_lost.append(app_name(*key))
        return {"node_lost": node_lost, "crashed": crashed}

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Control-plane passthrough (the admin API's registry routes)."""
        return await self.backend.call(method, *args, **kwargs)

    async def list_loaded_models(self, engine_registry_id: int | None = None
                                 ) -> list[dict[str, Any]]:
        """The loaded-model rows of the control plane plus ``last_used_at``/``expires_at``."""
        rows = await self.backend.call("list_loaded_models", engine_registry_id)
        usage = self.orchestrator.usage()
        for row in rows:
            use = usage.get((int(row["engine_row_id"]), int(row["model_registry_id"])), {})
            row["last_used_at"] = use.get("last_used_at")
            row["expires_at"] = use.get("expires_at")
        return list(rows)

    async def _stop_unowned(self, row: Mapping[str, Any], reason: str,
                            requested_by: Mapping[str, Any] | None) -> bool:
        """Unload a runtime the view lists but this orchestrator does not hold."""
        eid, mid = int(row["engine_row_id"]), int(row["model_registry_id"])
        with contextlib.suppress(Exception):
            await self.manager.stop_runtime(eid, mid)
        try:
            return bool(await self.backend.call("record_unloaded", eid, mid, row["node_id"],
                                                reason, requested_by=requested_by))
        except NotFound:
            return False

    async def unload_loaded_model(self, engine_registry_id: int, model_registry_id: int,
                                  requested_by: Mapping[str, Any] | None = None
                                  ) -> dict[str, Any]:
        """Unload one runtime (running requests finish first) → ``{status, unloaded}``.
        The engine and model rows stay active; a later request loads the model again."""
        eid, mid = int(engine_registry_id), int(model_registry_id)
        who = dict(requested_by or {}) or None
        unloaded = await self.orchestrator.unload(eid, mid, reason="user", requested_by=who)
        if not unloaded:
            for row in await self.backend.call("list_loaded_models", eid):
                if int(row["model_registry_id"]) == mid:
                    unloaded = await self._stop_unowned(row, "user", who) or unloaded
        return {"status": "ok", "unloaded": unloaded}

    async def stop_engine(self, engine_registry_id: int,
                          requested_by: Mapping[str, Any] | None = None,
                          reason: str = "stop_engine") -> dict[str, Any]:
        """Unload every runtime of one engine instance → ``{status, stopped}``; the row stays."""
        eid = int(engine_registry_id)
        who = dict(requested_by or {}) or None
        stopped = await self.orchestrator.unload_engine(eid, reason=reason, requested_by=who)
        for row in await self.backend.call("list_loaded_models", eid):
            stopped = await self._stop_unowned(row, reason, who) or stopped
        self.manager.invalidate()
        return {"status": "ok", "stopped": stopped}

    async def activate_instance(self, engine_registry_id: int,
                                requested_by: Mapping[str, Any] | None = None
                                ) -> dict[str, Any]:
        result = await self.backend.call("activate_instance", engine_registry_id,
                                         requested_by=requested_by)
        self.manager.invalidate()
        return dict(result)

    async def deactivate_instance(self, engine_registry_id: int,
                                  requested_by: Mapping[str, Any] | None = None
                                  ) -> dict[str, Any]:
        """Deactivate the row and unload its runtimes (reason ``deactivated``)."""
        result = await self.backend.call("deactivate_instance", engine_registry_id,
                                         requested_by=requested_by)
        await self.stop_engine(engine_registry_id, requested_by, reason="deactivated")
        return dict(result)

    async def list_active_jobs(self) -> list[dict[str, Any]]:
        return self.orchestrator.list_jobs()

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return {"status": "ok", "cancelled": self.orchestrator.cancel(job_id)}

    async def sync_runtime(self) -> dict[str, Any]:
        """Reconcile runtime applications with the loaded-models view; never loads anything.

        Applications no loaded row names are deleted (orphans); loaded rows whose
        application is gone are recorded unloaded (reason ``crashed``).
        """
        apps = await self.manager.running_apps()
        rows = await self.backend.call("list_loaded_models")
        held = set(self.orchestrator.usage())
        marked: list[str] = []
        wanted: set[str] = set()
        for row in rows:
            name = row.get("app_name") or app_name(int(row["engine_row_id"]),
                                                   int(row["model_registry_id"]))
            key = (int(row["engine_row_id"]), int(row["model_registry_id"]))
            if row.get("status") == "loading" and key in held:
                wanted.add(name)
                continue
            if apps is not None and name not in apps:
                self.orchestrator.forget(*key)
                with contextlib.suppress(NotFound):
                    if await self.backend.call("record_unloaded", key[0], key[1],
                                               row["node_id"], "crashed"):
                        marked.append(name)
                continue
            wanted.add(name)
        removed: list[str] = []
        for name in sorted((apps or set()) - wanted):
            parts = name.split("-")
            with contextlib.suppress(Exception):
                await self.manager.stop_runtime(int(parts[1]), int(parts[2]))
                removed.append(name)
        return {"status": "ok", "removed_apps": removed, "marked_unloaded": marked}

    async def warmup(self, model: str | int, wait: bool = True,
                     requested_by: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Load ``model`` (name or registry id) if it is not loaded; with ``wait`` return once
        it is ready. Returns ``{status, model, engine_registry_id, model_registry_id}``."""
        name = model if isinstance(model, str) else (
            await self.backend.call("get_model", int(model)))["name"]
        job = self.orchestrator.submit(name, stream=False, requested_by=requested_by)

        async def go() -> Target:
            await self.orchestrator.acquire(job)
            self.orchestrator.finish(job, tokens_out=0)
            return await self.manager.resolve(name)

        if not wait:
            task = asyncio.get_running_loop().create_task(go())
            self.orchestrator._background.add(task)
            task.add_done_callback(self.orchestrator._background.discard)
            return {"status": "loading", "model": name, "job_id": job.job_id}
        target = await go()
        return {"status": "loaded", "model": name, "job_id": job.job_id,
                "engine_registry_id": target.engine_registry_id,
                "model_registry_id": target.model_registry_id}
