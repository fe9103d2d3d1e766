"""Serving on a simulated cluster (a head and two workers): the engine is installable on one
worker only — the head and the other worker forbid package installs by node policy
(``ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS=false`` in their environment), so their installs fail
for real — and the runtime lands on the worker that has it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import ray
from ray.cluster_utils import Cluster
from raylayer.ray_helpers import environment, ray_test_env, wait_for
from serving_helpers import free_port

from actors.handles import NAMESPACE
from engines.plan import InstallRecord
from events.settings import Settings

pytestmark = [pytest.mark.ray, pytest.mark.engine, pytest.mark.timeout(600)]

NO_PACKAGES = {"ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS": "false"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory,
        llamacpp_env: InstallRecord) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("serving-home")
    values = {**ray_test_env(home), "ROUNDHOUSE_GATEWAY_PORT": str(free_port()),
              "ROUNDHOUSE_API_TOKEN": "multinode-token"}
    with environment(values):
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 1, "env_vars": NO_PACKAGES})
        try:
            refusing = cluster.add_node(num_cpus=1, env_vars=NO_PACKAGES)
            target = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            yield {"cluster": cluster, "refusing": refusing.node_id, "target": target.node_id,
                   "settings": Settings.from_env()}
        finally:
            from cluster.serve_gateway import stop_gateway

            if ray.is_initialized():
                stop_gateway()
                from cluster.bootstrap import stop

                stop(None, remove_control_plane=True)
                ray.shutdown()
            cluster.shutdown()


def _replica_nodes(app: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if app in (a.class_name or "")}


async def test_runtime_lands_on_the_only_node_with_the_engine(sim: dict[str, Any],
                                                               smollm2_path: Path) -> None:
    from cluster.bootstrap import start
    from cluster.serve_gateway import start_gateway

    cluster = start(sim["cluster"].address, sim["settings"])
    sdk = cluster.sdk()

    async def joined() -> bool:
        return sum(n["alive"] for n in await sdk.nodes.list()) == 3

    await wait_for(joined, "the three agents to report")
    row = await sdk.models.engine_registry.create("llamacpp", "only-one-node")
    await sdk.engines.begin_install(row["id"])

    async def settled() -> dict[str, Any] | None:
        status = await sdk.engines.install_status(row["id"])
        done = [n for n in status["nodes"] if n["status"] in ("installed", "error")]
        return status if len(done) == 3 else None

    status = await wait_for(settled, "the install to settle on every node", 300)
    by_node = {n["node_id"]: n for n in status["nodes"]}
    assert by_node[sim["target"]]["status"] == "installed", status
    refused = [n for n in status["nodes"] if n["node_id"] != sim["target"]]
    assert all(n["status"] == "error" and "ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS" in n["last_error"]
               for n in refused), refused
    activated = await sdk.engines.activate_instance(row["id"])
    assert activated["status"] == "active", activated
    await sdk.media.add_model_from_source("smollm2", {"type": "local",
                                                      "path": str(smollm2_path)})

    url = await asyncio.to_thread(start_gateway, cluster.settings)
    served = cluster.sdk()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                timeout=240)
    answer = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0)
    assert answer.choices[0].message.content
    rows = await served.engines.list_loaded_models()
    assert [r["node_id"] for r in rows] == [sim["target"]]
    app = rows[0]["app_name"]
    assert _replica_nodes(app) == {sim["target"]}
    assert (await served.engines.unload_loaded_model(row["id"], rows[0]["model_registry_id"])
            ) == {"status": "ok", "unloaded": True}
