"""The orchestrator core against a fake runtime manager (no Ray, no processes)."""

from __future__ import annotations

import asyncio

import pytest
from fake_manager import FakeManager

from cluster.orchestrator import (
    JobState,
    LoadFailed,
    ModelNotFound,
    Orchestrator,
    QueueFull,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def run_job(orch: Orchestrator, model: str = "m", hold: asyncio.Event | None = None) -> int:
    job = orch.submit(model, stream=True, requested_by={"user_id": 1})
    rt = await orch.acquire(job)
    if hold is not None:
        await hold.wait()
    orch.finish(job, tokens_out=3)
    return rt.pid or 0


async def test_ten_concurrent_requests_for_an_unloaded_model_cause_one_load() -> None:
    fake = FakeManager()
    fake.gate = asyncio.Event()
    orch = Orchestrator(fake)
    tasks = [asyncio.create_task(run_job(orch)) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert {j["state"] for j in orch.list_jobs()} == {"loading"}
    fake.gate.set()
    pids = await asyncio.gather(*tasks)
    assert fake.loads == ["m"] and len(set(pids)) == 1
    assert orch.list_jobs() == []


async def test_a_failed_load_fails_every_waiting_job_and_the_next_request_loads_again() -> None:
    fake = FakeManager()
    fake.gate = asyncio.Event()
    fake.fail_next_load = "out of memory"
    orch = Orchestrator(fake)
    tasks = [asyncio.create_task(run_job(orch)) for _ in range(3)]
    await asyncio.sleep(0.01)
    fake.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, LoadFailed) and "out of memory" in str(r) for r in results)
    assert await run_job(orch) > 0
    assert fake.loads == ["m", "m"]


async def test_unknown_model_ends_the_job_with_an_error() -> None:
    orch = Orchestrator(FakeManager())
    with pytest.raises(ModelNotFound):
        await run_job(orch, "nope")
    assert orch.list_jobs() == []


async def test_queue_full_past_the_bound_with_retry_after() -> None:
    orch = Orchestrator(FakeManager(), max_running=1, max_queue=1, retry_after_s=2)
    hold = asyncio.Event()
    first = asyncio.create_task(run_job(orch, hold=hold))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(run_job(orch))
    await asyncio.sleep(0.01)
    assert [j["state"] for j in orch.list_jobs()] == ["streaming", "queued"]
    with pytest.raises(QueueFull) as info:
        orch.submit("m")
    assert info.value.retry_after_s == 2 and info.value.status == 429
    hold.set()
    await asyncio.gather(first, second)


async def test_keep_alive_zero_unloads_after_each_request() -> None:
    fake = FakeManager({"m": 0})
    orch = Orchestrator(fake)
    await run_job(orch)
    await asyncio.sleep(0.01)
    assert fake.unloads == [("m", "idle")]
    await run_job(orch)
    assert fake.loads == ["m", "m"]


async def test_idle_runtime_is_unloaded_after_its_keep_alive_and_minus_one_keeps_it() -> None:
    clock = Clock()
    fake = FakeManager({"m": 60, "forever": -1})
    orch = Orchestrator(fake, clock=clock)
    await run_job(orch, "m")
    await run_job(orch, "forever")
    usage = orch.usage()
    assert usage[(1, 2)]["expires_at"] is not None and usage[(1, 1)]["expires_at"] is None
    clock.now += 59
    assert await orch.sweep() == 0
    clock.now += 2
    assert await orch.sweep() == 1
    assert fake.unloads == [("m", "idle")]
    clock.now += 10_000
    assert await orch.sweep() == 0


async def test_unload_is_a_barrier_running_jobs_finish_and_later_jobs_reload() -> None:
    fake = FakeManager()
    orch = Orchestrator(fake)
    hold = asyncio.Event()
    running = asyncio.create_task(run_job(orch, hold=hold))
    await asyncio.sleep(0.01)
    unload = asyncio.create_task(orch.unload(1, 1, reason="user"))
    await asyncio.sleep(0.01)
    assert fake.unloads == []  # waits for the running job
    later = asyncio.create_task(run_job(orch))
    await asyncio.sleep(0.01)
    assert not later.done() and fake.loads == ["m"]  # waits behind the barrier
    hold.set()
    assert await unload is True
    first_pid, second_pid = await asyncio.gather(running, later)
    assert fake.unloads == [("m", "user")]
    assert fake.loads == ["m", "m"] and first_pid != second_pid


async def test_drain_timeout_bounds_the_barrier() -> None:
    fake = FakeManager()
    orch = Orchestrator(fake, drain_timeout_s=0.05)
    hold = asyncio.Event()
    running = asyncio.create_task(run_job(orch, hold=hold))
    await asyncio.sleep(0.01)
    assert await orch.unload(1, 1, reason="stop_engine")
    assert fake.unloads == [("m", "stop_engine")]
    hold.set()
    await running


async def test_after_an_engine_error_the_next_job_waits_for_readiness_or_reloads() -> None:
    fake = FakeManager()
    orch = Orchestrator(fake)
    job = orch.submit("m")
    await orch.acquire(job)
    orch.engine_failed(job)
    orch.finish(job, error="connection reset")
    await run_job(orch)
    assert fake.ready_checks == 1 and fake.loads == ["m"]
    job = orch.submit("m")
    await orch.acquire(job)
    orch.engine_failed(job)
    orch.finish(job, error="connection reset")
    fake.dead = True
    await run_job(orch)
    assert fake.unloads == [("m", "crashed")] and fake.loads == ["m", "m"]


async def test_cancel_moves_the_job_through_cancelling_to_cancelled() -> None:
    orch = Orchestrator(FakeManager())
    job = orch.submit("m", stream=True)
    await orch.acquire(job)
    assert orch.cancel(job.job_id)
    assert orch.list_jobs()[0]["state"] == "cancelling"
    orch.finish(job, error=asyncio.CancelledError())
    assert job.state is JobState.CANCELLED and orch.list_jobs() == []
    assert not orch.cancel(job.job_id)


async def test_stop_engine_unloads_all_its_runtimes() -> None:
    fake = FakeManager({"a": None, "b": None})
    orch = Orchestrator(fake)
    await run_job(orch, "a")
    await run_job(orch, "b")
    assert await orch.unload_engine(1, reason="stop_engine")
    assert sorted(fake.unloads) == [("a", "stop_engine"), ("b", "stop_engine")]
    assert not await orch.unload_engine(1, reason="stop_engine")
