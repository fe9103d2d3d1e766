"""Installs: request payloads, per-node rows, the aggregation rule, and node reports."""

from __future__ import annotations

import pytest
from conftest import WHO

from actors.errors import BadInput, Conflict, NotFound
from cluster.client import SDK
from events.install import aggregate_install_status

EVENT_KEYS = {"event_id", "event_name", "engine_id", "manifest_version", "engine_version",
              "force", "source_node_id", "requested_by", "requested_at"}


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], "pending"),
        (["installed"], "installed"),
        (["installed", "installed"], "installed"),
        (["pending"], "installing"),
        (["installed", "installing"], "installing"),
        (["installed", "pending"], "installing"),
        (["error", "installing"], "error"),
        (["installed", "error"], "error"),
        (["pending", "error", "installed"], "error"),
    ],
)
def test_aggregation_rule(states: list[str], expected: str) -> None:
    assert aggregate_install_status(states) == expected


async def _two_nodes(sdk: SDK) -> None:
    await sdk.nodes.joined("node-a", {"cpu_count": 2, "memory_bytes": 8 << 30})
    await sdk.nodes.joined("node-b", {"cpu_count": 4, "gpus": [
        {"index": 0, "name": "L4", "memory_bytes": 24 << 30}]})


async def test_begin_install_payload(sdk: SDK) -> None:
    await _two_nodes(sdk)
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    result = await sdk.engines.begin_install(row["id"], requested_by=WHO, task_id="task-123")
    assert set(result) == {"engine_registry_id", "provider", "event", "status"}
    assert result["engine_registry_id"] == row["id"]
    assert result["provider"] == "llamacpp"
    event = result["event"]
    assert set(event) >= EVENT_KEYS
    assert event["event_name"] == "engine.install.requested"
    assert event["engine_id"] == "llamacpp"
    assert event["manifest_version"] == 1
    assert event["engine_version"] == "0.3.36"
    assert event["force"] is False
    assert event["source_node_id"] == "head"
    assert event["requested_by"] == {**WHO, "actor": "user"}
    status = result["status"]
    assert status["engine_id"] == "llamacpp"
    assert status["status"] == "installing"
    assert status["supported"] is True
    assert [n["node_id"] for n in status["nodes"]] == ["node-a", "node-b"]
    for node in status["nodes"]:
        assert {"node_id", "status", "last_event_id", "last_error"} <= set(node)
        assert node["status"] == "pending"
        assert node["last_event_id"] == event["event_id"]
        assert node["last_error"] == ""
    assert status["summary"] == {"pending": 2, "installing": 0, "installed": 0, "error": 0}
    row_after = await sdk.models.engine_registry.get(row["id"])
    assert row_after["status"] == "installing"
    assert row_after["last_install_event_id"] == event["event_id"]


