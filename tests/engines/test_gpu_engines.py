"""GPU nodes only (skipped elsewhere): node detection and a real vLLM server.

The vLLM run installs ``vllm`` through the provisioner (needs its package index)
and serves the model directory named by ROUNDHOUSE_TEST_VLLM_MODEL (a small
Hugging Face-format model, e.g. SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from engines.node import Node, detect_node_facts
from engines.registry import get_provider
from engines.supervisor import Supervisor
from events.settings import Settings

pytestmark = pytest.mark.gpu


def test_gpu_node_reports_its_gpus_and_gets_a_cuda_plan(tmp_path: Path) -> None:
    facts = detect_node_facts("gpu-node")
    assert facts.gpus and facts.gpus[0].memory_bytes > 0
    node = Node(facts=facts, settings=Settings.from_env({}, engine_root=str(tmp_path)))
    plan = get_provider("llamacpp").plan_install({"n_gpu_layers": -1}, node)
    assert plan.cpu_fallback is False
    assert plan.gpu_backend == ("cuda" if facts.cuda_toolkit else "cpu")
    assert get_provider("vllm").is_supported(facts).supported


def test_vllm_package_install_serves_a_chat_completion(tmp_path: Path) -> None:
    model = os.environ.get("ROUNDHOUSE_TEST_VLLM_MODEL")
    if not model:
        pytest.skip("set ROUNDHOUSE_TEST_VLLM_MODEL to a local Hugging Face model directory")
    vllm = get_provider("vllm")
    base = Settings.from_env()
    node = Node.local(Settings.from_env(engine_root=str(tmp_path), cache_dir=str(base.cache_path)))
    cfg = {"gpu_memory_utilization": 0.5, "max_model_len": 2048}
    record = vllm.install(vllm.plan_install(cfg, node), settings=node.settings)
    assert vllm.check_ready(node, cfg).ready
    prepared = vllm.prepare(model, cfg, node, record=record)
    sup = Supervisor(prepared, node.runtime_dir, ready_timeout_s=900)
    try:
        handoff = sup.start()
        resp = httpx.post(
            handoff["url"] + "/v1/chat/completions",
            json={"model": prepared.model.id, "max_tokens": 8,
                  "messages": [{"role": "user", "content": "Say hello."}]},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        assert handoff["engine_version"]
    finally:
        sup.stop()
    assert sup.pid is None
