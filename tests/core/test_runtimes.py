"""ModelRuntime events through the control plane: the loaded-models view follows them."""

from __future__ import annotations

import pytest
from conftest import WHO

from actors.errors import BadInput
from cluster.client import SDK, LocalBackend


async def _setup(sdk: SDK) -> tuple[int, int]:
    engine = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    model = await sdk.models.model_registry.create(
        name="smol", display_name="Smol", source={"type": "local", "path": "/models/s.gguf"},
        keep_alive_s=30)
    return int(engine["id"]), int(model["id"])


async def test_load_restart_unload_shape_the_loaded_models_view(sdk: SDK) -> None:
    backend = sdk._backend
    assert isinstance(backend, LocalBackend)
    plane = backend.control_plane
    eid, mid = await _setup(sdk)
    plane.record_load_requested(eid, mid, "node-a", requested_by=WHO, task_id="job-1")
    [row] = plane.list_loaded_models()
    assert row["status"] == "loading" and row["pid"] is None
    plane.record_loaded(eid, mid, "node-a", 4242, "/cache/s.gguf", 200 << 20,
                        "http://127.0.0.1:9000", "runtime-1-1")
    [row] = plane.list_loaded_models(eid)
    assert {k: row[k] for k in ("engine_row_id", "engine_id", "status", "pid", "model",
                                "model_path", "model_registry_id", "model_registry_name",
                                "model_display_name", "node_id", "memory_bytes")} == {
        "engine_row_id": eid, "engine_id": "llamacpp", "status": "loaded", "pid": 4242,
        "model": "smol", "model_path": "/cache/s.gguf", "model_registry_id": mid,
        "model_registry_name": "smol", "model_display_name": "Smol", "node_id": "node-a",
        "memory_bytes": 200 << 20}
    assert plane.record_runtime_restarted(eid, mid, "node-a", 4243) is True
    assert plane.record_runtime_restarted(eid, mid, "node-a", 4243) is False  # no-op
    assert plane.list_loaded_models()[0]["pid"] == 4243
    assert plane.record_unloaded(eid, mid, "node-a", "idle") is True
    assert plane.list_loaded_models() == []
    assert plane.record_unloaded(eid, mid, "node-a", "idle") is False
    names = [e["event_name"] for e in await sdk.audit.events(model_registry_id=mid)]
    assert names[-4:] == ["model.load.requested", "model.loaded", "model.restarted",
                          "model.unloaded"]
    assert (await sdk.audit.verify())["differences"] == []


async def test_unknown_unload_reason_is_refused(sdk: SDK) -> None:
    backend = sdk._backend
    assert isinstance(backend, LocalBackend)
    eid, mid = await _setup(sdk)
    backend.control_plane.record_load_requested(eid, mid, "node-a")
    with pytest.raises(BadInput, match="user, idle, stop_engine"):
        backend.control_plane.record_unloaded(eid, mid, "node-a", "bored")


async def test_keep_alive_is_a_model_setting(sdk: SDK) -> None:
    _, mid = await _setup(sdk)
    assert (await sdk.models.model_registry.get(mid))["keep_alive_s"] == 30
    assert (await sdk.models.model_registry.update(mid, keep_alive_s=-1))["keep_alive_s"] == -1
    with pytest.raises(BadInput, match="keep_alive_s"):
        await sdk.models.model_registry.update(mid, keep_alive_s=-5)
    with pytest.raises(BadInput, match="keep_alive_s"):
        await sdk.models.model_registry.create(name="x", source={"type": "local", "path": "p"},
                                               keep_alive_s="forever")  # type: ignore[arg-type]
