"""Model runtimes: one supervised engine process per (engine instance, model), and the
manager that resolves, places, loads and unloads them while recording ``ModelRuntime`` events.

- ``EngineRuntime`` owns one ``engines.supervisor.Supervisor`` on the node it runs on
  (the Serve runtime replica wraps one; tests use it directly).
- ``RuntimeManagerBase`` implements the orchestrator's ``RuntimeManager`` protocol
  on top of a control-plane ``Backend`` (``call(method, *args, **kwargs)``): model
  name → active engine instance → node (``actors.placement``) → start → events.
  Subclasses only say how a runtime is started and stopped: in this process
  (``ProcessRuntimeManager``) or as a pinned Serve application
  (``cluster.serve_runtime.ServeRuntimeManager``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from actors.errors import NotFound, RoundhouseError
from actors.placement import NoPlacement, Placement, choose_node
from actors.runtime_types import (
    LoadedRuntime,
    LoadFailed,
    ModelNotFound,
    NoEngine,
    RuntimeDead,
    Target,
)
from engines.artifacts import ArtifactError, DirectoryArtifactStore, materialize
from engines.launch import ModelRef, PreparedEngine, free_port
from engines.node import Node
from engines.plan import InstallRecord
from engines.registry import get_provider
from engines.resources import ResourceEstimate
from engines.supervisor import EngineState, RestartPolicy, Supervisor, SupervisorEvent

log = logging.getLogger("roundhouse.runtime")

#: Reasons an unload is recorded with.
#: Providers whose runtimes have a memory estimate (remote endpoints use no local memory).
ESTIMATED_PROVIDERS = ("llamacpp", "vllm")
#: Context length estimated when the engine config names none.
DEFAULT_CONTEXT = 2048

UNLOAD_REASONS = ("user", "idle", "stop_engine", "deactivated", "node_lost", "crashed")


class Backend(Protocol):
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def app_name(engine_registry_id: int, model_registry_id: int) -> str:
    """The Serve application name of a runtime: ``runtime-<engine>-<model>``."""
    return f"runtime-{engine_registry_id}-{model_registry_id}"


def artifact_ref(model: Mapping[str, Any]) -> str | None:
    """The stored artifact a registered model loads from, if it has one."""
    artifact = model.get("artifact") or {}
    ref = artifact.get("ref") if isinstance(artifact, Mapping) else None
    return str(ref) if ref else None


def model_file(model: Mapping[str, Any]) -> Path:
    """The file a registered model without a stored artifact loads from: its ``local``
    source's path. Raises LoadFailed saying what to do otherwise."""
    source = model.get("source") or {}
    if isinstance(source, Mapping) and source.get("type") == "local" and source.get("path"):
        return Path(str(source["path"]))
    raise LoadFailed(
        f"model {model.get('name')!r} has no local file yet (source {source.get('type')!r}); "
        "materialize it first with sdk.media.add_model_from_source or register a local path")


def rss_bytes(pid: int | None) -> int:
    """Resident memory of ``pid`` from /proc (0 where unknown)."""
    if pid is None:
        return 0
    with contextlib.suppress(OSError, ValueError, IndexError):  # gone, or no /proc
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything a node needs to start one runtime (picklable, crosses Ray)."""

    engine_registry_id: int
    model_registry_id: int
    provider: str
    model_name: str
    model_path: str
    engine_config: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    node_id: str = ""
    gpu_indices: tuple[int, ...] = ()
    ready_timeout_s: float = 300.0
    #: A stored artifact to materialize in the node's model cache before starting
    #: (``model_path`` is then filled in on the node).
    artifact_ref: str | None = None

    @property
    def app_name(self) -> str:
        return app_name(self.engine_registry_id, self.model_registry_id)


Preparer = Callable[[RuntimeSpec, Node, int], PreparedEngine]
#: ``reporter(kind, spec, pid)`` hears what the supervisor did after the load: ``restarted``
#: (a crashed process came back under ``pid``) or ``gave_up`` (it stays down).
Reporter = Callable[[str, "RuntimeSpec", int | None], Awaitable[None]]


def prepare_with_provider(spec: RuntimeSpec, node: Node, port: int) -> PreparedEngine:
    """The provider's launch description for ``spec`` on ``node`` (the model answers to its
    registered name, so clients' ``model`` fields need no rewriting)."""
    provider = get_provider(spec.provider)
    record = InstallRecord.model_validate(spec.record) if spec.record else None
    path = Path(spec.model_path) if spec.model_path else node_model_path(spec, node)
    ref = ModelRef(id=spec.model_name, path=path)
    return provider.prepare(ref, spec.engine_config or None, node, port=port, record=record)


