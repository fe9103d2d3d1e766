"""The real engine: llama-cpp-python installed in package mode through the provisioner,
SmolLM2-135M served through the supervisor, a chat completion, a clean stop."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from engine_helpers import pid_alive

from engines.node import Node
from engines.plan import InstallRecord
from engines.registry import get_provider
from engines.supervisor import EngineState, Supervisor
from events.settings import Settings

pytestmark = pytest.mark.engine

llamacpp = get_provider("llamacpp")


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def test_package_install_is_ready_and_stamped(
    llamacpp_env: InstallRecord, llamacpp_node: Node
) -> None:
    assert llamacpp_env.mode == "package"
    assert llamacpp_env.python and Path(llamacpp_env.python).exists()
    assert llamacpp_env.engine_version.startswith("0.3.36+cpu")
    assert "GGML_NATIVE=OFF" in llamacpp_env.build_flags
    report = llamacpp.check_ready(llamacpp_node)
    assert report.ready, report
    assert report.engine_version == llamacpp_env.engine_version


def test_real_server_answers_a_chat_completion_and_stops_leaving_nothing(
    llamacpp_env: InstallRecord, llamacpp_node: Node, smollm2_path: Path
) -> None:
    prepared = llamacpp.prepare(smollm2_path, None, llamacpp_node, record=llamacpp_env)
    assert prepared.argv[:3] == [llamacpp_env.python, "-m", "llama_cpp.server"]
    sup = Supervisor(prepared, llamacpp_node.runtime_dir, ready_timeout_s=180)
    try:
        handoff = sup.start()
        assert handoff["engine_version"] == "0.3.36"  # from the running server
        assert handoff["provisioning_mode"] == "package"
        resp = httpx.post(
            handoff["url"] + "/v1/chat/completions",
            json={
                "model": prepared.model.id,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] > 0
        pid = sup.pid
        assert pid is not None
    finally:
        sup.stop()
    assert sup.state is EngineState.STOPPED
    assert not pid_alive(pid)
    assert _group_members(pid) == []
    assert not sup.handoff_path.exists()


def test_check_ready_after_the_engine_environment_is_deleted_by_hand(
    llamacpp_env: InstallRecord, tmp_path: Path
) -> None:
    # A second engine root on the same machine: the wheel comes from the cache.
    base = Settings.from_env()
    node = Node.local(
        Settings.from_env(engine_root=str(tmp_path / "root"), cache_dir=str(base.cache_path))
    )
    record = llamacpp.install(llamacpp.plan_install(None, node), settings=node.settings)
    assert record.wheel_from_cache and not record.reused
    assert llamacpp.check_ready(node).ready
    shutil.rmtree(Path(record.install_dir) / "env")
    report = llamacpp.check_ready(node)
    assert not report.ready
    assert report.missing_local[0]["dependency_key"] == "llama-cpp-python"
    assert "missing its python" in report.missing_local[0]["reason"]
    again = llamacpp.install(llamacpp.plan_install(None, node), settings=node.settings)
    assert not again.reused
    assert llamacpp.check_ready(node).ready
