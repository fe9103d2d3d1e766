"""The SDK's node methods in-process (open_local): this process plays its own node."""

from __future__ import annotations

import socket
from pathlib import Path

from cluster.client import open_local


async def test_in_process_sync_runtime_installs_and_node_checks_answer(tmp_path: Path) -> None:
    sdk = open_local(tmp_path / "home", node_id="local-node")
    try:
        assert await sdk.nodes.joined("local-node", {"hostname": socket.gethostname()})
        row = await sdk.models.engine_registry.create(
            "openai", "remote", {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"})
        await sdk.engines.begin_install(row["id"])
        synced = await sdk.engines.sync_runtime()
        assert synced["nodes"][0]["started"] == [row["id"]]
        assert (await sdk.engines.install_status(row["id"]))["status"] == "installed"
        support = await sdk.engines.is_supported(row["id"])
        assert support["supported"] and support["nodes"][0]["node_id"] == "local-node"
        ready = await sdk.engines.check_ready(row["id"])
        assert ready["ready"] is False  # nothing answers on port 9
        assert "GET http://127.0.0.1:9/v1/models" in ready["nodes"][0]["missing_shared"][0][
            "reason"]
    finally:
        await sdk.close()
