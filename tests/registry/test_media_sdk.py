"""sdk.media and the model registry: artifacts recorded as events, resources estimated."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from media.servers import FakeRepo, serve_fake_hub, serve_files, smollm2_path

from actors.errors import BadInput, Conflict, DuplicateName, NotFound
from cluster.client import SDK, open_local
from events.settings import Settings

MIB = 1024 * 1024
Progress = list[tuple[str, int, int | None, int]]


@pytest.fixture
async def sdk(tmp_path: Path) -> AsyncIterator[SDK]:
    client = open_local(settings=Settings(home=tmp_path / "home"), node_id="head")
    await client.nodes.joined("node-a", {"cpu_count": 2, "memory_bytes": 8 << 30,
                                         "free_memory_bytes": 6 << 30})
    await client.nodes.joined("tiny", {"cpu_count": 1, "memory_bytes": 64 << 20,
                                       "free_memory_bytes": 32 << 20})
    try:
        yield client
    finally:
        await client.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _artifact_events(sdk: SDK) -> list[dict]:
    return await sdk.audit.events(event_name="model.artifact.stored")


async def test_local_source_registers_the_model_with_checksums(sdk: SDK) -> None:
    gguf = smollm2_path()
    calls: Progress = []
    ref = await sdk.media.add_model_from_source(
        "smollm2", {"type": "local", "path": str(gguf)}, progress=lambda *a: calls.append(a),
        display_name="SmolLM2 135M Instruct", requested_by={"user_id": 5})
    assert ref.startswith("smollm2@")
    [model] = await sdk.models.model_registry.list()
    assert model["name"] == "smollm2" and model["display_name"] == "SmolLM2 135M Instruct"
    assert model["format"] == "gguf" and model["engine_kinds"] == ["llamacpp"]
    artifact = model["artifact"]
    assert artifact["ref"] == ref
    assert artifact["files"] == [{"path": gguf.name, "sha256": _sha(gguf),
                                  "size": gguf.stat().st_size}]
    assert calls and calls[-1][1] == gguf.stat().st_size
    [event] = await _artifact_events(sdk)
    assert event["model_registry_id"] == model["id"]
    assert event["requested_by"]["user_id"] == 5
    resolved = await sdk.engines.resolve_model("smollm2")
    assert resolved["format"] == "gguf"


async def test_url_source_with_checksum(sdk: SDK) -> None:
    gguf = smollm2_path()
    body = gguf.read_bytes()
    with serve_files() as server:
        server.files["smol.gguf"] = body
        calls: Progress = []
        ref = await sdk.media.add_model_from_source(
            "smollm2-url", {"type": "url", "url": f"{server.url}/smol.gguf",
                            "sha256": hashlib.sha256(body).hexdigest()},
            progress=lambda *a: calls.append(a))
    model = (await sdk.models.model_registry.list())[0]
    assert model["artifact"]["ref"] == ref
    assert model["artifact"]["files"][0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert calls[-1][1] == len(body) and calls[-1][2] == len(body)


async def test_hub_source_through_huggingface_hub(sdk: SDK,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    body = smollm2_path().read_bytes()
    with serve_fake_hub() as hub:
        hub.repos["acme/smol"] = FakeRepo(files={"smol.Q4_1.gguf": body},
                                          lfs={"smol.Q4_1.gguf"})
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        calls: Progress = []
        ref = await sdk.media.add_model_from_source(
            "smollm2-hub", {"type": "huggingface", "repo": "acme/smol",
                            "filename": "smol.Q4_1.gguf", "token": "hf_secret"},
            progress=lambda *a: calls.append(a))
    model = (await sdk.models.model_registry.list())[0]
    assert model["artifact"]["ref"] == ref
    assert model["artifact"]["files"][0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert model["source"]["token_used"] is True and "token" not in model["source"]
    assert calls[-1][0] == "smol.Q4_1.gguf" and calls[-1][1] == len(body)
    events = await _artifact_events(sdk)
    assert "hf_secret" not in repr(events)


async def test_bad_checksum_and_traversal_register_nothing(sdk: SDK, tmp_path: Path) -> None:
    with serve_files() as server:
        server.files["m.gguf"] = b"GGUF" + b"\0" * 100
        with pytest.raises(BadInput, match="sha256"):
            await sdk.media.add_model_from_source(
                "bad", {"type": "url", "url": f"{server.url}/m.gguf", "sha256": "0" * 64})
    with pytest.raises(BadInput, match="not allowed"):
        await sdk.media.add_model_from_source(
            "../escape", {"type": "local", "path": str(smollm2_path())})
    with pytest.raises(BadInput, match="a url source needs sha256"):
        await sdk.media.add_model_from_source("nosum", {"type": "url", "url": "http://x/m"})
    assert await sdk.models.model_registry.list() == []
    assert await sdk.audit.events(event_name="model.registered") == []


async def test_model_registry_crud_and_bad_input(sdk: SDK) -> None:
    row = await sdk.models.model_registry.create(
        name="smol", source={"type": "local", "path": str(smollm2_path())})
    assert row["id"] == 1 and row["artifact"] is None and row["display_name"] == "smol"
    with pytest.raises(DuplicateName):
        await sdk.models.model_registry.create(name="smol", source={"type": "local", "path": "x"})
    with pytest.raises(BadInput, match=r"source\.type"):
        await sdk.models.model_registry.create(name="y", source={"type": "ftp"})
    with pytest.raises(BadInput, match="format"):
        await sdk.models.model_registry.create(name="y", source={"type": "local", "path": "x"},
                                               format="onnx")
    updated = await sdk.models.model_registry.update(row["id"], display_name="Smol")
    assert updated["display_name"] == "Smol"
    assert (await sdk.models.model_registry.delete(row["id"]))["deleted"] is True
    with pytest.raises(NotFound):
        await sdk.models.model_registry.get(row["id"])


async def test_evaluate_model_resources_matches_llamacpp_kv_sizes(sdk: SDK) -> None:
    row = await sdk.models.model_registry.create(
        name="smol", source={"type": "local", "path": str(smollm2_path())})
    small = await sdk.engines.evaluate_model_resources(row["id"], 512)
    large = await sdk.engines.evaluate_model_resources(row["id"], 2048)
    for key in ("weights_bytes", "kv_cache_bytes", "compute_bytes", "vram_bytes", "ram_bytes",
                "nodes"):
        assert key in small
    # What llama.cpp itself reports when it loads SmolLM2-135M with an f16 cache.
    assert small["kv_cache_bytes"] == pytest.approx(11.25 * MIB, rel=0.01)
    assert large["kv_cache_bytes"] == pytest.approx(45.00 * MIB, rel=0.01)
    assert small["vram_bytes"] == 0  # CPU only by default
    fits = {n["node_id"]: n["fits"] for n in large["nodes"]}
    assert fits == {"node-a": True, "tiny": False}
    offloaded = await sdk.engines.evaluate_model_resources(row["id"], 2048,
                                                           {"gpu_layers": 30})
    assert offloaded["vram_bytes"] > 0
    with pytest.raises(BadInput, match="context_length"):
        await sdk.engines.evaluate_model_resources(row["id"], 0)


async def test_plan_runtime_falls_back_to_cpu_and_refuses_what_fits_nowhere(sdk: SDK) -> None:
    row = await sdk.models.model_registry.create(
        name="smol", source={"type": "local", "path": str(smollm2_path())})
    plan = await sdk.engines.plan_runtime(row["id"], device="cuda", context_length=1024)
    assert plan["device"] == "cpu" and plan["gpu_layers"] == 0
    assert plan["fallback"] and "GPU" in plan["fallback"]
    assert plan["node_id"] == "node-a"
    with pytest.raises(Conflict, match="tiny"):
        await sdk.engines.plan_runtime(row["id"], context_length=8192, node_id="tiny")
    with pytest.raises(Conflict, match="trained for"):
        await sdk.engines.plan_runtime(row["id"], context_length=1_000_000)


async def test_model_without_weights_cannot_be_estimated(sdk: SDK) -> None:
    row = await sdk.models.model_registry.create(
        name="remote", source={"type": "huggingface", "repo": "acme/x"})
    with pytest.raises(Conflict, match="add_model_from_source"):
        await sdk.engines.evaluate_model_resources(row["id"], 512)
