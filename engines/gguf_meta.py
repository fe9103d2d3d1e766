"""Model metadata read from the files themselves, without loading an engine.

Two formats are understood:

* GGUF files (llama.cpp): scanned by ``engines.gguf_scan`` (tensor types from the
  ``gguf`` package); the architecture-prefixed keys (``llama.block_count`` …) give the shape, the
  tensor table gives the byte sizes, per layer.
* Hugging Face safetensors model directories (vLLM): ``config.json`` gives the
  shape; each ``*.safetensors`` header (an 8-byte little-endian length followed
  by a JSON table of tensors) gives the byte sizes. No tensor data is read.

Both produce a :class:`ModelMeta`, the input of :mod:`engines.resources`.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from engines.gguf_scan import GgufHeader, scan_gguf

ModelFormat = Literal["gguf", "safetensors"]

#: Bytes per element of the dtypes a safetensors header or config.json can name.
DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4,
    "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip

_LAYER_RE = re.compile(r"(?:^|\.)(?:blk|layers|h|block|blocks)\.(\d+)\.")
#: A safetensors header larger than this is not a header but a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelMetadataError(ValueError):
    """A model file cannot be read as the format it claims: the message says which and why."""


@dataclass(frozen=True)
class ModelMeta:
    """The shape and size of a model, as far as resource estimates need it.

    ``kv_heads_per_layer`` has one entry per layer (architectures with a
    per-layer KV head count store an array; the rest repeat ``n_kv_heads``).
    ``layer_bytes[i]`` is the tensor bytes of block ``i``; ``other_bytes`` the
    rest (token embeddings, output head, final norm). ``output_bytes`` is the
    part of ``other_bytes`` that llama.cpp places with the last layer (the
    output head and final norm), ``embedding_bytes`` the input embedding table
    (kept in RAM by llama.cpp). ``extra`` holds format-specific facts: for GGUF
    ``tied_output`` (no separate output head) and the tokenizer's token and
    merge counts; for safetensors the architectures and per-dtype bytes.
    """

    format: ModelFormat
    path: str
    architecture: str
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    vocab_size: int
    tensor_bytes: int
    layer_bytes: tuple[int, ...]
    other_bytes: int
    output_bytes: int
    embedding_bytes: int
    file_bytes: int
    kv_heads_per_layer: tuple[int, ...] = ()
    #: llama.cpp file type (e.g. ``MOSTLY_Q4_1``) or the safetensors/config dtype.
    file_type: str = ""
    #: Weight dtype named by config.json (safetensors models), e.g. ``bfloat16``.
    dtype: str = ""
    #: Sliding-window size when the architecture declares one (0 = none).
    sliding_window: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready payload of every field."""
        data = asdict(self)
        data["layer_bytes"] = list(self.layer_bytes)
        data["kv_heads_per_layer"] = list(self.kv_heads_per_layer)
        return data


# --- GGUF --------------------------------------------------------------------------


def _field_value(header: GgufHeader, key: str) -> Any:
    """The scalar (or short list) value of a GGUF key, or None when absent."""
    return header.values.get(key)


def _array_len(header: GgufHeader, key: str) -> int | None:
    return header.array_lengths.get(key)


_GGUF_CACHE: dict[tuple[str, int, int], ModelMeta] = {}


