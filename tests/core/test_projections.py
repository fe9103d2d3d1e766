"""Views are projections of the log: exactly once, rebuildable, and verifiable."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from sqlalchemy import func, select, update

from actors.control_plane import ControlPlane
from cluster.client import SDK, LocalBackend
from events.engine import EngineInstance
from events.settings import Settings
from projections import tables as t
from projections.projector import Projector


def _plane(sdk: SDK) -> ControlPlane:
    backend = sdk._backend
    assert isinstance(backend, LocalBackend)
    return backend.control_plane


def _count(plane: ControlPlane, table: Any) -> int:
    with plane.views.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


async def test_crash_between_save_and_projection_is_caught_up_once(settings: Settings) -> None:
    plane = ControlPlane(settings, node_id="head")
    plane.create_engine("llamacpp", "first")
    # The writer saves an event and dies before projecting it.
    plane.ledger.save_all(EngineInstance(row_id=2, provider="vllm", name="second", config={},
                                         organization_id=None, requested_by={}, task_id=None))
    assert [r["id"] for r in plane.list_engines()] == [1]
    plane.close()

    restarted = ControlPlane(settings, node_id="head")
    assert [r["id"] for r in restarted.list_engines()] == [1, 2]
    assert restarted.catch_up() == 0  # nothing applied twice
    assert _count(restarted, t.engines) == 2
    assert _count(restarted, t.audit_log) == restarted.ledger.last_position()
    assert restarted.verify()["differences"] == []
    restarted.close()


async def test_crash_mid_batch_applies_each_event_exactly_once(settings: Settings) -> None:
    plane = ControlPlane(settings, node_id="head")
    plane.record_node_joined("node-a", {})
    for i in range(5):
        plane.create_engine("llamacpp", f"e{i}")
    total = plane.ledger.last_position()
    plane.rebuild()
    # Wipe the views, then apply only part of the log, as if the process died mid-way.
    with plane.views.begin() as conn:
        for table in t.VIEW_TABLES:
            conn.execute(table.delete())
        conn.execute(update(t.positions).values(position=0))
    first = Projector(plane.views)
    assert first.catch_up(plane.ledger, stop_after=3) == 3
    # A second runner with its own (empty) caches finishes the job; the first one then
    # finds nothing left. Double application would violate primary keys.
    second = Projector(plane.views)
    assert second.catch_up(plane.ledger) == total - 3
    assert first.catch_up(plane.ledger) == 0
    assert _count(plane, t.audit_log) == total
    assert plane.verify()["differences"] == []
    plane.close()


async def _random_commands(sdk: SDK, rng: random.Random, steps: int) -> None:
    nodes = ["node-a", "node-b", "node-c"]
    for node in nodes[:2]:
        await sdk.nodes.joined(node, {"cpu_count": 2})
    for step in range(steps):
        engines = await sdk.models.engine_registry.list()
        choice = rng.random()
        try:
            if choice < 0.15 or not engines:
                provider = rng.choice(["llamacpp", "vllm", "openai"])
                await sdk.models.engine_registry.create(provider=provider, name=f"e{step}",
                                                        requested_by={"user_id": step % 3})
                continue
            row = rng.choice(engines)
            rid = row["id"]
            if choice < 0.25:
                await sdk.models.engine_registry.update(rid, config={"ctx_size": 256 * step}
                                                       if row["provider"] == "llamacpp" else {})
            elif choice < 0.35:
                await sdk.engines.begin_install(rid, force=rng.random() < 0.3)
            elif choice < 0.7:
                event = row["last_install_event_id"]
                status = await sdk.engines.install_status(rid)
                node = rng.choice(status["nodes"] or [{"node_id": "node-a"}])
                if event is None:
                    continue
                action = rng.choice(["start", "progress", "succeed", "fail"])
                if action == "start":
                    await sdk.nodes.install_started(rid, node["node_id"], event)
                elif action == "progress":
                    await sdk.nodes.install_progress(rid, node["node_id"], event,
                                                     rng.random(), "working")
                elif action == "succeed":
                    await sdk.nodes.install_succeeded(rid, node["node_id"], event, "v1")
                else:
                    await sdk.nodes.install_failed(rid, node["node_id"], event, "boom")
            elif choice < 0.8:
                await sdk.engines.activate_instance(rid)
            elif choice < 0.87:
                await sdk.engines.deactivate_instance(rid)
            elif choice < 0.9:
                await sdk.models.engine_registry.delete(rid)
            elif choice < 0.95:
                node = rng.choice(nodes)
                if rng.random() < 0.5:
                    await sdk.nodes.joined(node, {"cpu_count": rng.choice([2, 4])})
                else:
                    await sdk.nodes.lost(node, "test")
            else:
                await sdk.models.model_registry.create(
                    name=f"m{step}", source={"type": "local", "path": f"/models/{step}.gguf"})
        except Exception as exc:  # refused commands are part of a realistic sequence
            assert getattr(exc, "code", None) in {"bad_request", "not_found", "conflict"}, exc


async def test_verify_finds_no_difference_after_long_random_sequence(sdk: SDK) -> None:
    await _random_commands(sdk, random.Random(7), 400)
    report = await sdk.audit.verify()
    assert report["events"] > 250
    assert report["tables"]["rh_audit_log"] == report["events"]
    assert report["differences"] == []


async def test_verify_reports_a_hand_altered_row(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    plane = _plane(sdk)
    with plane.views.begin() as conn:
        conn.execute(update(t.engines).where(t.engines.c.row_id == row["id"])
                     .values(status="active"))
    report = await sdk.audit.verify()
    assert report["differences"] == [{
        "table": "rh_engines", "key": [row["id"]], "problem": "differs", "column": "status",
        "live": "active", "expected": "registered",
    }]
    # Rebuilding from the log repairs it.
    await sdk.audit.rebuild()
    assert (await sdk.models.engine_registry.get(row["id"]))["status"] == "registered"
    assert (await sdk.audit.verify())["differences"] == []


async def test_verify_reports_missing_and_extra_rows(sdk: SDK) -> None:
    await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    plane = _plane(sdk)
    with plane.views.begin() as conn:
        conn.execute(t.nodes.insert().values(node_id="ghost", aggregate_id="x", alive=True,
                                             facts={}, lost_reason="", joined_at="",
                                             updated_at=""))
        conn.execute(t.engines.delete())
    problems = {(d["table"], d["problem"]) for d in (await sdk.audit.verify())["differences"]}
    assert problems == {("rh_nodes", "extra"), ("rh_engines", "missing")}


def _snapshot(plane: ControlPlane) -> dict[str, list[str]]:
    with plane.views.connect() as conn:
        return {table.name: sorted(map(repr, conn.execute(select(table))))
                for table in t.VIEW_TABLES}


async def test_rebuild_reproduces_the_same_rows(sdk: SDK) -> None:
    await _random_commands(sdk, random.Random(3), 120)
    plane = _plane(sdk)
    before = _snapshot(plane)
    applied = await sdk.audit.rebuild()
    assert applied == plane.ledger.last_position()
    after = _snapshot(plane)
    assert after == before


def test_ids_are_allocated_without_races_by_two_writers(settings: Settings) -> None:
    planes = [ControlPlane(settings, node_id=f"w{i}") for i in range(2)]
    errors: list[BaseException] = []

    def create(plane: ControlPlane, prefix: str) -> None:
        try:
            for i in range(15):
                plane.create_engine("llamacpp", f"{prefix}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(p, f"w{n}")) for n, p in enumerate(planes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    planes[0].catch_up()
    rows = planes[0].list_engines()
    assert sorted(r["id"] for r in rows) == list(range(1, 31))
    assert len({r["name"] for r in rows}) == 30
    for plane in planes:
        plane.close()


async def test_audit_filters(sdk: SDK) -> None:
    a = await sdk.models.engine_registry.create(provider="llamacpp", name="a",
                                                requested_by={"user_id": 1})
    b = await sdk.models.engine_registry.create(provider="llamacpp", name="b",
                                                requested_by={"user_id": 2})
    await sdk.engines.begin_install(b["id"], requested_by={"user_id": 2}, task_id="t-b")
    by_engine = await sdk.audit.events(engine_registry_id=b["id"])
    assert [e["event_name"] for e in by_engine] == ["engine.registered",
                                                    "engine.install.requested"]
    assert by_engine[1]["task_id"] == "t-b"
    by_user = await sdk.audit.events(user_id=1)
    assert [(e["event_name"], e["engine_registry_id"]) for e in by_user] == [
        ("engine.registered", a["id"]), ("name.claimed", None)]
    first = by_engine[0]["timestamp"]
    assert all(e["timestamp"] >= first for e in await sdk.audit.events(since=first))
    assert await sdk.audit.events(until="2000-01-01T00:00:00+00:00") == []


def test_a_polling_reader_sees_another_writers_events(settings: Settings) -> None:
    writer = ControlPlane(settings, node_id="w")
    reader = ControlPlane(settings, node_id="r")
    reader.start_polling(0.02)
    try:
        # Saved but not projected by its writer (another process, or one that crashed).
        writer.ledger.save_all(EngineInstance(row_id=1, provider="llamacpp",
                                              name="from-the-writer", config={},
                                              organization_id=None, requested_by={},
                                              task_id=None))
        deadline = time.monotonic() + 30
        while not reader.list_engines() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r["name"] for r in reader.list_engines()] == ["from-the-writer"]
        assert reader.verify()["differences"] == []
    finally:
        reader.close()
        writer.close()