def node_model_path(spec: RuntimeSpec, node: Node) -> Path:
    """Make ``spec``'s artifact present in this node's model cache (sha256-verified copy or
    link from the shared store, reused when already there) and return the local path."""
    if not spec.artifact_ref:
        raise LoadFailed(f"runtime {spec.app_name} names neither a model path nor an artifact")
    settings = node.settings
    store = DirectoryArtifactStore.from_settings(settings)
    mode = settings.materialize_mode
    if mode not in ("copy", "hardlink", "symlink"):
        raise LoadFailed(f"ROUNDHOUSE_MATERIALIZE_MODE must be copy, hardlink or symlink, "
                         f"got {mode!r}")
    try:
        return materialize(store, spec.artifact_ref, settings.models_path,
                           mode=mode)  # type: ignore[arg-type]
    except ArtifactError as exc:
        raise LoadFailed(f"could not make {spec.artifact_ref} present on node "
                         f"{node.facts.node_id}: {exc}") from None


async def record_supervisor_report(backend: Backend, kind: str, spec: RuntimeSpec,
                                   pid: int | None) -> None:
    """``restarted`` → ``record_runtime_restarted`` (the view shows the new pid);
    ``gave_up`` → ``record_unloaded(..., "crashed")``. A runtime the view no longer
    lists as loaded is left alone."""
    eid, mid = spec.engine_registry_id, spec.model_registry_id
    with contextlib.suppress(NotFound):
        if kind == "restarted" and pid:
            await backend.call("record_runtime_restarted", eid, mid, spec.node_id, int(pid))
        elif kind == "gave_up":
            await backend.call("record_unloaded", eid, mid, spec.node_id, "crashed")


