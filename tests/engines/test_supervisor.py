"""The supervisor against real fake-engine processes: readiness (503 then 200), timeouts,
handoff contents, restarts with back-off, crash on demand, SIGKILL of a stubborn group."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path

import httpx
import pytest
from engine_helpers import FAKE_ENGINE, pid_alive, wait_for

from engines.errors import EngineStartFailed, ReadinessTimeout
from engines.launch import ModelRef, PreparedEngine, free_port
from engines.sandbox import sanitized_env
from engines.supervisor import EngineState, RestartPolicy, Supervisor, SupervisorEvent


def fake_prepared(tmp_path: Path, *args: str, metrics: str | None = "/metrics") -> PreparedEngine:
    port = free_port()
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    return PreparedEngine(
        engine="fake",
        bin=sys.executable,
        args=[str(FAKE_ENGINE), "--port", str(port), "--model", str(model), *args],
        env=sanitized_env(),
        port=port,
        workdir=str(tmp_path),
        provisioning_mode="binary",
        engine_version="sha256:feed",
        model=ModelRef(id="tiny", path=model),
        flags=["--metrics", *args],
        metrics_path=metrics,
        version_path="/props",
        version_field="build_info",
    )


class Events:
    """Collects supervisor events (called from the monitor thread)."""

    def __init__(self) -> None:
        self.items: list[SupervisorEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: SupervisorEvent) -> None:
        with self.lock:
            self.items.append(event)

    def states(self) -> list[EngineState]:
        with self.lock:
            return [e.state for e in self.items]

    def restarts(self) -> list[SupervisorEvent]:
        with self.lock:
            return [e for e in self.items if e.state is EngineState.RESTARTING]


def test_loading_503_is_transient_and_the_handoff_file_says_where_the_engine_is(
    tmp_path: Path,
) -> None:
    prepared = fake_prepared(tmp_path, "--loading-s", "1.0")
    events = Events()
    sup = Supervisor(prepared, tmp_path / "run", ready_timeout_s=30, poll_interval_s=0.05,
                     on_event=events)
    try:
        handoff = sup.start()
        on_disk = json.loads(sup.handoff_path.read_text())
        assert on_disk == handoff
        assert handoff["engine"] == "fake"
        assert handoff["engine_version"] == "b9999-fake"  # read from the running server
        assert handoff["install_stamp"] == "sha256:feed"
        assert handoff["provisioning_mode"] == "binary"
        assert handoff["url"] == f"http://127.0.0.1:{prepared.port}" == sup.url
        assert handoff["model"] == {"id": "tiny", "path": str(prepared.model.path)}
        assert handoff["flags"] == prepared.flags
        assert handoff["pid"] == sup.pid and pid_alive(sup.pid)
        assert sup.handoff_path.parent == tmp_path / "run"
        assert httpx.get(sup.url + "/health").status_code == 200
        assert events.states() == [EngineState.STARTING, EngineState.READY]
        timings = sup.last_start_timings
        assert 0 < timings["ready_s"] <= timings["handoff_s"]
    finally:
        sup.stop()
    assert not sup.handoff_path.exists()
    assert sup.state is EngineState.STOPPED
    assert events.states()[-2:] == [EngineState.STOPPING, EngineState.STOPPED]


def test_readiness_timeout_kills_the_engine_and_reports_what_it_saw(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    prepared = fake_prepared(tmp_path, "--loading-s", "600", "--starts", str(starts))
    sup = Supervisor(prepared, ready_timeout_s=1.0, poll_interval_s=0.05)
    with pytest.raises(ReadinessTimeout, match=r"HTTP 503.*Loading model"):
        sup.start()
    pid = int(starts.read_text().split()[0])
    assert not pid_alive(pid)
    assert sup.state is EngineState.FAILED
    assert not sup.handoff_path.exists()
    sup.stop()


def test_an_engine_that_exits_before_ready_fails_with_its_exit_code_and_log(
    tmp_path: Path,
) -> None:
    sup = Supervisor(fake_prepared(tmp_path, "--exit-code", "7"), ready_timeout_s=30)
    with pytest.raises(EngineStartFailed, match=r"code 7(.|\n)*exiting at once"):
        sup.start()
    assert sup.state is EngineState.FAILED


def test_metrics_enabled_but_not_served_fails_the_start(tmp_path: Path) -> None:
    sup = Supervisor(fake_prepared(tmp_path, "--no-metrics"), ready_timeout_s=30)
    with pytest.raises(EngineStartFailed, match="/metrics answered HTTP 404"):
        sup.start()
    assert sup.pid is None


def test_crashes_restart_with_capped_exponential_backoff_then_give_up(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    prepared = fake_prepared(tmp_path, "--crash-after", "0.5", "--starts", str(starts))
    events = Events()
    policy = RestartPolicy(max_restarts=3, initial_backoff_s=0.05, multiplier=2.0,
                           max_backoff_s=0.1, reset_after_s=600)
    sup = Supervisor(prepared, ready_timeout_s=30, poll_interval_s=0.05, restart=policy,
                     on_event=events)
    try:
        sup.start()
        wait_for(lambda: sup.state is EngineState.FAILED, 60, "the supervisor to give up")
    finally:
        sup.stop()
    restarts = events.restarts()
    assert [e.backoff_s for e in restarts] == [0.05, 0.1, 0.1]
    assert [e.restarts for e in restarts] == [1, 2, 3]
    assert all(e.exit_code == 3 for e in restarts)
    pids = starts.read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 4
    assert not any(pid_alive(int(p)) for p in pids)


def test_a_crash_on_demand_is_restarted_and_the_handoff_follows_the_new_pid(
    tmp_path: Path,
) -> None:
    events = Events()
    sup = Supervisor(fake_prepared(tmp_path), ready_timeout_s=30, poll_interval_s=0.05,
                     restart=RestartPolicy(initial_backoff_s=0.05), on_event=events)
    try:
        first = sup.start()
        with contextlib.suppress(httpx.HTTPError):  # it may die before answering
            httpx.post(sup.url + "/crash", timeout=5)
        wait_for(lambda: sup.restarts == 1 and sup.state is EngineState.READY, 30, "a restart")
        handoff = json.loads(sup.handoff_path.read_text())
        assert handoff["pid"] == sup.pid != first["pid"]
        assert handoff["url"] == first["url"]
        assert handoff["restarts"] == 1
        assert not pid_alive(first["pid"])
        assert [e.exit_code for e in events.restarts()] == [3]
    finally:
        sup.stop()


def test_stop_sigkills_an_engine_ignoring_sigterm_and_leaves_no_orphan(tmp_path: Path) -> None:
    child_file = tmp_path / "child.pid"
    prepared = fake_prepared(tmp_path, "--ignore-sigterm", "--spawn-child", str(child_file))
    sup = Supervisor(prepared, ready_timeout_s=30, stop_timeout_s=1.0)
    sup.start()
    wait_for(child_file.exists, 10, "the engine's child process")
    wait_for(lambda: child_file.read_text().strip() != "", 10, "the child's pid")
    engine_pid, child_pid = sup.pid, int(child_file.read_text())
    assert engine_pid is not None and pid_alive(child_pid)
    sup.stop()
    assert sup.returncode == -9  # SIGTERM was ignored, SIGKILL ended it
    wait_for(lambda: not pid_alive(child_pid), 10, "the grandchild to be gone")
    assert not pid_alive(engine_pid)


def test_stop_while_waiting_to_restart_ends_cleanly(tmp_path: Path) -> None:
    events = Events()
    sup = Supervisor(fake_prepared(tmp_path, "--crash-after", "0.5"), ready_timeout_s=30,
                     poll_interval_s=0.05, restart=RestartPolicy(initial_backoff_s=600),
                     on_event=events)
    sup.start()
    wait_for(lambda: sup.state is EngineState.RESTARTING, 30, "the crash")
    sup.stop()
    assert sup.state is EngineState.STOPPED
    assert sup.pid is None
    assert events.states()[-2:] == [EngineState.STOPPING, EngineState.STOPPED]


def test_no_state_change_is_reported_twice_in_a_row(tmp_path: Path) -> None:
    events = Events()
    sup = Supervisor(fake_prepared(tmp_path), ready_timeout_s=30, on_event=events)
    sup.start()
    sup.stop()
    sup.stop()
    pairs = [(e.previous, e.state) for e in events.items]
    assert all(prev is not new for prev, new in pairs)
    assert pairs == [
        (EngineState.IDLE, EngineState.STARTING),
        (EngineState.STARTING, EngineState.READY),
        (EngineState.READY, EngineState.STOPPING),
        (EngineState.STOPPING, EngineState.STOPPED),
    ]


async def test_usable_from_an_asyncio_loop(tmp_path: Path) -> None:
    sup = Supervisor(fake_prepared(tmp_path), ready_timeout_s=30)
    handoff = await sup.astart()
    async with httpx.AsyncClient() as client:
        assert (await client.get(handoff["url"] + "/health")).status_code == 200
    pid = sup.pid
    await sup.astop()
    assert pid is not None and not pid_alive(pid)
