"""activation_requirements, activate_instance and deactivate_instance."""

from __future__ import annotations

from conftest import WHO

from cluster.client import SDK

REQ_KEYS = {"ready", "reason", "engine_registry_id", "provider", "provider_label", "supported",
            "requires_config", "missing_dependencies", "activation_message"}


async def _installed_llamacpp(sdk: SDK) -> int:
    await sdk.nodes.joined("node-a", {"cpu_count": 2})
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
    await sdk.nodes.install_started(row["id"], "node-a", event_id)
    await sdk.nodes.install_succeeded(row["id"], "node-a", event_id, "0.3.36 cpu")
    return int(row["id"])


async def test_missing_dependencies_are_derived_server_side(sdk: SDK) -> None:
    await sdk.nodes.joined("node-a", {"cpu_count": 2})
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    req = await sdk.engines.activation_requirements(row["id"])
    assert set(req) == REQ_KEYS
    assert req["ready"] is False
    assert req["reason"] == "missing_dependencies"
    assert req["provider_label"] == "llama.cpp"
    assert req["missing_dependencies"] == [
        {"dependency_key": "llama-cpp-python", "label": "llama-cpp-python[server]"}]
    assert "begin_install" in req["activation_message"]


async def test_missing_config_for_openai(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="openai", name="remote")
    req = await sdk.engines.activation_requirements(row["id"])
    assert req["reason"] == "missing_config"
    assert req["requires_config"] is True
    assert "base_url" in req["activation_message"] and "api_key" in req["activation_message"]
    assert req["missing_dependencies"] == []
    await sdk.models.engine_registry.update(
        row["id"], config={"base_url": "https://api.example.invalid/v1", "api_key": "sk"})
    req = await sdk.engines.activation_requirements(row["id"])
    assert req["ready"] is True and req["reason"] is None


async def test_vllm_is_unsupported_on_cpu_only_nodes(sdk: SDK) -> None:
    await sdk.nodes.joined("node-a", {"cpu_count": 2})
    row = await sdk.models.engine_registry.create(provider="vllm", name="gpu")
    req = await sdk.engines.activation_requirements(row["id"])
    assert req["reason"] == "unsupported"
    assert req["supported"] is False
    assert "CUDA GPU" in req["activation_message"]
    await sdk.nodes.joined("node-b", {"gpus": [{"index": 0, "name": "L4"}]})
    req = await sdk.engines.activation_requirements(row["id"])
    assert req["supported"] is True
    assert req["reason"] == "missing_dependencies"


async def test_activation_with_unmet_requirements_changes_nothing(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    before = await sdk.audit.events(limit=100_000)
    result = await sdk.engines.activate_instance(row["id"], requested_by=WHO)
    assert result["ready"] is False
    assert result["status"] == "registered"
    assert result["activation_ready"] is False
    assert await sdk.audit.events(limit=100_000) == before
    assert (await sdk.models.engine_registry.get(row["id"]))["status"] == "registered"


async def test_activate_and_deactivate(sdk: SDK) -> None:
    rid = await _installed_llamacpp(sdk)
    result = await sdk.engines.activate_instance(rid, requested_by=WHO)
    assert result == {
        "ready": True, "reason": None, "engine_registry_id": rid, "provider": "llamacpp",
        "status": "active", "supported": True, "activation_ready": True,
        "activation_message": "", "missing_dependencies": [],
    }
    row = await sdk.models.engine_registry.get(rid)
    assert row["status"] == "active" and row["supported"] is True
    # Activating again records nothing.
    count = len(await sdk.audit.events(limit=100_000))
    assert (await sdk.engines.activate_instance(rid))["status"] == "active"
    assert len(await sdk.audit.events(limit=100_000)) == count

    off = await sdk.engines.deactivate_instance(rid, requested_by=WHO)
    assert off["status"] == "installed" and off["deactivated"] is True
    assert (await sdk.models.engine_registry.get(rid))["status"] == "installed"
    again = await sdk.engines.deactivate_instance(rid)
    assert again["deactivated"] is False
    assert len(await sdk.audit.events(limit=100_000)) == count + 1
    activated = await sdk.audit.events(engine_registry_id=rid, event_name="engine.activated")
    assert activated[0]["requested_by"] == {**WHO, "actor": "user"}


async def test_check_runtime_config_and_provider_facts(sdk: SDK) -> None:
    bad = await sdk.engines.check_runtime_config("openai", {"api_key": "k"})
    assert bad == {"engine_id": "openai", "ready": False,
                   "message": "the OpenAI-compatible provider needs base_url; set it"}
    good = await sdk.engines.check_runtime_config(
        "openai", {"base_url": "http://127.0.0.1:1/v1", "api_key": "k"})
    assert good["ready"] is True
    wrong = await sdk.engines.check_runtime_config("llamacpp", {"n_gpu_layers": "all"})
    assert wrong["ready"] is False and "n_gpu_layers" in wrong["message"]
    reqs = await sdk.engines.provider_requirements("vllm")
    assert reqs["provider_label"] == "vLLM"
    assert reqs["dependencies"] == [{"dependency_key": "vllm", "label": "vllm", "scope": "local"}]
    assert "properties" in reqs["config_schema"]
    providers = await sdk.engines.list_providers()
    assert [(p["id"], p["label"]) for p in providers] == [
        ("llamacpp", "llama.cpp"), ("openai", "OpenAI-compatible"), ("vllm", "vLLM")]