class EngineRuntime:
    """One supervised engine process serving one model on this node.

    ``start()`` returns ``info()`` once the engine answers its readiness check;
    the supervisor restarts a crashed process with back-off on the same port;
    ``wait_ready()`` waits for that and raises RuntimeDead when it gave up;
    ``stop()`` stops the process group (SIGTERM, then SIGKILL). After a successful
    start, ``reporter`` (when given) hears each restart (new pid) and the supervisor
    giving up, on the event loop that ran ``start``; a stop asked for is not reported.
    """

    def __init__(self, spec: RuntimeSpec, node: Node | None = None,
                 prepare: Preparer | None = None,
                 restart: RestartPolicy | None = None,
                 reporter: Reporter | None = None) -> None:
        self.spec = spec
        self.node = node or Node.local(node_id=spec.node_id or None)
        self._prepare = prepare or prepare_with_provider
        self.restart = restart
        self.reporter = reporter
        self.supervisor: Supervisor | None = None
        self.events: list[SupervisorEvent] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._reports: list[concurrent.futures.Future[None]] = []

    def _on_event(self, event: SupervisorEvent) -> None:
        """Runs on the supervisor's thread: log, and hand restarts/give-ups to the reporter."""
        self.events.append(event)
        if event.state in (EngineState.RESTARTING, EngineState.FAILED):
            log.warning("runtime %s: %s (%s)", self.spec.app_name, event.state, event.message)
        kind = None
        if event.state is EngineState.READY and event.restarts > 0:
            kind = "restarted"
        elif event.state is EngineState.FAILED:
            kind = "gave_up"
        if kind is None or not self._started or self.reporter is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._reports.append(asyncio.run_coroutine_threadsafe(
                self._report(kind, event.pid), self._loop))

    async def _report(self, kind: str, pid: int | None) -> None:
        assert self.reporter is not None
        try:
            await self.reporter(kind, self.spec, pid)
        except Exception:
            log.exception("runtime %s: reporting %s failed", self.spec.app_name, kind)

    async def start(self) -> dict[str, Any]:
        if not self.spec.model_path:
            path = await asyncio.to_thread(node_model_path, self.spec, self.node)
            self.spec = dataclasses.replace(self.spec, model_path=str(path))
        port = free_port()
        try:
            prepared = self._prepare(self.spec, self.node, port)
        except Exception as exc:
            raise LoadFailed(f"cannot prepare {self.spec.provider} for {self.spec.model_name}: "
                             f"{exc}") from exc
        runtime_dir = self.node.runtime_dir
        runtime_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(prepared, runtime_dir, name=self.spec.app_name,
                                     ready_timeout_s=self.spec.ready_timeout_s,
                                     restart=self.restart, on_event=self._on_event)
        self._loop = asyncio.get_running_loop()
        try:
            await self.supervisor.astart()
        except Exception as exc:
            raise LoadFailed(f"{self.spec.provider} did not start {self.spec.model_name}: "
                             f"{exc}") from exc
        self._started = True
        return self.info()

    def info(self) -> dict[str, Any]:
        sup = self.supervisor
        pid = sup.pid if sup else None
        return {"url": sup.url if sup else "", "pid": pid, "node_id": self.node.facts.node_id,
                "engine_model": self.spec.model_name, "model_path": self.spec.model_path,
                "memory_bytes": rss_bytes(pid), "app_name": self.spec.app_name,
                "state": sup.state.value if sup else "idle"}

    async def wait_ready(self, timeout_s: float | None = None) -> dict[str, Any]:
        sup = self.supervisor
        deadline = time.monotonic() + (timeout_s or self.spec.ready_timeout_s)
        while True:
            if sup is None or sup.state in (EngineState.FAILED, EngineState.STOPPED,
                                            EngineState.STOPPING):
                raise RuntimeDead(f"the {self.spec.provider} process of {self.spec.model_name} "
                                  "is gone and its supervisor gave up; the next request "
                                  "loads it again")
            # READY alone is not enough right after a crash: the dying process closes its
            # socket a moment before the supervisor can see it exit.
            if sup.state is EngineState.READY and sup.pid is not None and \
                    await asyncio.to_thread(_accepts_connections, sup.url):
                return self.info()
            if time.monotonic() > deadline:
                raise RuntimeDead(f"{self.spec.model_name} did not become ready again in time")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._started = False  # an asked-for stop is not a crash
        if self.supervisor is not None:
            await self.supervisor.astop()


