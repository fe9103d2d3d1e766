"""One supervised engine process: start, wait for readiness, hand off, restart, stop.

The ``Supervisor`` owns one engine process (and its process group) and is its
only owner: start it, then talk to it through ``url``; everyone else only
reads ``state``, ``pid``, ``url`` and the handoff file.

States and the allowed transitions::

    IDLE ──start()──> STARTING ──ready──> READY
    STARTING ──exit / timeout on first start──> FAILED
    READY ──process exited──> RESTARTING ──back-off elapsed──> STARTING
    RESTARTING ──too many consecutive restarts──> FAILED
    any ──stop()──> STOPPING ──> STOPPED

Every change (never a no-op) is reported to ``on_event`` from the supervisor's
monitor thread, so a callback must be quick and thread-safe. Usable from sync
code (``start``/``stop``) and from an asyncio loop (``astart``/``astop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import pwd
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from engines.errors import EngineStartFailed, ReadinessTimeout
from engines.launch import PreparedEngine
from engines.sandbox import tail

log = logging.getLogger("roundhouse.engines")


class EngineState(enum.StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class SupervisorEvent:
    """One state change. ``backoff_s`` and ``exit_code`` are set on RESTARTING."""

    state: EngineState
    previous: EngineState
    pid: int | None
    restarts: int
    exit_code: int | None = None
    backoff_s: float | None = None
    message: str = ""


@dataclass(frozen=True)
class RestartPolicy:
    """Capped exponential back-off: ``initial * multiplier**(n-1)``, at most ``max_backoff_s``.

    ``max_restarts`` consecutive failed runs (None = no limit) make the
    supervisor give up (FAILED); a process that stayed ready ``reset_after_s``
    resets the count.
    """

    max_restarts: int | None = 10
    initial_backoff_s: float = 0.5
    multiplier: float = 2.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))


class _Stopped(Exception):
    """stop() was called while waiting for readiness."""


def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


class Supervisor:
    """Supervises one engine process described by a ``PreparedEngine``.

    ``runtime_dir`` (default: the prepared workdir) receives the handoff file
    ``<engine>-<name>.json`` and the engine log ``<engine>-<name>.log``.
    ``ready_timeout_s`` bounds each (re)start's wait for the health endpoint;
    ``stop_timeout_s`` is the grace between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        prepared: PreparedEngine,
        runtime_dir: Path | str | None = None,
        *,
        name: str | None = None,
        ready_timeout_s: float = 300.0,
        poll_interval_s: float = 0.2,
        restart: RestartPolicy | None = None,
        on_event: Callable[[SupervisorEvent], None] | None = None,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.prepared = prepared
        self.runtime_dir = Path(runtime_dir or prepared.workdir)
        raw = name or f"{prepared.model.id}-{prepared.port}"
        self.name = re.sub(r"[^A-Za-z0-9_.-]", "-", raw)
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self.restart_policy = restart or RestartPolicy()
        self.on_event = on_event
        self.stop_timeout_s = stop_timeout_s
        self.handoff_path = self.runtime_dir / f"{prepared.engine}-{self.name}.json"
        self.log_path = self.runtime_dir / f"{prepared.engine}-{self.name}.log"
        self.restarts = 0
        self.engine_version: str | None = None
        self.handoff: dict[str, Any] | None = None
        self._state = EngineState.IDLE
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._ready_at = 0.0
        #: Seconds from spawn of the latest (re)start: ``ready_s`` until the health
        #: endpoint answered (and metrics validated), ``handoff_s`` until the version was
        #: read and the handoff file written.
        self.last_start_timings: dict[str, float] = {}

    # --- public surface -------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def pid(self) -> int | None:
        """The current engine process id (None when not running)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def url(self) -> str:
        return self.prepared.url

    @property
    def returncode(self) -> int | None:
        """Exit status of the latest engine process (negative: killed by that signal)."""
        proc = self._proc
        return proc.returncode if proc is not None else None

    def start(self) -> dict[str, Any]:
        """Start the engine, wait until it is ready, write the handoff file, start the
        monitor that restarts it on crash; return the handoff payload.

        Raises EngineStartFailed (with the log tail) if the process exits first,
        ReadinessTimeout if it is not ready in ``ready_timeout_s``; either way
        the process group has been killed and the state is FAILED.
        """
        with self._lock:
            if self._state is not EngineState.IDLE:
                raise RuntimeError(f"supervisor {self.name} was already started ({self._state})")
            self.runtime_dir.mkdir(parents=True, exist_ok=True)
            self._log_fh = self.log_path.open("ab")
        log.info("starting engine %s: %s", self.name, self.prepared.describe())
        try:
            self._launch_and_wait()
        except _Stopped:
            raise EngineStartFailed(f"engine {self.name} was stopped while starting") from None
        except EngineStartFailed:
            self._set_state(EngineState.FAILED, message="first start failed")
            self._close_log()
            raise
        self._monitor = threading.Thread(
            target=self._monitor_loop, name=f"supervisor-{self.name}", daemon=True
        )
        self._monitor.start()
        assert self.handoff is not None
        return self.handoff

    def stop(self) -> None:
        """Stop the engine: SIGTERM to its process group, SIGKILL after ``stop_timeout_s``;
        remove the handoff file. Idempotent; safe from any thread."""
        if self._stopping.is_set() and self._state is EngineState.STOPPED:
            return
        self._stopping.set()
        if self._state not in (EngineState.IDLE, EngineState.STOPPED):
            self._set_state(EngineState.STOPPING)
        if self.prepared.stop_argv:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    self.prepared.stop_argv, capture_output=True, timeout=self.stop_timeout_s + 5
                )
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._terminate(proc)
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=self.stop_timeout_s + 10)
        self.handoff_path.unlink(missing_ok=True)
        self._close_log()
        self._set_state(EngineState.STOPPED)

    async def astart(self) -> dict[str, Any]:
        """``start`` without blocking the event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """``stop`` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------

    def _set_state(self, new: EngineState, **detail: Any) -> None:
        with self._lock:
            old = self._state
            if old is new:
                return
            self._state = new
        event = SupervisorEvent(state=new, previous=old, pid=self.pid, restarts=self.restarts,
                                **detail)
        log.info("engine %s: %s -> %s %s", self.name, old, new, detail or "")
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a broken listener must not take the engine down
                log.exception("supervisor event listener failed")

    def _close_log(self) -> None:
        fh, self._log_fh = self._log_fh, None
        if fh is not None:
            fh.close()

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_bytes()[-8000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return tail(text, 20)

    def _spawn(self) -> subprocess.Popen[bytes]:
        p = self.prepared
        user = group = None
        if p.user:
            entry = pwd.getpwnam(p.user)
            user, group = entry.pw_uid, entry.pw_gid
        assert self._log_fh is not None
        self._log_fh.write(f"\n--- roundhouse: starting {p.argv}\n".encode())
        self._log_fh.flush()
        return subprocess.Popen(
            p.argv,
            env=p.env,
            cwd=p.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals all of it
            close_fds=True,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )

    def _launch_and_wait(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise _Stopped
            spawned = time.monotonic()
            self._proc = proc = self._spawn()
        self._set_state(EngineState.STARTING, message=f"pid {proc.pid}")
        try:
            self._wait_ready(proc)
            self._validate_metrics()
            healthy = time.monotonic()
            self.engine_version = self._read_version() or self.prepared.engine_version
        except (EngineStartFailed, _Stopped):
            self._terminate(proc)
            raise
        self._ready_at = time.monotonic()
        self._write_handoff(proc.pid)
        self.last_start_timings = {
            "ready_s": healthy - spawned,
            "handoff_s": time.monotonic() - spawned,
        }
        self._set_state(EngineState.READY, message=self.url)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        url = self.url + self.prepared.health_path
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self._stopping.is_set():
                    raise _Stopped
                code = proc.poll()
                if code is not None:
                    raise EngineStartFailed(
                        f"engine {self.name} exited with code {code} before it was ready; "
                        f"last log lines ({self.log_path}):\n{self._log_tail()}"
                    )
                try:
                    resp = client.get(url)
                    if resp.status_code == 200:
                        return
                    last = f"HTTP {resp.status_code} {resp.text[:120]!r}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                if time.monotonic() >= deadline:
                    raise ReadinessTimeout(
                        f"engine {self.name} was not ready within {self.ready_timeout_s:.0f}s "
                        f"(GET {url}: {last}); raise the ready timeout "
                        f"(ROUNDHOUSE_ENGINE_READY_TIMEOUT_S) or see {self.log_path}:\n"
                        f"{self._log_tail()}"
                    )
                time.sleep(self.poll_interval_s)

    def _validate_metrics(self) -> None:
        path = self.prepared.metrics_path
        if not path:
            return
        try:
            resp = httpx.get(self.url + path, timeout=5.0)
        except httpx.HTTPError as exc:
            raise EngineStartFailed(f"metrics are enabled but GET {path} failed: {exc}") from None
        if resp.status_code != 200 or not resp.text.strip():
            raise EngineStartFailed(
                f"metrics are enabled but GET {path} answered HTTP {resp.status_code}; "
                "remove --metrics from the engine flags or fix the engine build"
            )

    def _read_version(self) -> str | None:
        p = self.prepared
        if not p.version_path:
            return None
        try:
            resp = httpx.get(self.url + p.version_path, timeout=5.0)
            if resp.status_code != 200:
                return None
            value = _dig(resp.json(), p.version_field) if p.version_field else resp.text
        except (httpx.HTTPError, ValueError):
            return None
        return str(value) if value not in (None, "") else None

    def _write_handoff(self, pid: int) -> None:
        p = self.prepared
        self.handoff = {
            "engine": p.engine,
            "engine_version": self.engine_version,
            "provisioning_mode": p.provisioning_mode,
            "url": self.url,
            "model": p.model.payload(),
            "flags": list(p.flags),
            "pid": pid,
            "install_stamp": p.engine_version,
            "restarts": self.restarts,
            "cpu_fallback": p.cpu_fallback,
            "notes": list(p.notes),
        }
        tmp = self.handoff_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.handoff, indent=2), encoding="utf-8")
        tmp.replace(self.handoff_path)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the process group, SIGKILL what is left after the grace period."""
        pgid = proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine %s ignored SIGTERM for %.0fs: SIGKILL", self.name,
                        self.stop_timeout_s)
        # The leader may be gone while children it started linger in the group.
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _monitor_loop(self) -> None:
        consecutive = 0
        policy = self.restart_policy
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            code = proc.poll()
            if code is None:
                self._stopping.wait(0.1)
                continue
            if self._stopping.is_set():
                return
            if self._ready_at and time.monotonic() - self._ready_at >= policy.reset_after_s:
                consecutive = 0
            self._terminate(proc)  # leftovers of its group
            self.handoff_path.unlink(missing_ok=True)
            consecutive += 1
            if policy.max_restarts is not None and consecutive > policy.max_restarts:
                self._set_state(
                    EngineState.FAILED,
                    exit_code=code,
                    message=f"gave up after {policy.max_restarts} consecutive restarts; "
                    f"see {self.log_path}",
                )
                self._close_log()
                return
            backoff = policy.backoff(consecutive)
            self.restarts += 1
            self._set_state(
                EngineState.RESTARTING,
                exit_code=code,
                backoff_s=backoff,
                message=f"exited with code {code}; restart {self.restarts} in {backoff:.2f}s",
            )
            if self._stopping.wait(backoff):
                return
            self._ready_at = 0.0
            try:
                self._launch_and_wait()
            except _Stopped:
                return
            except EngineStartFailed as exc:
                log.warning("restart of engine %s failed: %s", self.name, exc)
                # the loop sees the dead process and backs off further


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
