"""The Ray layer on a simulated cluster: a head and two workers (one declaring a GPU).

One module-scoped cluster; the tests run in file order and the last one changes
the cluster's membership. Installs are real: llama.cpp in package mode from the
cached wheel (the ``llamacpp_env`` fixture makes sure it is cached), one engine
root per simulated node.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster
from ray_helpers import environment, ray_test_env, wait_for

from actors.errors import RoundhouseError
from actors.handles import NAMESPACE, agent_name, control_plane_handle
from cluster.bootstrap import start
from cluster.client import SDK, open_local
from engines.plan import InstallRecord

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


class SimCluster:
    def __init__(self, cluster: Cluster, head_id: str, cpu_worker: Any, gpu_worker: Any) -> None:
        self.cluster = cluster
        self.head_id = head_id
        self.cpu_worker = cpu_worker
        self.gpu_worker = gpu_worker

    def node_ids(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory,
        llamacpp_env: InstallRecord) -> Iterator[SimCluster]:
    home = tmp_path_factory.mktemp("ray-home")
    with environment(ray_test_env(home)):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cpu_worker = cluster.add_node(num_cpus=1)
            gpu_worker = cluster.add_node(num_cpus=1, num_gpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            head_id = ray.get_runtime_context().get_node_id()
            yield SimCluster(cluster, head_id, cpu_worker, gpu_worker)
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
async def sdk(sim: SimCluster) -> AsyncIterator[SDK]:
    client = start(sim.cluster.address).sdk()

    async def joined() -> bool:
        alive = {n["node_id"] for n in await client.nodes.list() if n["alive"]}
        return alive == sim.node_ids()

    await wait_for(joined, "every node's agent to report its facts")
    yield client
    await client.close()


async def _engine(sdk: SDK, name: str) -> int:
    rows = [r for r in await sdk.models.engine_registry.list() if r["name"] == name]
    assert rows, f"engine {name} was not created by an earlier test"
    return int(rows[0]["id"])


async def _events(sdk: SDK, rid: int, name: str) -> list[dict[str, Any]]:
    return await sdk.audit.events(engine_registry_id=rid, event_name=name, limit=100_000)


async def test_agents_report_node_facts_with_gpu_resources(sdk: SDK, sim: SimCluster) -> None:
    nodes = {n["node_id"]: n for n in await sdk.nodes.list()}
    assert set(nodes) == sim.node_ids()
    gpu_id = sim.gpu_worker.node_id
    assert nodes[gpu_id]["facts"]["ray_resources"]["GPU"] == 1
    for node in nodes.values():
        facts = node["facts"]
        assert facts["cpu_count"] > 0 and facts["memory_bytes"] > 0
        assert facts["disk_free_bytes"] > 0 and facts["python"] and facts["os"]
    assert sorted(ray.get(control_plane_handle().agents.remote())) == sorted(sim.node_ids())


async def test_one_install_request_gives_one_row_per_node(sdk: SDK, sim: SimCluster) -> None:
    row = await sdk.models.engine_registry.create("llamacpp", "fanout")
    await sdk.engines.begin_install(row["id"])
    summaries: list[tuple[int, ...]] = []
    states: dict[str, list[str]] = {}

    async def settled() -> dict[str, Any] | None:
        status = await sdk.engines.install_status(row["id"])
        summary = tuple(status["summary"].values())
        if not summaries or summaries[-1] != summary:
            summaries.append(summary)
        for node in status["nodes"]:
            seen = states.setdefault(node["node_id"], [])
            if not seen or seen[-1] != node["status"]:
                seen.append(node["status"])
        return status if status["status"] in ("installed", "error") else None

    status = await wait_for(settled, "the install to settle on every node", 300, 0.05)
    assert status["status"] == "installed", status
    assert {n["node_id"] for n in status["nodes"]} == sim.node_ids()
    assert status["summary"]["installed"] == 3
    assert len(summaries) >= 2, "the summary never changed while the install ran"
    for events_name in ("node.install.started", "node.install.succeeded"):
        events = await _events(sdk, row["id"], events_name)
        assert sorted(e["node_id"] for e in events) == sorted(sim.node_ids()), events_name
    for node_id, seen in states.items():
        assert seen[-1] == "installed", (node_id, seen)
    records = ray.get(ray.get_actor(agent_name(sim.gpu_worker.node_id),
                                    namespace=NAMESPACE).install_records.remote())
    assert records[row["id"]]["engine_version"] == status["nodes"][0]["engine_version"]
    assert sim.gpu_worker.node_id in records[row["id"]]["install_dir"]


async def test_check_ready_and_support_per_node(sdk: SDK, sim: SimCluster) -> None:
    rid = await _engine(sdk, "fanout")
    ready = await sdk.engines.check_ready(rid)
    assert ready["ready"] is True, ready
    assert {n["node_id"] for n in ready["nodes"]} == sim.node_ids()
    support = await sdk.engines.is_supported(rid)
    assert support["supported"] and all(n["supported"] for n in support["nodes"])
    synced = await sdk.engines.sync_runtime()
    assert {n["node_id"] for n in synced["nodes"]} == sim.node_ids()
    assert all(n["started"] == [] for n in synced["nodes"])  # nothing left to do


async def test_killed_agent_restarts_and_the_install_converges(sdk: SDK,
                                                              sim: SimCluster) -> None:
    rid = await _engine(sdk, "fanout")
    victim = sim.cpu_worker.node_id
    agent = ray.get_actor(agent_name(victim), namespace=NAMESPACE)
    old_pid = ray.get(agent.info.remote())["pid"]
    begun = await sdk.engines.begin_install(rid, force=True)
    request = begun["event"]["event_id"]

    async def mid_install() -> bool:
        status = await sdk.engines.install_status(rid)
        row = next(n for n in status["nodes"] if n["node_id"] == victim)
        assert row["status"] != "installed", "the install finished before it could be killed"
        return row["status"] == "installing" and row["message"].startswith("verify")

    await wait_for(mid_install, "the victim's install to reach its verify step", 120, 0.02)
    os.kill(old_pid, signal.SIGKILL)

    async def installed() -> dict[str, Any] | None:
        status = await sdk.engines.install_status(rid)
        return status if status["status"] in ("installed", "error") else None

    status = await wait_for(installed, "the install to converge after the kill", 180)
    assert status["status"] == "installed", status
    new_pid = ray.get(agent.info.remote())["pid"]
    assert new_pid != old_pid
    succeeded = [e for e in await _events(sdk, rid, "node.install.succeeded")
                 if e["data"]["request_event_id"] == request]
    assert sorted(e["node_id"] for e in succeeded) == sorted(sim.node_ids())


async def test_killed_control_plane_comes_back_with_the_same_state(sdk: SDK,
                                                                   sim: SimCluster) -> None:
    rid = await _engine(sdk, "fanout")
    before_events = await sdk.audit.events(limit=1_000_000)
    before_engines = await sdk.models.engine_registry.list()
    before_status = await sdk.engines.install_status(rid)
    handle = control_plane_handle()
    old_pid = ray.get(handle.ping.remote())["pid"]
    os.kill(old_pid, signal.SIGKILL)

    assert await sdk.models.engine_registry.list() == before_engines  # waits for the restart
    assert ray.get(handle.ping.remote())["pid"] != old_pid
    after_events = await sdk.audit.events(limit=1_000_000)
    assert [e["position"] for e in after_events] == [e["position"] for e in before_events]
    assert await sdk.engines.install_status(rid) == before_status
    assert not (await sdk.audit.verify())["differences"]

    # The restarted control plane still drives the agents.
    remote = await sdk.models.engine_registry.create(
        "openai", "after-restart", {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"})
    await sdk.engines.begin_install(remote["id"])

    async def installed() -> bool:
        status = await sdk.engines.install_status(remote["id"])
        return status["status"] == "installed" and len(status["nodes"]) == 3

    await wait_for(installed, "the remote engine to install on every node", 60)


CASES = [
    ("unknown provider", lambda s: s.models.engine_registry.create("nope", "x")),
    ("empty name", lambda s: s.models.engine_registry.create("openai", " ")),
    ("bad config", lambda s: s.models.engine_registry.create("llamacpp", "b", {"bogus": 1})),
    ("missing row", lambda s: s.models.engine_registry.get(99_999)),
    ("lifecycle field", lambda s: s.models.engine_registry.update(99_999, status="active")),
    ("bad id", lambda s: s.engines.begin_install("forty-two")),
    ("missing install", lambda s: s.engines.install_status(99_999)),
    ("missing model", lambda s: s.models.model_registry.get(99_999)),
]


@pytest.mark.parametrize(("case", "call"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_gets_the_same_error_as_in_process(sdk: SDK, tmp_path: Path,
                                                           case: str, call: Any) -> None:
    local = open_local(tmp_path / "local")
    try:
        with pytest.raises(RoundhouseError) as in_process:
            await call(local)
    finally:
        await local.close()
    with pytest.raises(RoundhouseError) as through_ray:
        await call(sdk)
    assert type(through_ray.value) is type(in_process.value)
    assert str(through_ray.value) == str(in_process.value)
    assert "Traceback" not in str(through_ray.value) and "ray::" not in str(through_ray.value)


async def test_subscribers_hear_every_change(sdk: SDK) -> None:
    class Listener:
        def __init__(self) -> None:
            self.heard: list[tuple[str, dict[str, Any]]] = []

        def notify(self, kind: str, detail: dict[str, Any]) -> None:
            self.heard.append((kind, detail))

        def kinds(self) -> list[str]:
            return [k for k, _ in self.heard]

    listener = ray.remote(Listener).options(name="test-listener", namespace=NAMESPACE,
                                            num_cpus=0).remote()
    control = control_plane_handle()
    assert ray.get(control.subscribe.remote("test-listener", NAMESPACE))
    row = await sdk.models.engine_registry.create("openai", "heard", {})

    async def heard() -> bool:
        return "engine.registered" in ray.get(listener.kinds.remote())

    await wait_for(heard, "the listener to hear engine.registered", 30)
    assert row["id"]
    with pytest.raises(RoundhouseError, match="no actor named"):
        ray.get(control.subscribe.remote("nobody", NAMESPACE))
    assert ray.get(control.unsubscribe.remote("test-listener", NAMESPACE))
    ray.kill(listener)


async def test_removed_node_is_lost_and_a_new_node_installs(sdk: SDK, sim: SimCluster) -> None:
    rid = await _engine(sdk, "fanout")
    gone = sim.gpu_worker.node_id
    sim.cluster.remove_node(sim.gpu_worker)

    async def lost() -> dict[str, Any] | None:
        nodes = {n["node_id"]: n for n in await sdk.nodes.list()}
        return nodes[gone] if nodes[gone]["alive"] is False else None

    node = await wait_for(lost, "the removed node to be recorded as lost", 90)
    assert "left the Ray cluster" in node["lost_reason"]
    status = await sdk.engines.install_status(rid)
    row = next(n for n in status["nodes"] if n["node_id"] == gone)
    assert row["alive"] is False
    assert row["last_error"].startswith("node lost: ")
    assert status["status"] == "installed"  # lost rows do not count
    assert gone not in ray.get(control_plane_handle().agents.remote())

    newcomer = sim.cluster.add_node(num_cpus=1)
    sim.cluster.wait_for_nodes()

    async def installed_there() -> bool:
        for engine in ("fanout", "after-restart"):
            status = await sdk.engines.install_status(await _engine(sdk, engine))
            rows = {n["node_id"]: n for n in status["nodes"]}
            if rows.get(newcomer.node_id, {}).get("status") != "installed":
                return False
        return True

    await wait_for(installed_there, "the new node to install every engine", 180)
