"""On Ray: the gateway replica and a runtime application pinned to the node that has
llama.cpp installed (by its node agent), SmolLM2 answering the openai client."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from serving_helpers import free_port, pid_alive

from events.settings import Settings

pytestmark = [pytest.mark.ray, pytest.mark.engine]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster import bootstrap

    home = tmp_path_factory.mktemp("rh-home")
    settings = Settings.from_env(home=str(home), gateway_port=free_port(),
                                 cache_dir=str(Settings.from_env().cache_path),
                                 api_token="ray-test-token")
    cluster = bootstrap.start(None, settings, num_cpus=2)
    try:
        yield cluster
    finally:
        from cluster.serve_gateway import stop_gateway

        stop_gateway()
        bootstrap.stop(cluster, remove_control_plane=True)


async def test_runtime_is_a_pinned_serve_app_and_answers_through_the_gateway(
        ray_cluster: object, smollm2_path: Path) -> None:
    from ray import serve

    from cluster.serve_gateway import GatewayServing, start_gateway

    cluster = ray_cluster
    sdk = cluster.sdk()  # type: ignore[attr-defined]
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    await sdk.engines.begin_install(row["id"])
    deadline = time.monotonic() + 300
    while (await sdk.engines.install_status(row["id"]))["status"] != "installed":
        assert time.monotonic() < deadline, await sdk.engines.install_status(row["id"])
        await asyncio.sleep(0.5)
    assert (await sdk.engines.activate_instance(row["id"]))["status"] == "active"
    await sdk.models.model_registry.create(
        name="smollm2", source={"type": "local", "path": str(smollm2_path)})
    assert not hasattr(sdk, "ai")  # no gateway yet: no serving methods
    url = await asyncio.to_thread(start_gateway, cluster.settings)  # type: ignore[attr-defined]
    serving = GatewayServing()
    assert await serving.call("list_loaded_models") == []
    served = cluster.sdk()  # type: ignore[attr-defined]
    provider = await served.ai.get_provider_by_model_registry_id(1)
    assert await served.engines.list_loaded_models() == []  # the handle loads nothing
    synced = await served.engines.sync_runtime()
    assert synced["runtime"] == {"status": "ok", "removed_apps": [], "marked_unloaded": []}
    assert await served.engines.list_loaded_models() == []  # sync never preloads
    assert provider.model == "smollm2"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    answer = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    rows = await serving.call("list_loaded_models")
    assert len(rows) == 1 and rows[0]["app_name"] == "runtime-1-1"
    nodes = [n["node_id"] for n in await sdk.nodes.list()]
    assert rows[0]["node_id"] in nodes
    assert "runtime-1-1" in serve.status().applications
    pid = int(rows[0]["pid"])
    assert pid_alive(pid)
    assert await serving.call("unload_loaded_model", 1, 1) == {"status": "ok", "unloaded": True}
    assert "runtime-1-1" not in serve.status().applications
    assert not pid_alive(pid)
