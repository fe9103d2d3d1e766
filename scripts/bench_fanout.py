"""Install fan-out on simulated Ray nodes: how fast does one request reach every node?

For 1, 2 and 4 simulated nodes (``ray.cluster_utils.Cluster`` on this machine,
one engine root per node, llama.cpp from the cached wheel) it prints, in one run:

- ``to installing``: from ``begin_install`` returning to every node's row showing
  ``installing`` (its ``node.install.started`` event), and
- ``to installed``: to every node's row ``installed``, for an already-cached
  install (the same config installed once before, so each node finds it and
  records success),

both as seen by a client polling ``install_status`` and as recorded in the event
log (timestamps of the request and of each node's events), median of the trials;
then the control-plane round trip (p50/p99) of a query (``install_status``).

    .venv/bin/python scripts/bench_fanout.py [--trials 5] [--nodes 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import datetime
from typing import Any

import ray
from ray.cluster_utils import Cluster

from actors.handles import NAMESPACE
from cluster.bootstrap import start
from cluster.client import SDK
from events.settings import Settings


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def _wait(sdk: SDK, rid: int, n: int, want: set[str], timeout: float = 600) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        status = await sdk.engines.install_status(rid)
        rows = [r for r in status["nodes"] if r["alive"]]
        if len(rows) == n and all(r["status"] in want for r in rows):
            return time.perf_counter()
        if any(r["status"] == "error" for r in rows):
            raise RuntimeError(f"install failed: {status}")
        await asyncio.sleep(0.005)
    raise TimeoutError(f"rows did not reach {want}")


async def _trial(sdk: SDK, rid: int, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    begun = await sdk.engines.begin_install(rid)
    t1 = time.perf_counter()
    t_installing = await _wait(sdk, rid, n, {"installing", "installed"})
    t_installed = await _wait(sdk, rid, n, {"installed"})
    request = begun["event"]["event_id"]
    events = await sdk.audit.events(engine_registry_id=rid, limit=1_000_000)
    requested = next(_ts(e["timestamp"]) for e in events
                     if e["event_name"] == "engine.install.requested"
                     and e["data"]["event_id"] == request)
    mine = [e for e in events if e["data"].get("request_event_id") == request]
    started = max(_ts(e["timestamp"]) for e in mine
                  if e["event_name"] == "node.install.started")
    succeeded = max(_ts(e["timestamp"]) for e in mine
                    if e["event_name"] == "node.install.succeeded")
    return {
        "client_installing_ms": (t_installing - t1) * 1000,
        "client_installed_ms": (t_installed - t1) * 1000,
        "log_installing_ms": (started - requested) * 1000,
        "log_installed_ms": (succeeded - requested) * 1000,
        "begin_install_ms": (t1 - t0) * 1000,
    }


async def _measure(address: str, n: int, trials: int, queries: int) -> dict[str, Any]:
    sdk = start(address).sdk()
    deadline = time.perf_counter() + 120
    while len([x for x in await sdk.nodes.list() if x["alive"]]) < n:
        if time.perf_counter() > deadline:
            raise TimeoutError("agents did not join")
        await asyncio.sleep(0.1)
    row = await sdk.models.engine_registry.create("llamacpp", f"bench-{n}")
    rid = row["id"]
    await sdk.engines.begin_install(rid)
    await _wait(sdk, rid, n, {"installed"})  # warm-up: the cold install, not measured
    results = [await _trial(sdk, rid, n) for _ in range(trials)]
    rtts = []
    for _ in range(queries):
        t = time.perf_counter()
        await sdk.engines.install_status(rid)
        rtts.append((time.perf_counter() - t) * 1000)
    rtts.sort()
    out: dict[str, Any] = {k: statistics.median(r[k] for r in results) for k in results[0]}
    out["rtt_p50_ms"] = rtts[len(rtts) // 2]
    out["rtt_p99_ms"] = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
    return out


def run_one(n: int, trials: int, queries: int) -> dict[str, Any]:
    home = tempfile.mkdtemp(prefix="rh-bench-")
    os.environ.update({
        "ROUNDHOUSE_HOME": home,
        "ROUNDHOUSE_ENGINE_ROOT_PER_NODE": "true",
        "ROUNDHOUSE_CACHE_DIR": str(Settings.from_env().cache_path),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    })
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(n - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False,
                 logging_level="ERROR")
        return asyncio.run(_measure(cluster.address, n, trials, queries))
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description="install fan-out on simulated Ray nodes")
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    rows = [(int(n), run_one(int(n), args.trials, args.queries))
            for n in args.nodes.split(",")]
    print(f"\ninstall fan-out, median of {args.trials} trials (cached llama.cpp install; "
          f"{os.cpu_count()} cores)")
    print(f"{'nodes':>5} {'to installing':>14} {'(log)':>8} {'to installed':>13} {'(log)':>8} "
          f"{'begin_install':>14} {'query p50':>10} {'p99':>8}")
    for n, r in rows:
        print(f"{n:>5} {r['client_installing_ms']:>11.0f} ms {r['log_installing_ms']:>5.0f} ms "
              f"{r['client_installed_ms']:>10.0f} ms {r['log_installed_ms']:>5.0f} ms "
              f"{r['begin_install_ms']:>11.1f} ms {r['rtt_p50_ms']:>7.2f} ms "
              f"{r['rtt_p99_ms']:>5.2f} ms")
    base = rows[0][1]["client_installing_ms"]
    for n, r in rows[1:]:
        print(f"to installing at {n} nodes / at {rows[0][0]}: "
              f"{r['client_installing_ms'] / base:.2f}x")


if __name__ == "__main__":
    main()