def _accepts_connections(url: str) -> bool:
    """Whether something listens at ``url``'s host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80),
                                      timeout=1.0):
            return True
    except OSError:
        return False


def loaded_from_info(info: Mapping[str, Any]) -> LoadedRuntime:
    return LoadedRuntime(url=str(info["url"]), node_id=str(info["node_id"]),
                         engine_model=str(info["engine_model"]), pid=info.get("pid"),
                         app_name=str(info.get("app_name", "")))


class RuntimeManagerBase(ABC):
    """Resolution, placement and event recording shared by every way of starting runtimes."""

    def __init__(self, backend: Backend, *, placement_strategy: str = "spread",
                 ready_timeout_s: float = 300.0, resolve_ttl_s: float = 2.0,
                 default_keep_alive_s: float | None = None) -> None:
        self.backend = backend
        self.placement_strategy = placement_strategy
        self.ready_timeout_s = ready_timeout_s
        self.resolve_ttl_s = resolve_ttl_s
        self.default_keep_alive_s = default_keep_alive_s
        self._resolved: dict[str, tuple[float, Target, dict[str, Any]]] = {}

    def invalidate(self) -> None:
        """Forget cached name resolutions (after activation changes)."""
        self._resolved.clear()

    async def resolve(self, model: str) -> Target:
        hit = self._resolved.get(model)
        if hit is not None and time.monotonic() - hit[0] < self.resolve_ttl_s:
            return hit[1]
        try:
            row = await self.backend.call("find_model", model)
        except NotFound:
            raise ModelNotFound(f"the model {model!r} does not exist; list models with "
                                "GET /v1/models or register it with "
                                "sdk.models.model_registry.create") from None
        kinds = list(row.get("engine_kinds") or [])
        engines = [e for e in await self.backend.call("list_engines")
                   if e.get("status") == "active" and e.get("provider") in kinds]
        if not engines:
            raise NoEngine(f"no active engine instance can serve {model!r} (it needs one of "
                           f"{', '.join(kinds)}); activate one with "
                           "sdk.engines.activate_instance")
        engine = min(engines, key=lambda e: int(e["id"]))
        ka = row.get("keep_alive_s")
        if ka is None:
            ka = self.default_keep_alive_s
        target = Target(model=model, engine_registry_id=int(engine["id"]),
                        model_registry_id=int(row["id"]), provider=str(engine["provider"]),
                        keep_alive_s=None if ka is None else float(ka))
        self._resolved[model] = (time.monotonic(), target,
                                 {"model": row, "engine": engine})
        return target

    async def _context(self, target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
        hit = self._resolved.get(target.model)
        if hit is not None and hit[1] == target:
            return hit[2]["model"], hit[2]["engine"]
        model = await self.backend.call("get_model", target.model_registry_id)
        engine = await self.backend.call("get_engine", target.engine_registry_id)
        return model, engine

    async def estimate(self, target: Target, engine: Mapping[str, Any]
                       ) -> ResourceEstimate | None:
        """The model's memory estimate on this engine at the engine's context size (its
        config doubles as the estimate's overrides: ``n_gpu_layers``, ``max_model_len``…);
        None where no estimate can be made (a remote engine, a file that is not GGUF)."""
        if target.provider not in ESTIMATED_PROVIDERS:
            return None
        config = dict(engine.get("config") or {})
        context = config.get("ctx_size") or config.get("max_model_len") or DEFAULT_CONTEXT
        try:
            payload = await self.backend.call("evaluate_model_resources",
                                              target.model_registry_id, int(context), config,
                                              provider=target.provider)
        except RoundhouseError as exc:
            log.warning("no memory estimate for %s on %s: %s", target.model, target.provider,
                        exc)
            return None
        known = {f.name for f in dataclasses.fields(ResourceEstimate)}
        return ResourceEstimate(**{k: v for k, v in payload.items() if k in known})

    async def place(self, target: Target, engine: Mapping[str, Any]) -> Placement:
        """The node for ``target`` among those with the engine installed that fit the model's
        memory estimate (``actors.placement.choose_node``); LoadFailed saying why when none
        does."""
        rows = await self.backend.call("installed_nodes", target.engine_registry_id)
        estimate = await self.estimate(target, engine) if rows else None
        try:
            return choose_node(rows, estimate, self.placement_strategy,
                               engine_label=f"engine instance {engine.get('name')!r}")
        except NoPlacement as exc:
            raise LoadFailed(f"cannot place {target.model}: {exc}") from None

    async def load(self, target: Target, requested_by: Mapping[str, Any] | None,
                   job_id: str) -> LoadedRuntime:
        model, engine = await self._context(target)
        ref = artifact_ref(model)
        path = "" if ref else str(model_file(model))
        placement = await self.place(target, engine)
        node_id = placement.node_id
        eid, mid = target.key
        await self.backend.call("record_load_requested", eid, mid, node_id,
                                requested_by=dict(requested_by or {}) or None, task_id=job_id)
        spec = RuntimeSpec(engine_registry_id=eid, model_registry_id=mid,
                           provider=target.provider, model_name=target.model,
                           model_path=path, artifact_ref=ref,
                           engine_config=dict(engine.get("config") or {}),
                           record=placement.record or None, node_id=node_id,
                           gpu_indices=placement.gpu_indices,
                           ready_timeout_s=self.ready_timeout_s)
        try:
            info = await self.start_runtime(spec)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            with contextlib.suppress(Exception):
                await self.backend.call("record_load_failed", eid, mid, node_id, error)
            if isinstance(exc, LoadFailed):
                raise
            raise LoadFailed(f"loading {target.model} on {node_id} failed: {error}") from exc
        await self.backend.call("record_loaded", eid, mid, node_id, int(info["pid"] or 0),
                                str(info.get("model_path") or path),
                                int(info.get("memory_bytes") or 0), str(info["url"]),
                                spec.app_name)
        return loaded_from_info(info)

    async def unload(self, target: Target, runtime: LoadedRuntime, reason: str,
                     requested_by: Mapping[str, Any] | None) -> None:
        try:
            await self.stop_runtime(target.engine_registry_id, target.model_registry_id)
        finally:
            with contextlib.suppress(NotFound):
                await self.backend.call("record_unloaded", target.engine_registry_id,
                                        target.model_registry_id, runtime.node_id, reason,
                                        requested_by=dict(requested_by or {}) or None)

    async def wait_ready(self, target: Target, runtime: LoadedRuntime) -> LoadedRuntime:
        info = await self.runtime_ready(target.engine_registry_id, target.model_registry_id)
        return loaded_from_info(info)

    async def report(self, kind: str, spec: RuntimeSpec, pid: int | None) -> None:
        """Record what a runtime's supervisor did (an ``EngineRuntime`` reporter)."""
        await record_supervisor_report(self.backend, kind, spec, pid)

    # --- how runtimes are started: subclasses ------------------------------------------------
    @abstractmethod
    async def start_runtime(self, spec: RuntimeSpec) -> dict[str, Any]:
        """Start ``spec``'s engine on its node; return its ``info()`` once it answers."""

    @abstractmethod
    async def stop_runtime(self, engine_registry_id: int, model_registry_id: int) -> None:
        """Stop that runtime's engine process (no error if it is not running)."""

    @abstractmethod
    async def runtime_ready(self, engine_registry_id: int,
                            model_registry_id: int) -> dict[str, Any]:
        """Wait until that runtime's engine answers again; its ``info()``."""

    async def running_apps(self) -> set[str] | None:
        """Names of the runtime applications that exist; None where unknowable."""
        return None


class ProcessRuntimeManager(RuntimeManagerBase):
    """Starts runtimes as supervised processes of this process, on this node only."""

    def __init__(self, backend: Backend, node: Node, *, prepare: Preparer | None = None,
                 restart: RestartPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(backend, **kwargs)
        self.node = node
        self.prepare = prepare
        self.restart = restart
        self.runtimes: dict[tuple[int, int], EngineRuntime] = {}

    async def place(self, target: Target, engine: Mapping[str, Any]) -> Placement:
        placement = await super().place(target, engine)
        if placement.node_id != self.node.facts.node_id:
            raise LoadFailed(f"engine instance {target.engine_registry_id} is installed on "
                             f"{placement.node_id}, not on this node "
                             f"({self.node.facts.node_id}); run the gateway on Ray to place "
                             "runtimes on other nodes")
        return placement

    async def start_runtime(self, spec: RuntimeSpec) -> dict[str, Any]:
        runtime = EngineRuntime(spec, self.node, self.prepare, self.restart, self.report)
        key = (spec.engine_registry_id, spec.model_registry_id)
        self.runtimes[key] = runtime
        try:
            return await runtime.start()
        except BaseException:
            self.runtimes.pop(key, None)
            await runtime.stop()
            raise

    async def stop_runtime(self, engine_registry_id: int, model_registry_id: int) -> None:
        runtime = self.runtimes.pop((engine_registry_id, model_registry_id), None)
        if runtime is not None:
            await runtime.stop()

    async def runtime_ready(self, engine_registry_id: int,
                            model_registry_id: int) -> dict[str, Any]:
        runtime = self.runtimes.get((engine_registry_id, model_registry_id))
        if runtime is None:
            raise RuntimeDead("the runtime is gone; the next request loads it again")
        return await runtime.wait_ready()

    async def running_apps(self) -> set[str] | None:
        return {app_name(*key) for key in self.runtimes}

    async def close(self) -> None:
        """Stop every process this manager started."""
        for key in list(self.runtimes):
            await self.stop_runtime(*key)