async def test_install_status_with_no_node_is_pending(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    await sdk.engines.begin_install(row["id"])
    status = await sdk.engines.install_status(row["id"])
    assert status["status"] == "pending"
    assert status["nodes"] == []
    assert status["summary"] == {"pending": 0, "installing": 0, "installed": 0, "error": 0}


async def test_node_reports_drive_the_summary_and_the_row(sdk: SDK) -> None:
    await _two_nodes(sdk)
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    rid = row["id"]

    await sdk.nodes.install_started(rid, "node-a", event_id, plan={"mode": "package"})
    await sdk.nodes.install_progress(rid, "node-a", event_id, 0.4, "building wheel")
    status = await sdk.engines.install_status(rid)
    assert status["summary"] == {"pending": 1, "installing": 1, "installed": 0, "error": 0}
    assert status["nodes"][0]["progress"] == pytest.approx(0.4)
    assert status["nodes"][0]["message"] == "building wheel"

    await sdk.nodes.install_succeeded(rid, "node-a", event_id, "llama-cpp-python 0.3.36 cpu")
    await sdk.nodes.install_started(rid, "node-b", event_id)
    status = await sdk.engines.install_status(rid)
    assert status["status"] == "installing"
    assert (await sdk.models.engine_registry.get(rid))["status"] == "installing"

    await sdk.nodes.install_succeeded(rid, "node-b", event_id, "llama-cpp-python 0.3.36 cuda")
    status = await sdk.engines.install_status(rid)
    assert status["status"] == "installed"
    assert status["summary"] == {"pending": 0, "installing": 0, "installed": 2, "error": 0}
    assert [n["engine_version"] for n in status["nodes"]] == [
        "llama-cpp-python 0.3.36 cpu", "llama-cpp-python 0.3.36 cuda"]
    assert (await sdk.models.engine_registry.get(rid))["status"] == "installed"


async def test_one_failed_node_makes_the_install_an_error(sdk: SDK) -> None:
    await _two_nodes(sdk)
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    await sdk.nodes.install_started(row["id"], "node-a", event_id)
    await sdk.nodes.install_failed(row["id"], "node-a", event_id, "cmake not found")
    status = await sdk.engines.install_status(row["id"])
    assert status["status"] == "error"
    assert status["nodes"][0]["last_error"] == "cmake not found"
    engine = await sdk.models.engine_registry.get(row["id"])
    assert engine["status"] == "error"
    assert "cmake not found" in engine["install_error"]
    # A new request starts over on every node.
    again = await sdk.engines.begin_install(row["id"], force=True)
    assert again["event"]["force"] is True
    assert again["status"]["summary"]["pending"] == 2
    assert again["status"]["nodes"][0]["last_error"] == ""


async def test_report_for_superseded_request_is_refused(sdk: SDK) -> None:
    await _two_nodes(sdk)
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    old = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    new = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    assert old != new
    with pytest.raises(Conflict, match="current request is"):
        await sdk.nodes.install_started(row["id"], "node-a", old)
    await sdk.nodes.install_started(row["id"], "node-a", new)


async def test_report_out_of_order_is_refused_with_state(sdk: SDK) -> None:
    await _two_nodes(sdk)
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    with pytest.raises(Conflict, match="it is pending; commands allowed while pending"):
        await sdk.nodes.install_succeeded(row["id"], "node-a", event_id, "v")


async def test_node_joining_later_gets_a_pending_row(sdk: SDK) -> None:
    await sdk.nodes.joined("node-a", {})
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    await sdk.nodes.joined("node-c", {"cpu_count": 8})
    nodes = (await sdk.engines.install_status(row["id"]))["nodes"]
    assert [(n["node_id"], n["status"], n["last_event_id"]) for n in nodes] == [
        ("node-a", "pending", event_id), ("node-c", "pending", event_id)]


async def test_lost_node_row_says_so_and_stops_counting(sdk: SDK) -> None:
    await _two_nodes(sdk)
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    await sdk.nodes.install_started(row["id"], "node-b", event_id)
    await sdk.nodes.install_started(row["id"], "node-a", event_id)
    await sdk.nodes.install_succeeded(row["id"], "node-a", event_id, "v")
    assert await sdk.nodes.lost("node-b", "worker terminated") is True
    status = await sdk.engines.install_status(row["id"])
    lost = next(n for n in status["nodes"] if n["node_id"] == "node-b")
    assert lost["alive"] is False
    assert "node lost: worker terminated" in lost["last_error"]
    assert status["summary"] == {"pending": 0, "installing": 0, "installed": 1, "error": 0}
    assert status["status"] == "installed"
    # An installed row of a lost node says so too, and a rejoin clears it.
    await sdk.nodes.lost("node-a", "maintenance")
    rows = {n["node_id"]: n for n in (await sdk.engines.install_status(row["id"]))["nodes"]}
    assert rows["node-a"]["status"] == "installed"
    assert rows["node-a"]["last_error"] == "node lost: maintenance"
    await sdk.nodes.joined("node-a", {})
    rows = {n["node_id"]: n for n in (await sdk.engines.install_status(row["id"]))["nodes"]}
    assert rows["node-a"]["last_error"] == "" and rows["node-a"]["alive"] is True
    assert (await sdk.audit.verify())["differences"] == []


async def test_request_install_by_provider_returns_the_event(sdk: SDK) -> None:
    with pytest.raises(NotFound, match=r"engine_registry\.create"):
        await sdk.engines.request_install("vllm")
    row = await sdk.models.engine_registry.create(provider="vllm", name="gpu")
    event = await sdk.engines.request_install("vllm", requested_by=WHO, task_id="t-9")
    assert set(event) >= EVENT_KEYS
    assert event["engine_id"] == "vllm"
    assert event["engine_registry_ids"] == [row["id"]]
    assert event["event_name"] == "engine.install.requested"
    assert event["task_id"] == "t-9"
    with pytest.raises(BadInput, match="known providers"):
        await sdk.engines.request_install("ollama")


async def test_begin_install_refuses_bad_force(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="vllm", name="gpu")
    with pytest.raises(BadInput, match="force must be true or false"):
        await sdk.engines.begin_install(row["id"], force="yes")  # type: ignore[arg-type]


async def test_every_event_says_who_asked_and_node_reports_carry_the_task(sdk: SDK) -> None:
    await sdk.nodes.joined("node-a", {})
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu",
                                                  requested_by=WHO)
    event_id = (await sdk.engines.begin_install(row["id"], requested_by=WHO,
                                                task_id="task-7"))["event"]["event_id"]
    await sdk.nodes.install_started(row["id"], "node-a", event_id)
    await sdk.nodes.install_succeeded(row["id"], "node-a", event_id, "v")
    await sdk.nodes.joined("node-late", {})
    events = await sdk.audit.events(limit=100_000)
    assert all(e["requested_by"] for e in events), [e["event_name"] for e in events
                                                    if not e["requested_by"]]
    assert all(e["timestamp"] for e in events)
    reports = [e for e in events if e["event_name"].startswith("node.install.")]
    assert {e["task_id"] for e in reports} == {"task-7"}
    started = next(e for e in reports if e["event_name"] == "node.install.started")
    assert started["requested_by"]["actor"] == "node:node-a"
    late = next(e for e in reports if e["node_id"] == "node-late")
    assert late["requested_by"] == {**WHO, "actor": "user"}
