"""A model stored in the shared artifact store is materialized in the node's model cache
(sha256-verified) before its engine starts, and the runtime row names that local copy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import openai
import pytest
from serving_helpers import gateway_stack

from engines.node import Node
from engines.plan import InstallRecord

pytestmark = pytest.mark.engine


async def test_stored_artifact_is_materialized_on_the_node_before_loading(
        tmp_path: Path, llamacpp_env: InstallRecord, llamacpp_node: Node,
        smollm2_path: Path) -> None:
    node = Node(facts=llamacpp_node.facts, settings=llamacpp_node.settings.model_copy(update={
        "artifact_store": str(tmp_path / "home" / "artifacts"),
        "models_dir": str(tmp_path / "node-models"),
        "materialize_mode": "copy",
    }))
    async with gateway_stack(tmp_path, model_path=smollm2_path, node=node,
                             record=llamacpp_env.model_dump(mode="json")) as st:
        ref = await st.sdk.media.add_model_from_source(
            "smollm2", {"type": "local", "path": str(smollm2_path)})
        assert not (tmp_path / "node-models").exists()  # nothing on the node until a load
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused")
        answer = await client.completions.create(model="smollm2", prompt="Hello",
                                                 max_tokens=4, temperature=0)
        assert answer.choices[0].text is not None
        [row] = await st.serving.list_loaded_models()
        local = Path(row["model_path"])
        assert local.is_relative_to(tmp_path / "node-models")
        assert local != smollm2_path
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        assert digest == hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
        assert ref.split("@")[0] == "smollm2"
