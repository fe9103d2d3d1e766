"""How much memory a model needs at a context length, per engine, split into VRAM and RAM.

llama.cpp (GGUF), matching llama-cpp-python 0.3.36 / its vendored llama.cpp:

* the context is padded up to a multiple of 256 cells; with ``parallel`` > 1
  slots (non-unified KV) each slot gets ``pad(ctx / parallel, 256)`` cells;
* KV cache = Σ_layers cells * n_kv_heads * (head_dim_k * bytes(type_k) +
  head_dim_v * bytes(type_v)); the layers offloaded to the GPU keep their KV
  in VRAM. Quantized types count their block size (q8_0 is 34 bytes per 32
  values). A quantized V cache needs flash attention (llama.cpp refuses it
  otherwise, and so do we);
* weights: the last ``gpu_layers`` blocks go to the GPU; the output head too
  when ``gpu_layers`` > n_layers (a tied head then adds a GPU copy of the
  embedding table); the input embedding table stays in RAM;
* compute buffer: what llama.cpp reserves for a worst-case micro-batch, the
  larger of the logits phase (ubatch * vocab * 4 bytes) and the attention
  phase (without flash attention ubatch * cells * heads * 4 bytes of scores);
* RAM also counts the output buffer, the tokenizer tables (measured at ~192
  bytes per token or merge) and a fixed 4 MiB of graph/context structures.
  Of the CPU compute reservation RAM counts the working set a full-context
  prompt touches: the attention scores (plus the f16 copy the CPU matmul
  makes of them in its work buffer), one FFN activation and the residual
  stream; not the all-rows logits, which only embedding/``logits_all`` runs
  touch (Linux backs untouched pages lazily). So ``ram_bytes`` is the
  resident peak of serving a full context, the figure to compare with RSS.

vLLM (safetensors): weights at the serving dtype, KV per token =
2 * layers * kv_heads * head_dim * bytes(kv dtype), at least one sequence of
``max_model_len`` tokens; the GPU budget is ``gpu_memory_utilization`` * GPU
memory (checked per node by :func:`engines.resources.fit.fits`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from engines.gguf_meta import DTYPE_BYTES, ModelMeta

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Bytes per element of llama.cpp KV-cache types (block bytes / block size).
KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}  # fmt: skip
#: llama.cpp pads the context (KV cells) to this multiple.
LLAMACPP_CTX_PAD = 256
#: Tokenizer tables in llama.cpp, per vocabulary token or BPE merge (measured on SmolLM2).
LLAMACPP_TOKENIZER_BYTES_PER_ENTRY = 192
#: Graph, scheduler and context structures of one llama.cpp context.
LLAMACPP_CONTEXT_OVERHEAD_BYTES = 4 * MiB
#: vLLM: CUDA context, NCCL and CUDA-graph memory outside torch's allocator (heuristic).
VLLM_GPU_OVERHEAD_BYTES = 1 * GiB
#: vLLM: resident memory of the API server and engine-core processes (heuristic).
VLLM_HOST_BYTES = 3 * GiB

PROVIDERS = ("llamacpp", "vllm")


class EstimateError(ValueError):
    """The requested settings cannot run at all (the message says which and what to change)."""


@dataclass(frozen=True)
class ResourceEstimate:
    """Bytes one loaded runtime needs; ``vram_bytes`` + ``ram_bytes`` is the whole footprint.

    ``details`` breaks each figure down (``weights_vram``, ``kv_ram``,
    ``compute_reserved_ram``, …) and names the assumptions used.
    """

    provider: str
    context_length: int
    requested_context_length: int
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    vram_bytes: int
    ram_bytes: int
    gpu_layers: int
    kv_cache_type: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_gpu(self) -> bool:
        return self.vram_bytes > 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON payload (what ``evaluate_model_resources`` returns)."""
        return asdict(self)


