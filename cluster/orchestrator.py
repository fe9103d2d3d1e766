"""The orchestrator core: the live job table, single-flight loads, keep-alive and unload barriers.

No Ray and no HTTP here: ``Orchestrator`` is an asyncio object driven by the
gateway (one per gateway replica, so the hot path has no extra hop) and talks to
runtimes only through the narrow ``RuntimeManager`` protocol — tests drive it with
a fake manager and with the real llama.cpp supervisor.

A job's states and the allowed transitions::

    QUEUED ──slot free──> RESOLVING ──model → engine → node──> LOADING
    LOADING ──runtime ready──> STREAMING (stream=True) | BATCHING (stream=False)
    STREAMING | BATCHING ──engine answered──> DONE
    any live state ──client gone / cancel()──> CANCELLING ──> CANCELLED
    any live state ──failure──> ERROR

Finished jobs leave the table (``list_jobs`` shows live work only).

A runtime (one engine instance and one model) is loaded once for all the jobs waiting
for it (single flight). When its last job ends it is kept for its keep-alive
(``keep_alive_s`` of the model, else the default; 0 = unload after each request,
-1 = never), then unloaded with reason ``idle``. ``unload()`` is a barrier: the
runtime leaves the table at once, so jobs that arrive afterwards start a fresh
load (which waits for the unload to finish); jobs already running on it finish,
for at most ``drain_timeout_s``, before the process is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("roundhouse.orchestrator")


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RESOLVING = "resolving"
    LOADING = "loading"
    STREAMING = "streaming"
    BATCHING = "batching"
    CANCELLING = "cancelling"
    DONE = "done"
    CANCELLED = "cancelled"
    ERROR = "error"


FINAL_STATES = frozenset({JobState.DONE, JobState.CANCELLED, JobState.ERROR})
WAITING_STATES = frozenset({JobState.QUEUED, JobState.RESOLVING, JobState.LOADING})


from actors.runtime_types import (  # noqa: E402  (re-exported: the orchestrator's surface)
    Cancelled,
    LoadedRuntime,
    LoadFailed,
    ModelNotFound,
    NoEngine,
    OrchestratorError,
    QueueFull,
    RuntimeDead,
    RuntimeManager,
    Target,
)

__all__ = ["Cancelled", "Job", "JobState", "LoadFailed", "LoadedRuntime", "ModelNotFound",
           "NoEngine", "Orchestrator", "OrchestratorError", "QueueFull", "RuntimeDead",
           "RuntimeManager", "Target"]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass
class Job:
    """One request's row in the live job table."""

    job_id: str
    model: str
    stream: bool
    requested_by: dict[str, Any]
    state: JobState = JobState.QUEUED
    engine_registry_id: int | None = None
    model_registry_id: int | None = None
    node_id: str | None = None
    tokens_out: int = 0
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    runtime: LoadedRuntime | None = None
    _slot: bool = False

    def row(self) -> dict[str, Any]:
        """The job as ``list_active_jobs`` returns it."""
        return {
            "job_id": self.job_id, "state": self.state.value, "model": self.model,
            "stream": self.stream, "engine_registry_id": self.engine_registry_id,
            "model_registry_id": self.model_registry_id, "node_id": self.node_id,
            "tokens_out": self.tokens_out, "requested_by": self.requested_by,
            "error": self.error, "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


@dataclass
class _Runtime:
    target: Target
    loaded: LoadedRuntime | None = None
    load_task: asyncio.Task[LoadedRuntime] | None = None
    active: int = 0
    last_used: float = field(default_factory=time.time)
    suspect: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class Orchestrator:
    """The job table and runtime lifecycle of one gateway; every method runs on one event loop."""

    def __init__(
        self,
        manager: RuntimeManager,
        *,
        max_running: int = 16,
        max_queue: int = 64,
        default_keep_alive_s: float = 300.0,
        drain_timeout_s: float = 30.0,
        sweep_interval_s: float = 1.0,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_running < 1 or max_queue < 0:
            raise ValueError("max_running must be ≥ 1 and max_queue ≥ 0")
        self.manager = manager
        self.max_running = max_running
        self.max_queue = max_queue
        self.default_keep_alive_s = default_keep_alive_s
        self.drain_timeout_s = drain_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(max_running)
        self._runtimes: dict[tuple[int, int], _Runtime] = {}
        self._unloading: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._draining: dict[tuple[int, int], _Runtime] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.loads = 0  # number of loads started (tests read it)

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the idle sweeper on the running loop (idempotent)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self, unload_reason: str | None = None) -> None:
        """Stop the sweeper; with ``unload_reason`` unload every runtime first."""
        if unload_reason is not None:
            await asyncio.gather(*(self.unload(*key, reason=unload_reason)
                                   for key in list(self._runtimes)), return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.gather(*self._unloading.values(), return_exceptions=True)

    # --- jobs -------------------------------------------------------------------------------
    def submit(self, model: str, *, stream: bool = False,
               requested_by: Mapping[str, Any] | None = None) -> Job:
        """Admit a job (state QUEUED) or raise QueueFull when ``max_queue`` jobs already wait."""
        waiting = sum(1 for j in self._jobs.values() if j.state in WAITING_STATES and not j._slot)
        if waiting >= self.max_queue and self._slots.locked():
            raise QueueFull(
                f"the gateway already has {waiting} requests waiting (limit "
                f"{self.max_queue}); retry after {self.retry_after_s:g} s or raise "
                "ROUNDHOUSE_GATEWAY_MAX_QUEUE", self.retry_after_s)
        job = Job(job_id=uuid.uuid4().hex, model=model, stream=stream,
                  requested_by=dict(requested_by or {}))
        self._jobs[job.job_id] = job
        return job

    def _move(self, job: Job, state: JobState) -> None:
        if job.state is state:
            return
        job.state = state
        job.updated_at = self.clock()

    async def acquire(self, job: Job) -> LoadedRuntime:
        """Take a running slot, resolve, load if needed; return the ready runtime.

        On return the job is STREAMING or BATCHING and counts as active on its
        runtime until ``finish``. Raises an OrchestratorError (the job is then
        finished with ERROR or CANCELLED).
        """
        try:
            await self._slots.acquire()
            job._slot = True
            self._check_cancel(job)
            self._move(job, JobState.RESOLVING)
            target = await self.manager.resolve(job.model)
            job.engine_registry_id, job.model_registry_id = target.key
            self._check_cancel(job)
            runtime = await self._runtime_for(job, target)
        except BaseException as exc:
            self.finish(job, error=exc)
            raise
        job.node_id = runtime.node_id
        job.runtime = runtime
        job.started_at = self.clock()
        self._move(job, JobState.STREAMING if job.stream else JobState.BATCHING)
        return runtime

    def _check_cancel(self, job: Job) -> None:
        if job.cancel_requested.is_set():
            raise Cancelled(f"job {job.job_id} was cancelled")

    async def _runtime_for(self, job: Job, target: Target) -> LoadedRuntime:
        while True:
            key = target.key
            pending_unload = self._unloading.get(key)
            if pending_unload is not None and key not in self._runtimes:
                await asyncio.shield(pending_unload)  # the barrier: a fresh load starts after it
                continue
            rt = self._runtimes.get(key)
            if rt is None:
                rt = _Runtime(target=target)
                self._runtimes[key] = rt
                self.loads += 1
                rt.load_task = asyncio.get_running_loop().create_task(
                    self.manager.load(target, job.requested_by, job.job_id))
            rt.active += 1
            rt.idle.clear()
            try:
                if rt.loaded is None:
                    self._move(job, JobState.LOADING)
                    assert rt.load_task is not None
                    try:
                        rt.loaded = await asyncio.shield(rt.load_task)
                    except OrchestratorError:
                        raise
                    except Exception as exc:
                        raise LoadFailed(f"loading {target.model} failed: {exc}") from exc
                if rt.suspect:
                    rt.suspect = False
                    try:
                        rt.loaded = await self.manager.wait_ready(target, rt.loaded)
                    except RuntimeDead:
                        self._release(rt)
                        await self.unload(*key, reason="crashed")
                        continue
                return rt.loaded
            except BaseException:
                failed = rt.loaded is None and rt.load_task is not None and rt.load_task.done()
                if failed and self._runtimes.get(key) is rt:
                    del self._runtimes[key]  # a failed load is forgotten; the next job retries
                self._release(rt)
                raise

    def _release(self, rt: _Runtime) -> None:
        rt.active = max(0, rt.active - 1)
        rt.last_used = self.clock()
        if rt.active == 0:
            rt.idle.set()
            if (self._runtimes.get(rt.target.key) is rt and rt.loaded is not None
                    and self._keep_alive(rt) == 0):
                self._spawn(self.unload(*rt.target.key, reason="idle"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def cancelling(self, job: Job) -> None:
        """The client went away (or cancel() was called): mark the job CANCELLING."""
        job.cancel_requested.set()
        if job.state not in FINAL_STATES:
            self._move(job, JobState.CANCELLING)

    def cancel(self, job_id: str) -> bool:
        """Ask a live job to stop; False if no such live job."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        self.cancelling(job)
        return True

    def engine_failed(self, job: Job) -> None:
        """The engine broke off ``job``'s request: check the runtime before the next job uses it."""
        if job.engine_registry_id is None or job.model_registry_id is None:
            return
        rt = self._runtimes.get((job.engine_registry_id, job.model_registry_id))
        if rt is not None:
            rt.suspect = True

    def finish(self, job: Job, *, tokens_out: int | None = None,
               error: BaseException | str | None = None) -> None:
        """End a job: DONE, CANCELLED (client gone / Cancelled) or ERROR; release its runtime."""
        if job.state in FINAL_STATES:
            return
        if tokens_out is not None:
            job.tokens_out = tokens_out
        if isinstance(error, Cancelled | asyncio.CancelledError) or (
                error is not None and job.cancel_requested.is_set()):
            final = JobState.CANCELLED
        elif error is not None:
            final = JobState.ERROR
            job.error = str(error) or type(error).__name__
        elif job.cancel_requested.is_set():
            final = JobState.CANCELLED
        else:
            final = JobState.DONE
        job.finished_at = self.clock()
        self._move(job, final)
        self._jobs.pop(job.job_id, None)
        if job._slot:
            job._slot = False
            self._slots.release()
        if job.runtime is not None and job.engine_registry_id is not None \
                and job.model_registry_id is not None:
            rt = self._runtimes.get((job.engine_registry_id, job.model_registry_id))
            draining = self._draining.get((job.engine_registry_id, job.model_registry_id))
            for candidate in (rt, draining):
                if candidate is not None and candidate.loaded is job.runtime:
                    self._release(candidate)
                    break
            job.runtime = None

    def list_jobs(self) -> list[dict[str, Any]]:
        """The live jobs, oldest first."""
        return [j.row() for j in sorted(self._jobs.values(), key=lambda j: j.created_at)]

    # --- runtimes ---------------------------------------------------------------------------
    def _keep_alive(self, rt: _Runtime) -> float:
        ka = rt.target.keep_alive_s
        return self.default_keep_alive_s if ka is None else ka

    def usage(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Per runtime: ``last_used_at``, ``expires_at`` (None while busy or kept forever)."""
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for key, rt in self._runtimes.items():
            ka = self._keep_alive(rt)
            expires = None if rt.active or ka < 0 else rt.last_used + ka
            out[key] = {"last_used_at": _iso(rt.last_used), "expires_at": _iso(expires),
                        "active_jobs": rt.active,
                        "loaded": rt.loaded is not None}
        return out

    async def unload(self, engine_registry_id: int, model_registry_id: int, *,
                     reason: str = "user",
                     requested_by: Mapping[str, Any] | None = None) -> bool:
        """Unload one runtime behind a barrier; True if this orchestrator had it.

        The runtime leaves the table at once; its running jobs get up to
        ``drain_timeout_s`` to finish before the process is stopped.
        """
        key = (engine_registry_id, model_registry_id)
        rt = self._runtimes.pop(key, None)
        if rt is None:
            pending = self._unloading.get(key)
            if pending is not None:
                await asyncio.shield(pending)
            return False
        task = asyncio.get_running_loop().create_task(self._drain_and_unload(rt, reason,
                                                                             requested_by))
        self._unloading[key] = task
        try:
            await asyncio.shield(task)
        finally:
            if self._unloading.get(key) is task and task.done():
                del self._unloading[key]
        return True

    async def _drain_and_unload(self, rt: _Runtime, reason: str,
                                requested_by: Mapping[str, Any] | None) -> None:
        key = rt.target.key
        self._draining[key] = rt
        try:
            if rt.loaded is None and rt.load_task is not None:
                try:
                    rt.loaded = await asyncio.shield(rt.load_task)
                except Exception:
                    return  # nothing was started
            if rt.active:
                try:
                    await asyncio.wait_for(rt.idle.wait(), self.drain_timeout_s)
                except TimeoutError:
                    log.warning("unloading %s with %d jobs still running after %.0f s",
                                rt.target.model, rt.active, self.drain_timeout_s)
            assert rt.loaded is not None
            await self.manager.unload(rt.target, rt.loaded, reason, requested_by)
        finally:
            if self._draining.get(key) is rt:
                del self._draining[key]

    async def unload_engine(self, engine_registry_id: int, *, reason: str,
                            requested_by: Mapping[str, Any] | None = None) -> bool:
        """Unload every runtime of one engine instance; True if there was any."""
        keys = [k for k in self._runtimes if k[0] == engine_registry_id]
        results = await asyncio.gather(*(self.unload(*k, reason=reason,
                                                     requested_by=requested_by) for k in keys))
        return any(results)

    def runtime_node(self, engine_registry_id: int, model_registry_id: int) -> str | None:
        """The node a held, loaded runtime runs on; None when not held or still loading."""
        rt = self._runtimes.get((engine_registry_id, model_registry_id))
        return rt.loaded.node_id if rt is not None and rt.loaded is not None else None

    def forget(self, engine_registry_id: int, model_registry_id: int) -> None:
        """Drop a runtime that vanished outside this orchestrator (no unload call)."""
        self._runtimes.pop((engine_registry_id, model_registry_id), None)

    async def sweep(self) -> int:
        """Unload runtimes idle longer than their keep-alive; return how many."""
        now = self.clock()
        due = [key for key, rt in self._runtimes.items()
               if rt.loaded is not None and rt.active == 0 and self._keep_alive(rt) >= 0
               and now - rt.last_used >= self._keep_alive(rt)]
        for key in due:
            await self.unload(*key, reason="idle")
        return len(due)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("idle sweep failed")
