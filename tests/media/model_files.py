"""Tiny model files for tests: GGUF files written with gguf.GGUFWriter, safetensors dirs by hand."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | list[int] | None = 2,
    key_length: int | None = None,
    value_length: int | None = None,
    context_length: int = 1024,
    vocab: int = 32,
    block_count: bool = True,
    tied: bool = True,
) -> Path:
    """Write a small but well-formed GGUF model; switches leave keys out or vary them."""
    writer = GGUFWriter(str(path), arch)
    if block_count:
        writer.add_block_count(n_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_embd * 2)
    writer.add_head_count(n_heads)
    if n_kv_heads is not None:
        writer.add_head_count_kv(n_kv_heads)
    if key_length is not None:
        writer.add_key_length(key_length)
    if value_length is not None:
        writer.add_value_length(value_length)
    writer.add_file_type(1)  # MOSTLY_F16
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((vocab, n_embd), dtype=np.float16))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((n_embd, n_embd), dtype=np.float16))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.zeros((n_embd,), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros((n_embd,), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((vocab, n_embd), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """Write a .safetensors file: header of (dtype, shape) per tensor, zero-filled data."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * offset)
    return path


def write_hf_model_dir(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 100,
    shards: int = 2,
    config_extra: dict[str, Any] | None = None,
) -> Path:
    """A Hugging Face-style model dir: config.json and ``shards`` safetensors files (bf16)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": hidden * 2,
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        **(config_extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors: list[dict[str, tuple[str, list[int]]]] = [{} for _ in range(shards)]
    tensors[0]["model.embed_tokens.weight"] = ("BF16", [vocab, hidden])
    for i in range(layers):
        shard = tensors[i % shards]
        shard[f"model.layers.{i}.self_attn.q_proj.weight"] = ("BF16", [hidden, hidden])
        shard[f"model.layers.{i}.mlp.up_proj.weight"] = ("BF16", [hidden * 2, hidden])
    tensors[-1]["model.norm.weight"] = ("BF16", [hidden])
    tensors[-1]["lm_head.weight"] = ("BF16", [vocab, hidden])
    for k, part in enumerate(tensors):
        write_safetensors(path / f"model-{k + 1:05d}-of-{shards:05d}.safetensors", part)
    return path
