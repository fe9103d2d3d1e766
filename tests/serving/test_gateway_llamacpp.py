"""The gateway with the real llama.cpp engine and SmolLM2: the official openai client,
streamed and not; the model loads on the first request and unloading frees the process."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from serving_helpers import gateway_stack, pid_alive

from engines.node import Node
from engines.plan import InstallRecord

pytestmark = pytest.mark.engine


async def test_openai_client_gets_real_smollm2_answers_through_the_gateway(
        tmp_path: Path, llamacpp_env: InstallRecord, llamacpp_node: Node,
        smollm2_path: Path) -> None:
    async with gateway_stack(tmp_path, model_path=smollm2_path, node=llamacpp_node,
                             record=llamacpp_env.model_dump(mode="json")) as st:
        assert await st.serving.list_loaded_models() == []
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "Say hello."}]
        answer = await client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        assert answer.choices[0].message.content and answer.choices[0].message.content.strip()
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        rows = await st.serving.list_loaded_models()
        assert len(rows) == 1 and rows[0]["model"] == "smollm2"
        pid = int(rows[0]["pid"])
        assert pid_alive(pid) and rows[0]["model_path"] == str(smollm2_path)
        assert rows[0]["memory_bytes"] > 0
        stream = await client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
            stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]  # type: ignore[union-attr]
        assert len(pieces) > 1 and "".join(pieces).strip()
        assert st.serving.orchestrator.loads == 1
        result = await st.serving.unload_loaded_model(st.engine_id, st.model_id)
        assert result == {"status": "ok", "unloaded": True}
        assert not pid_alive(pid)
