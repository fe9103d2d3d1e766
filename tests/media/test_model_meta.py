"""GGUF and safetensors metadata: SmolLM2 itself, tiny written files, and broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.gguf_meta import (
    ModelMetadataError,
    read_gguf_meta,
    read_model_meta,
    read_safetensors_meta,
)
from media.model_files import write_hf_model_dir, write_safetensors, write_tiny_gguf


def test_smollm2_gguf_metadata(smollm2: Path):
    meta = read_gguf_meta(smollm2)
    assert meta.format == "gguf"
    assert meta.architecture == "llama"
    assert (meta.n_layers, meta.n_heads, meta.n_kv_heads) == (30, 9, 3)
    assert (meta.head_dim_k, meta.head_dim_v) == (64, 64)  # 576 / 9
    assert meta.context_length == 8192
    assert meta.embedding_length == 576
    assert meta.feed_forward_length == 1536
    assert meta.vocab_size == 49152
    assert meta.file_type == "MOSTLY_Q4_1"
    assert len(meta.layer_bytes) == 30 and len(set(meta.layer_bytes)) == 1
    assert meta.tensor_bytes == sum(meta.layer_bytes) + meta.other_bytes
    # llama.cpp logs "CPU_Mapped model buffer size = 92.10 MiB" for this file.
    assert meta.tensor_bytes / 2**20 == pytest.approx(92.10, abs=0.01)
    assert meta.tensor_bytes < meta.file_bytes  # the file also holds header and vocabulary
    assert meta.extra["tied_output"] is True  # no output.weight: the head reuses token_embd
    assert meta.extra["tokenizer_tokens"] == 49152
    assert meta.to_dict()["layer_bytes"][0] == meta.layer_bytes[0]


def test_tiny_gguf_with_explicit_head_dims_and_per_layer_kv_heads(tmp_path: Path):
    path = write_tiny_gguf(
        tmp_path / "t.gguf", n_layers=3, n_kv_heads=[1, 2, 4], key_length=24, value_length=8,
        tied=False,
    )  # fmt: skip
    meta = read_gguf_meta(path)
    assert meta.kv_heads_per_layer == (1, 2, 4)
    assert meta.n_kv_heads == 4
    assert (meta.head_dim_k, meta.head_dim_v) == (24, 8)
    assert meta.file_type == "MOSTLY_F16"
    q = 64 * 64 * 2 + 64 * 4
    assert meta.layer_bytes == (q, q, q)
    assert meta.embedding_bytes == 32 * 64 * 2
    assert meta.output_bytes == 32 * 64 * 2 + 64 * 4
    assert meta.extra["tied_output"] is False


def test_missing_kv_heads_default_to_heads_and_head_dim_to_embd_over_heads(tmp_path: Path):
    meta = read_gguf_meta(write_tiny_gguf(tmp_path / "t.gguf", n_kv_heads=None, n_heads=8))
    assert meta.n_kv_heads == 8
    assert meta.head_dim_k == meta.head_dim_v == 64 // 8


def test_gguf_without_block_count_is_refused_naming_the_key(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / "t.gguf", block_count=False)
    with pytest.raises(ModelMetadataError, match=r"llama\.block_count"):
        read_gguf_meta(path)


def test_non_gguf_and_truncated_files_are_refused(tmp_path: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelMetadataError, match="not a GGUF file"):
        read_gguf_meta(junk)
    full = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:200])
    with pytest.raises(ModelMetadataError, match="truncated or corrupt"):
        read_gguf_meta(cut)
    with pytest.raises(ModelMetadataError, match="does not exist"):
        read_model_meta(tmp_path / "missing.gguf")


def test_safetensors_dir_from_config_and_headers(tmp_path: Path):
    d = write_hf_model_dir(tmp_path / "m", layers=3, hidden=64, heads=4, kv_heads=2, vocab=100)
    meta = read_safetensors_meta(d)
    assert meta.format == "safetensors"
    assert (meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.head_dim_k) == (3, 4, 2, 16)
    assert meta.context_length == 4096
    assert meta.dtype == "bfloat16"
    per_layer = (64 * 64 + 128 * 64) * 2
    assert meta.layer_bytes == (per_layer,) * 3
    assert meta.embedding_bytes == 100 * 64 * 2
    assert meta.tensor_bytes == 3 * per_layer + 2 * 100 * 64 * 2 + 64 * 2
    assert read_model_meta(d) == meta


def test_safetensors_config_head_dim_and_nested_text_config(tmp_path: Path):
    d = write_hf_model_dir(tmp_path / "m", config_extra={"head_dim": 128})
    assert read_safetensors_meta(d).head_dim_k == 128
    nested = write_hf_model_dir(tmp_path / "vlm")
    cfg = (nested / "config.json").read_text()
    (nested / "config.json").write_text(
        '{"model_type": "llava", "text_config": ' + cfg + "}"
    )
    assert read_safetensors_meta(nested).n_layers == 2


def test_broken_safetensors_dirs_are_refused(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelMetadataError, match=r"no config\.json"):
        read_safetensors_meta(empty)
    d = write_hf_model_dir(tmp_path / "m", shards=1)
    st = next(d.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:20])
    with pytest.raises(ModelMetadataError, match="truncated"):
        read_safetensors_meta(d)
    no_weights = tmp_path / "nw"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(
        '{"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8}'
    )
    with pytest.raises(ModelMetadataError, match=r"no \*\.safetensors"):
        read_safetensors_meta(no_weights)
    bad = write_safetensors(tmp_path / "bad.safetensors", {"x": ("F16", [4])})
    raw = bytearray(bad.read_bytes())
    raw[8] = ord("!")
    bad.write_bytes(bytes(raw))
    (no_weights / "w.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelMetadataError, match="not valid JSON"):
        read_safetensors_meta(no_weights)