def read_gguf_meta(path: str | Path) -> ModelMeta:
    """Read a GGUF file's architecture, shape and tensor sizes.

    The header is scanned without materializing the tokenizer arrays
    (``engines.gguf_scan``: milliseconds, where ``GGUFReader`` takes seconds for a
    large vocabulary); results are cached per (path, size, mtime).

    Raises ModelMetadataError when the file is not GGUF, is truncated, or lacks
    a key every llama.cpp model has (``general.architecture``,
    ``<arch>.block_count``, ``<arch>.attention.head_count``,
    ``<arch>.embedding_length``). Optional keys fall back the way llama.cpp
    does: KV heads = heads, head dim = embedding / heads.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelMetadataError(f"{p} is not a file; give the path of a .gguf model file")
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _GGUF_CACHE.get(key)
    if cached is not None:
        return cached
    meta = _read_gguf_uncached(p)
    _GGUF_CACHE[key] = meta
    return meta


def _read_gguf_uncached(p: Path) -> ModelMeta:
    from gguf import LlamaFileType

    with p.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelMetadataError(
            f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "convert the model to GGUF or give the path of a .gguf file"
        )
    try:
        reader = scan_gguf(p)
    except Exception as exc:
        raise ModelMetadataError(
            f"{p} could not be parsed as GGUF ({type(exc).__name__}: {exc}); "
            "the file is probably truncated or corrupt: download it again"
        ) from None

    arch = _field_value(reader, "general.architecture")
    if not arch:
        raise ModelMetadataError(
            f"{p} has no general.architecture key; it is not a model GGUF (maybe a vocab-only "
            "or adapter file): give the path of a model file"
        )

    def required(key: str) -> int:
        value = _field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelMetadataError(
                f"{p} lacks {arch}.{key}, which llama.cpp needs to load a {arch} model; "
                "the file is incomplete: re-convert or re-download it"
            )
        if isinstance(value, list):
            return int(max(value))
        return int(value)

    def optional(key: str) -> Any:
        return _field_value(reader, f"{arch}.{key}")

    n_layers = required("block_count")
    heads_raw = optional("attention.head_count")
    if heads_raw is None:
        raise ModelMetadataError(
            f"{p} lacks {arch}.attention.head_count; re-convert or re-download the file"
        )
    n_embd = required("embedding_length")
    heads_per_layer = _per_layer(heads_raw, n_layers)
    n_heads = max(heads_per_layer) if heads_per_layer else 0
    kv_raw = optional("attention.head_count_kv")
    kv_per_layer = heads_per_layer if kv_raw is None else _per_layer(kv_raw, n_layers)
    if n_heads <= 0:
        raise ModelMetadataError(f"{p}: {arch}.attention.head_count is 0; the file is corrupt")
    head_k = optional("attention.key_length")
    head_v = optional("attention.value_length")
    head_dim_k = int(head_k) if head_k is not None else n_embd // n_heads
    head_dim_v = int(head_v) if head_v is not None else n_embd // n_heads
    ctx = optional("context_length")
    vocab = optional("vocab_size")
    if vocab is None:
        vocab = _array_len(reader, "tokenizer.ggml.tokens") or 0
    ffn = optional("feed_forward_length")
    if isinstance(ffn, list):
        ffn = max(ffn) if ffn else 0
    swa = optional("attention.sliding_window")
    file_type_raw = _field_value(reader, "general.file_type")
    try:
        file_type = LlamaFileType(int(file_type_raw)).name if file_type_raw is not None else ""
    except ValueError:
        file_type = f"unknown({file_type_raw})"

    layer_bytes = [0] * n_layers
    other = output = embedding = output_weight = 0
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        match = _LAYER_RE.search(tensor.name)
        if match and int(match.group(1)) < n_layers:
            layer_bytes[int(match.group(1))] += size
            continue
        other += size
        if tensor.name.startswith("token_embd"):
            embedding += size
        elif tensor.name.startswith(("output", "output_norm")):
            output += size
            if tensor.name.startswith("output."):
                output_weight += size
    total = sum(layer_bytes) + other
    name = _field_value(reader, "general.name") or p.stem
    tied = output_weight == 0
    return ModelMeta(
        format="gguf",
        path=str(p),
        architecture=str(arch),
        name=str(name),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=max(kv_per_layer) if kv_per_layer else 0,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        context_length=int(ctx) if ctx is not None else 0,
        embedding_length=n_embd,
        feed_forward_length=int(ffn or 0),
        vocab_size=int(vocab),
        tensor_bytes=total,
        layer_bytes=tuple(layer_bytes),
        other_bytes=other,
        output_bytes=output,
        embedding_bytes=embedding,
        file_bytes=p.stat().st_size,
        kv_heads_per_layer=tuple(kv_per_layer),
        file_type=file_type,
        sliding_window=int(swa or 0),
        extra={
            "tied_output": tied,
            "tokenizer_tokens": _array_len(reader, "tokenizer.ggml.tokens") or 0,
            "tokenizer_merges": _array_len(reader, "tokenizer.ggml.merges") or 0,
        },
    )


def _per_layer(value: Any, n_layers: int) -> list[int]:
    """Expand a scalar-or-array head count to one entry per layer."""
    if isinstance(value, list):
        values = [int(v) for v in value]
        if len(values) < n_layers:
            values += [values[-1] if values else 0] * (n_layers - len(values))
        return values[:n_layers]
    return [int(value)] * n_layers


# --- safetensors -------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Return the JSON header of one .safetensors file (tensor name → dtype/shape/offsets).

    Raises ModelMetadataError when the file is shorter than its declared
    header, the header is not JSON, or it is implausibly large.
    """
    p = Path(path)
    with p.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelMetadataError(
                f"{p} is too short to be a safetensors file ({len(head)} bytes); download it again"
            )
        (length,) = struct.unpack("<Q", head)
        size = p.stat().st_size
        if length > _MAX_HEADER_BYTES or 8 + length > size:
            raise ModelMetadataError(
                f"{p} declares a {length}-byte safetensors header but the file has {size} bytes; "
                "the file is truncated or not safetensors: download it again"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelMetadataError(
            f"{p}: the safetensors header is not valid JSON ({exc}); download the file again"
        ) from None
    if not isinstance(header, dict):
        raise ModelMetadataError(f"{p}: the safetensors header is not a JSON object")
    return header


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it)."""
    for key in ("text_config", "llm_config", "language_config"):
        nested = config.get(key)
        if isinstance(nested, dict) and "num_hidden_layers" in nested:
            return {**config, **nested}
    return config


def read_safetensors_meta(model_dir: str | Path) -> ModelMeta:
    """Read a Hugging Face model directory: ``config.json`` plus the safetensors headers.

    Raises ModelMetadataError when config.json is missing or lacks the shape
    keys (num_hidden_layers, num_attention_heads, hidden_size), or when no
    .safetensors file is present.
    """
    d = Path(model_dir)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise ModelMetadataError(
            f"{d} has no config.json; give the directory of a Hugging Face model "
            "(config.json plus *.safetensors)"
        )
    try:
        config = _text_config(json.loads(config_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ModelMetadataError(
            f"{config_path} is not valid JSON ({exc}); fix or re-download it"
        ) from None
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not isinstance(config.get(key), int):
            raise ModelMetadataError(
                f"{config_path} lacks integer {key!r}; it does not describe a decoder model "
                "whose resources can be estimated"
            )
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelMetadataError(
            f"{d} has config.json but no *.safetensors weights; download the weights too"
        )
    n_layers = int(config["num_hidden_layers"])
    n_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    layer_bytes = [0] * n_layers
    other = output = embedding = 0
    st_dtypes: dict[str, int] = {}
    for file in files:
        for tname, info in read_safetensors_header(file).items():
            if tname == "__metadata__" or not isinstance(info, dict):
                continue
            start, end = info.get("data_offsets", (0, 0))
            size = int(end) - int(start)
            dtype = str(info.get("dtype", ""))
            st_dtypes[dtype] = st_dtypes.get(dtype, 0) + size
            match = _LAYER_RE.search(tname)
            if match and int(match.group(1)) < n_layers:
                layer_bytes[int(match.group(1))] += size
                continue
            other += size
            if "embed_tokens" in tname or "wte" in tname:
                embedding += size
            elif "lm_head" in tname or tname.endswith("norm.weight"):
                output += size
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    if not dtype and st_dtypes:
        dtype = max(st_dtypes, key=lambda k: st_dtypes[k])
    name = config.get("_name_or_path") or d.name
    arch_list = config.get("architectures") or [config.get("model_type", "")]
    return ModelMeta(
        format="safetensors",
        path=str(d),
        architecture=str(config.get("model_type") or arch_list[0] or ""),
        name=str(name),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        context_length=int(config.get("max_position_embeddings") or 0),
        embedding_length=hidden,
        feed_forward_length=int(config.get("intermediate_size") or 0),
        vocab_size=int(config.get("vocab_size") or 0),
        tensor_bytes=sum(layer_bytes) + other,
        layer_bytes=tuple(layer_bytes),
        other_bytes=other,
        output_bytes=output,
        embedding_bytes=embedding,
        file_bytes=sum(f.stat().st_size for f in files),
        kv_heads_per_layer=(n_kv,) * n_layers,
        file_type=dtype,
        dtype=dtype,
        sliding_window=int(config.get("sliding_window") or 0),
        extra={"architectures": list(arch_list), "safetensors_dtypes": st_dtypes},
    )


def read_model_meta(path: str | Path) -> ModelMeta:
    """Read a GGUF file or a safetensors model directory, whichever ``path`` is."""
    p = Path(path)
    if p.is_dir():
        return read_safetensors_meta(p)
    if p.is_file():
        return read_gguf_meta(p)
    raise ModelMetadataError(f"{p} does not exist; give a .gguf file or a model directory")