def _pad(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _kv_type(name: object, field_name: str) -> str:
    key = str(name).lower()
    if key not in KV_TYPE_BYTES:
        raise EstimateError(
            f"{field_name}={name!r} is not a llama.cpp KV-cache type; use one of "
            + ", ".join(KV_TYPE_BYTES)
        )
    return key


def llamacpp_cells(context_length: int, parallel: int = 1, kv_unified: bool = False) -> int:
    """KV cells llama.cpp allocates for ``context_length`` over ``parallel`` slots."""
    n_ctx = _pad(max(context_length, 1), LLAMACPP_CTX_PAD)
    if kv_unified or parallel <= 1:
        return n_ctx
    per_slot = _pad(n_ctx // parallel, LLAMACPP_CTX_PAD)
    return per_slot * parallel


def kv_cache_bytes(
    meta: ModelMeta, cells: int, type_k: str = "f16", type_v: str = "f16",
    layers: range | None = None,
) -> int:  # fmt: skip
    """llama.cpp KV-cache bytes for ``cells`` tokens over ``layers`` (all by default)."""
    bk = KV_TYPE_BYTES[_kv_type(type_k, "cache_type_k")]
    bv = KV_TYPE_BYTES[_kv_type(type_v, "cache_type_v")]
    heads = meta.kv_heads_per_layer or (meta.n_kv_heads,) * meta.n_layers
    total = 0.0
    for layer in layers if layers is not None else range(meta.n_layers):
        n_kv = heads[layer] if layer < len(heads) else meta.n_kv_heads
        total += cells * n_kv * (meta.head_dim_k * bk + meta.head_dim_v * bv)
    return round(total)


def _int(overrides: dict[str, Any], *names: str, default: int) -> int:
    for name in names:
        if overrides.get(name) is not None:
            try:
                return int(overrides[name])
            except (TypeError, ValueError):
                raise EstimateError(f"{name} must be an integer, got {overrides[name]!r}") from None
    return default


def estimate(
    meta: ModelMeta,
    context_length: int,
    provider: str = "llamacpp",
    overrides: dict[str, Any] | None = None,
) -> ResourceEstimate:
    """Estimate weights, KV cache, compute buffers, VRAM and RAM for one runtime.

    ``provider`` is ``llamacpp`` (GGUF) or ``vllm`` (safetensors). llama.cpp
    overrides: ``gpu_layers``/``n_gpu_layers`` (-1 = all, default 0),
    ``kv_cache_type`` or ``cache_type_k``/``cache_type_v`` (default f16),
    ``batch_size``/``n_batch`` and ``ubatch_size``/``n_ubatch`` (512),
    ``parallel`` slots (1), ``flash_attn`` (False). vLLM overrides:
    ``max_model_len``, ``dtype``, ``kv_cache_dtype``, ``tensor_parallel_size``,
    ``gpu_memory_utilization`` (0.9), ``max_num_batched_tokens`` (8192).
    Raises EstimateError for a context the model or engine cannot serve, an
    unknown provider or cache type, or a model format the engine cannot load.
    """
    o = dict(overrides or {})
    if not isinstance(context_length, int) or context_length <= 0:
        raise EstimateError(f"context_length must be a positive integer, got {context_length!r}")
    if provider == "llamacpp":
        if meta.format != "gguf":
            raise EstimateError(
                f"llama.cpp loads GGUF files; {meta.path} is {meta.format}. Convert it to GGUF "
                "or use the vllm provider"
            )
        return _estimate_llamacpp(meta, context_length, o)
    if provider == "vllm":
        if meta.format != "safetensors":
            raise EstimateError(
                f"the vllm estimate needs a safetensors model directory; {meta.path} is "
                f"{meta.format}. Use the llamacpp provider for GGUF files"
            )
        return _estimate_vllm(meta, context_length, o)
    raise EstimateError(
        f"no resource estimate for provider {provider!r}; known: {', '.join(PROVIDERS)}"
    )


def _estimate_llamacpp(meta: ModelMeta, context_length: int, o: dict[str, Any]) -> ResourceEstimate:
    n_layers = meta.n_layers
    gpu_layers = _int(o, "gpu_layers", "n_gpu_layers", default=0)
    if gpu_layers < 0 or gpu_layers > n_layers + 1:
        gpu_layers = n_layers + 1  # -1 / "all": every block plus the output head
    offloaded_blocks = min(gpu_layers, n_layers)
    output_on_gpu = gpu_layers > n_layers
    type_k = _kv_type(o.get("cache_type_k") or o.get("kv_cache_type") or "f16", "cache_type_k")
    type_v = _kv_type(o.get("cache_type_v") or o.get("kv_cache_type") or "f16", "cache_type_v")
    flash_attn = bool(o.get("flash_attn", False))
    if type_v not in ("f16", "f32", "bf16") and not flash_attn:
        raise EstimateError(
            f"a quantized V cache ({type_v}) needs flash attention in llama.cpp; set "
            "flash_attn=true or use kv_cache_type f16"
        )
    parallel = max(1, _int(o, "parallel", "n_parallel", default=1))
    if meta.context_length and context_length > meta.context_length and not o.get(
        "allow_context_overflow"
    ):
        raise EstimateError(
            f"context_length {context_length} exceeds the {meta.context_length} tokens "
            f"{meta.name} was trained for; ask for at most {meta.context_length}"
        )
    cells = llamacpp_cells(context_length, parallel, bool(o.get("kv_unified", False)))
    n_batch = min(_int(o, "batch_size", "n_batch", default=512), cells)
    n_ubatch = min(_int(o, "ubatch_size", "n_ubatch", default=512), n_batch)

    gpu_block_range = range(n_layers - offloaded_blocks, n_layers)
    kv_total = kv_cache_bytes(meta, cells, type_k, type_v)
    kv_vram = kv_cache_bytes(meta, cells, type_k, type_v, gpu_block_range)
    kv_ram = kv_total - kv_vram

    weights_vram = sum(meta.layer_bytes[i] for i in gpu_block_range)
    if output_on_gpu:
        weights_vram += meta.output_bytes
        if meta.extra.get("tied_output"):
            weights_vram += meta.embedding_bytes  # the head shares the embedding: GPU copy
    weights_total = meta.tensor_bytes
    weights_ram = weights_total - weights_vram
    if output_on_gpu and meta.extra.get("tied_output"):
        weights_ram = weights_total - (weights_vram - meta.embedding_bytes)

    f32, f16 = 4, 2
    residual = n_ubatch * meta.embedding_length * f32 * 2
    logits_phase = n_ubatch * meta.vocab_size * f32 + residual
    ffn = n_ubatch * meta.feed_forward_length * f32
    if flash_attn:
        scores = n_ubatch * meta.embedding_length * f32 * 2
        scores_work = 0
    else:
        # KQ scores in f32, plus the f16 copy the CPU matmul with V makes in its work buffer.
        scores = n_ubatch * cells * meta.n_heads * f32
        scores_work = n_ubatch * cells * meta.n_heads * f16
    compute = max(logits_phase, scores + ffn + residual)
    # What a full-context prompt touches on the CPU (generation computes one logits row).
    working_set = scores + scores_work + ffn + residual
    # Where the graph runs: layers on the GPU compute there; the head where its weights are.
    compute_vram = 0
    compute_ram = compute
    ram_compute_resident = working_set
    if offloaded_blocks > 0:
        compute_vram = compute if output_on_gpu else scores + ffn + residual
        compute_ram = residual if output_on_gpu else logits_phase
        ram_compute_resident = residual
    output_buffer = meta.vocab_size * f32 * parallel
    tokenizer = (
        int(meta.extra.get("tokenizer_tokens") or meta.vocab_size)
        + int(meta.extra.get("tokenizer_merges") or 0)
    ) * LLAMACPP_TOKENIZER_BYTES_PER_ENTRY
    overhead = tokenizer + LLAMACPP_CONTEXT_OVERHEAD_BYTES

    vram = weights_vram + kv_vram + compute_vram if offloaded_blocks or output_on_gpu else 0
    ram = weights_ram + kv_ram + ram_compute_resident + output_buffer + overhead
    return ResourceEstimate(
        provider="llamacpp",
        context_length=cells,
        requested_context_length=context_length,
        weights_bytes=weights_total,
        kv_cache_bytes=kv_total,
        compute_bytes=compute,
        vram_bytes=int(vram),
        ram_bytes=int(ram),
        gpu_layers=gpu_layers if gpu_layers <= n_layers else n_layers + 1,
        kv_cache_type=type_k if type_k == type_v else f"{type_k}/{type_v}",
        details={
            "weights_vram": weights_vram, "weights_ram": weights_ram,
            "kv_vram": kv_vram, "kv_ram": kv_ram,
            "compute_vram": compute_vram, "compute_reserved_ram": compute_ram,
            "compute_resident_ram": ram_compute_resident,
            "output_buffer": output_buffer, "runtime_overhead": overhead,
            "cells": cells, "cells_per_slot": cells // parallel if parallel > 1 else cells,
            "parallel": parallel, "n_batch": n_batch, "n_ubatch": n_ubatch,
            "flash_attn": flash_attn, "offloaded_blocks": offloaded_blocks,
            "output_on_gpu": output_on_gpu, "cache_type_k": type_k, "cache_type_v": type_v,
            "kv_bytes_per_token": kv_cache_bytes(meta, 1, type_k, type_v),
        },
    )


def _dtype_bytes(name: str, what: str) -> float:
    if name not in DTYPE_BYTES:
        raise EstimateError(
            f"{what}={name!r} is not a known dtype; use e.g. bfloat16, float16, fp8"
        )
    return DTYPE_BYTES[name]


def _estimate_vllm(meta: ModelMeta, context_length: int, o: dict[str, Any]) -> ResourceEstimate:
    max_model_len = _int(o, "max_model_len", default=0) or None
    if max_model_len is not None and meta.context_length and max_model_len > meta.context_length:
        raise EstimateError(
            f"max_model_len {max_model_len} exceeds max_position_embeddings "
            f"{meta.context_length} of {meta.name}; vLLM refuses it. Lower max_model_len"
        )
    ctx = min(context_length, max_model_len) if max_model_len else context_length
    if meta.context_length and ctx > meta.context_length:
        raise EstimateError(
            f"context_length {ctx} exceeds the model's max_position_embeddings "
            f"{meta.context_length}; ask for at most {meta.context_length} (or set max_model_len)"
        )
    tp = max(1, _int(o, "tensor_parallel_size", default=1))
    util = float(o.get("gpu_memory_utilization", 0.9))
    if not 0 < util <= 1:
        raise EstimateError(f"gpu_memory_utilization must be in (0, 1], got {util}")
    checkpoint_dtype = meta.dtype or "bfloat16"
    dtype = str(o.get("dtype") or "auto")
    serve_dtype = checkpoint_dtype if dtype == "auto" else dtype
    ckpt_bytes = _dtype_bytes(checkpoint_dtype, "config dtype")
    serve_bytes = _dtype_bytes(serve_dtype, "dtype")
    if checkpoint_dtype in ("float32", "float") and dtype == "auto":
        serve_bytes = 2.0  # vLLM serves float32 checkpoints in bfloat16/float16 by default
        serve_dtype = "bfloat16"
    weights = int(meta.tensor_bytes * serve_bytes / ckpt_bytes)
    kv_dtype = str(o.get("kv_cache_dtype") or "auto")
    kv_bytes = serve_bytes if kv_dtype == "auto" else _dtype_bytes(
        "fp8" if kv_dtype.startswith("fp8") else kv_dtype, "kv_cache_dtype"
    )  # fmt: skip
    kv_per_token = 2 * meta.n_layers * meta.n_kv_heads * meta.head_dim_k * kv_bytes
    kv_total = int(kv_per_token * ctx)
    batched = _int(o, "max_num_batched_tokens", default=8192)
    activation = int(
        batched * (meta.embedding_length * 4 + meta.feed_forward_length * 2) * serve_bytes
        + min(batched, _int(o, "max_num_seqs", default=256)) * meta.vocab_size * 4
    )
    per_gpu = weights // tp + kv_total // tp + activation + VLLM_GPU_OVERHEAD_BYTES
    return ResourceEstimate(
        provider="vllm",
        context_length=ctx,
        requested_context_length=context_length,
        weights_bytes=weights,
        kv_cache_bytes=kv_total,
        compute_bytes=activation + VLLM_GPU_OVERHEAD_BYTES,
        vram_bytes=per_gpu * tp,
        ram_bytes=VLLM_HOST_BYTES,
        gpu_layers=-1,
        kv_cache_type=kv_dtype if kv_dtype != "auto" else serve_dtype,
        details={
            "tensor_parallel_size": tp, "vram_per_gpu": per_gpu,
            "gpu_memory_utilization": util, "max_model_len": ctx,
            "kv_bytes_per_token": int(kv_per_token), "serve_dtype": serve_dtype,
            "activation": activation, "gpu_overhead": VLLM_GPU_OVERHEAD_BYTES,
            "max_num_batched_tokens": batched,
            "assumptions": "activation and overheads are heuristics; vLLM profiles them at start",
        },
    )
