"""Resolve a model reference and plan a runtime for it, without loading anything.

``resolve(reference, models_dir)`` turns a path, an artifact ref
(``name@digest``) or a bare name into a :class:`ResolvedModel` (path, format,
size, metadata read from the file). ``discover_local_models(models_dir)`` lists
what a node already holds. ``plan(RuntimeConfig)`` picks the node, device,
GPU layers, context length and KV-cache type that truthfully fit, records any
fallback with its reason (GPU asked for on a node without one → CPU; not every
layer fits the GPU → partial offload), and raises :class:`PlanRefused` with the
reason when nothing fits.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from engines.base import NodeFacts
from engines.gguf_meta import ModelFormat, ModelMeta, ModelMetadataError, read_model_meta
from engines.resources.estimate import EstimateError, ResourceEstimate, estimate
from engines.resources.fit import NodeFit, fits, free_gpu, free_ram, gib

log = logging.getLogger(__name__)

Engine = Literal["llamacpp", "vllm"]
Device = Literal["auto", "cpu", "cuda"]
_REF_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})@([0-9a-f]{16})$")
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
#: Default llama.cpp context when the caller names none (the provider config default).
DEFAULT_LLAMACPP_CONTEXT = 2048


class ModelNotFound(LookupError):
    """A model reference matches nothing on this node; the message lists what is there."""


class PlanRefused(ValueError):
    """No truthful runtime plan exists; the message says why and what to change."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk: where, what format, how big, and its metadata."""

    reference: str
    name: str
    path: Path
    format: ModelFormat
    size_bytes: int
    meta: ModelMeta
    #: The artifact ref when the model was materialized from the artifact store.
    artifact_ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "name": self.name,
            "path": str(self.path),
            "format": self.format,
            "size_bytes": self.size_bytes,
            "artifact_ref": self.artifact_ref,
            "meta": self.meta.to_dict(),
        }


def _artifact_info(path: Path, models_dir: Path) -> tuple[str | None, str | None]:
    """(artifact name, ref) when ``path`` lies in ``<models_dir>/<name>/<digest>/files``."""
    try:
        rel = path.resolve().relative_to(models_dir.resolve())
    except ValueError:
        return None, None
    parts = rel.parts
    if len(parts) >= 3 and parts[2] == "files" and _REF_RE.fullmatch(f"{parts[0]}@{parts[1]}"):
        return parts[0], f"{parts[0]}@{parts[1]}"
    return None, None


def _resolved(reference: str, path: Path, models_dir: Path | None) -> ResolvedModel:
    try:
        meta = read_model_meta(path)
    except ModelMetadataError:
        raise
    name, ref = _artifact_info(path, models_dir) if models_dir else (None, None)
    if name is None:
        name = path.name.removesuffix(".gguf") if path.is_file() else path.name
    size = (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )
    return ResolvedModel(reference, name, path, meta.format, size, meta, ref)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _model_in_entry(entry: Path) -> Path | None:
    """The model path inside a materialized artifact entry (``<name>/<digest>``)."""
    manifest = entry / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    files = entry / "files"
    if data.get("kind") == "file" and data.get("files"):
        return files / str(data["files"][0]["path"])
    return files


def discover_local_models(models_dir: str | Path) -> tuple[ResolvedModel, ...]:
    """Every model under ``models_dir``: GGUF files and safetensors dirs with a config.json.

    Multi-part GGUF files are listed once (by their first shard); staging and
    lock directories and files whose metadata cannot be read are skipped (the
    latter with a warning in the log). Sorted by name, then path.
    """
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        return ()
    found: list[ResolvedModel] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        candidates: list[Path] = []
        if _is_model_dir(here):
            candidates.append(here)
            dirnames[:] = []
        for f in sorted(filenames):
            if not f.endswith(".gguf"):
                continue
            shard = _SHARD_RE.search(f)
            if shard and shard.group(1) != "00001":
                continue
            candidates.append(here / f)
        for path in candidates:
            try:
                found.append(_resolved(str(path), path, root))
            except (ModelMetadataError, OSError) as exc:
                log.warning("skipping %s: %s", path, exc)
    return tuple(sorted(found, key=lambda m: (m.name, str(m.path))))


def resolve(model_reference: str, models_dir: str | Path) -> ResolvedModel:
    """Resolve a reference to a model on this node without loading it.

    Accepted references: an absolute path to a .gguf file or model directory;
    a path relative to ``models_dir`` (which must stay inside it); an
    artifact ref ``name@digest`` materialized under ``models_dir``; or a bare
    name matching a materialized artifact, a ``<name>.gguf`` file or a
    discovered model's name. Raises ModelNotFound listing what is there,
    ModelMetadataError when the file is not a readable model.
    """
    if not isinstance(model_reference, str) or not model_reference.strip():
        raise ModelNotFound("model reference is empty; give a path, an artifact ref or a name")
    ref = model_reference.strip()
    root = Path(models_dir).expanduser()
    as_path = Path(ref).expanduser()
    if as_path.is_absolute():
        if not as_path.exists():
            raise ModelNotFound(f"{as_path} does not exist; check the path")
        return _resolved(ref, as_path, root)
    if _REF_RE.fullmatch(ref):
        name, digest = ref.split("@")
        path = _model_in_entry(root / name / digest)
        if path is None:
            raise ModelNotFound(
                f"artifact {ref} is not materialized under {root}; materialize it on this node "
                "first (engines.artifacts.materialize)"
            )
        return _resolved(ref, path, root)
    if ".." in Path(ref).parts:
        raise ModelNotFound(f"model reference {ref!r} climbs out of {root}; give a path inside it")
    candidate = root / ref
    if candidate.exists() and (candidate.is_file() or _is_model_dir(candidate)):
        return _resolved(ref, candidate, root)
    if candidate.is_dir():
        entries = sorted(
            (e for e in candidate.iterdir() if (e / "manifest.json").is_file()),
            key=lambda e: (e / "manifest.json").stat().st_mtime,
        )
        if entries:
            path = _model_in_entry(entries[-1])
            if path is not None:
                return _resolved(ref, path, root)
    if (root / f"{ref}.gguf").is_file():
        return _resolved(ref, root / f"{ref}.gguf", root)
    known = discover_local_models(root)
    matches = [m for m in known if m.name == ref]
    if matches:
        return matches[0]
    names = ", ".join(sorted({m.name for m in known})) or "(none)"
    raise ModelNotFound(
        f"no model {ref!r} under {root}; models there: {names}. Give a path, or add and "
        "materialize the model first"
    )


@dataclass(frozen=True)
class RuntimeConfig:
    """What the caller asks for; everything but ``model`` has a default."""

    model: str | ResolvedModel
    models_dir: Path | None = None
    engine: Engine = "llamacpp"
    #: Tokens of context; None = the engine default (llama.cpp 2048, vLLM the model's maximum).
    context_length: int | None = None
    device: Device = "auto"
    #: GPU layers for llama.cpp; None = as many as fit on a GPU node, -1 = all.
    gpu_layers: int | None = None
    kv_cache_type: str = "f16"
    batch_size: int = 512
    parallel: int = 1
    flash_attn: bool = False
    #: Fall back to CPU (or fewer GPU layers) instead of refusing.
    allow_cpu_fallback: bool = True
    nodes: Sequence[NodeFacts] = ()
    #: Pin to one node; None = choose.
    node_id: str | None = None
    #: Extra engine settings passed to the estimate (vLLM: gpu_memory_utilization, …).
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimePlan:
    """The plan: engine, node, device, GPU layers, context, KV type, fallback and why."""

    engine: Engine
    node_id: str
    device: Literal["cpu", "cuda"]
    gpu_layers: int
    context_length: int
    kv_cache_type: str
    model: ResolvedModel
    estimate: ResourceEstimate
    fit: NodeFit
    #: Why the plan differs from what was asked (None when it does not).
    fallback: str | None = None
    gpu_indices: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "node_id": self.node_id,
            "device": self.device,
            "gpu_layers": self.gpu_layers,
            "gpu_indices": list(self.gpu_indices),
            "context_length": self.context_length,
            "kv_cache_type": self.kv_cache_type,
            "fallback": self.fallback,
            "model": self.model.to_dict(),
            "estimate": self.estimate.to_dict(),
            "fit": asdict(self.fit),
        }


@dataclass
class _Option:
    node: NodeFacts
    device: Literal["cpu", "cuda"]
    gpu_layers: int
    fallback: str | None
    est: ResourceEstimate
    fit: NodeFit


def _resolve_config_model(config: RuntimeConfig) -> ResolvedModel:
    if isinstance(config.model, ResolvedModel):
        return config.model
    if config.models_dir is None and not Path(config.model).is_absolute():
        raise PlanRefused(
            f"model {config.model!r} is not a path and no models_dir was given to look it up in"
        )
    try:
        return resolve(config.model, config.models_dir or Path("/"))
    except (ModelNotFound, ModelMetadataError) as exc:
        raise PlanRefused(str(exc)) from None


def _estimate(
    meta: ModelMeta, config: RuntimeConfig, context: int, gpu_layers: int
) -> ResourceEstimate:
    overrides = {
        "gpu_layers": gpu_layers,
        "kv_cache_type": config.kv_cache_type,
        "batch_size": config.batch_size,
        "parallel": config.parallel,
        "flash_attn": config.flash_attn,
        **config.overrides,
    }
    try:
        return estimate(meta, context, config.engine, overrides)
    except EstimateError as exc:
        raise PlanRefused(str(exc)) from None


def _most_layers_that_fit(
    meta: ModelMeta, config: RuntimeConfig, context: int, node: NodeFacts
) -> tuple[int, ResourceEstimate, NodeFit] | None:
    """The largest gpu_layers (1..n_layers+1) whose estimate fits ``node``, if any."""
    lo, hi = 1, meta.n_layers + 1
    best: tuple[int, ResourceEstimate, NodeFit] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        est = _estimate(meta, config, context, mid)
        answer = fits(est, node)
        if answer.fits:
            best = (mid, est, answer)
            lo = mid + 1
        elif answer.free_bytes < est.vram_bytes:
            hi = mid - 1
        else:  # VRAM fits but RAM does not: more offload would help, but the search is on VRAM
            lo = mid + 1
    return best


def _llamacpp_options(
    model: ResolvedModel, config: RuntimeConfig, context: int, node: NodeFacts
) -> tuple[list[_Option], list[str]]:
    """Every plan ``node`` can truthfully run, and why the others cannot."""
    meta = model.meta
    options: list[_Option] = []
    why: list[str] = []
    all_layers = meta.n_layers + 1
    wants_gpu = config.device == "cuda" or (config.gpu_layers not in (None, 0))
    if config.device == "cpu" and config.gpu_layers not in (None, 0):
        raise PlanRefused(
            f"device='cpu' with gpu_layers={config.gpu_layers} contradict each other; "
            "drop gpu_layers or ask for device='cuda'"
        )
    gpu_allowed = config.device != "cpu" and config.gpu_layers != 0
    if gpu_allowed and node.gpus:
        asked = all_layers if config.gpu_layers in (None, -1) else int(config.gpu_layers or 0)
        asked = min(asked, all_layers)
        est = _estimate(meta, config, context, asked)
        answer = fits(est, node)
        if answer.fits:
            options.append(_Option(node, "cuda", asked, None, est, answer))
        else:
            why.append(f"{node.node_id}: {answer.reason}")
            if config.allow_cpu_fallback or config.gpu_layers is None:
                partial = _most_layers_that_fit(meta, config, context, node)
                if partial is not None:
                    layers, pest, pfit = partial
                    options.append(
                        _Option(
                            node, "cuda", layers,
                            f"only {layers} of {all_layers} layers fit in the free GPU memory of "
                            f"{node.node_id} ({gib(pfit.free_bytes)}); the rest run on the CPU",
                            pest, pfit,
                        )
                    )
    cpu_is_fallback = wants_gpu or (gpu_allowed and bool(node.gpus))
    if not gpu_allowed or not node.gpus or config.allow_cpu_fallback:
        if wants_gpu and not config.allow_cpu_fallback:
            why.append(
                f"{node.node_id}: a GPU was requested but the node has none and "
                "allow_cpu_fallback is off"
            )
            return options, why
        est = _estimate(meta, config, context, 0)
        answer = fits(est, node)
        if answer.fits:
            reason = None
            if cpu_is_fallback:
                reason = (
                    f"a GPU was requested but {node.node_id} has none; running on the CPU "
                    "with gpu_layers 0"
                    if not node.gpus
                    else f"the model does not fit the GPU memory of {node.node_id}; running "
                    "on the CPU with gpu_layers 0"
                )
            options.append(_Option(node, "cpu", 0, reason, est, answer))
        else:
            why.append(f"{node.node_id} (CPU): {answer.reason}")
    return options, why


def _vllm_options(
    model: ResolvedModel, config: RuntimeConfig, context: int, node: NodeFacts
) -> tuple[list[_Option], list[str]]:
    if not node.gpus:
        return [], [f"{node.node_id}: vLLM needs a CUDA GPU and the node has none"]
    est = _estimate(model.meta, config, context, -1)
    answer = fits(est, node)
    if not answer.fits:
        return [], [f"{node.node_id}: {answer.reason}"]
    return [_Option(node, "cuda", -1, None, est, answer)], []


def plan(config: RuntimeConfig) -> RuntimePlan:
    """Build the runtime plan for ``config`` without loading anything.

    Picks, among the candidate nodes (``node_id`` or all of ``nodes``), the
    option that honours the request, preferring: no fallback, then GPU over
    CPU, then the most headroom. Fallbacks (CPU because the node has no GPU,
    partial offload because the GPU is too small) happen only where
    ``allow_cpu_fallback`` permits and are recorded in ``plan.fallback``.
    Raises PlanRefused naming every node's reason and the largest free
    memory seen when nothing fits, or when the request itself is impossible
    (wrong format for the engine, context above the model's, vLLM on CPU).
    """
    model = _resolve_config_model(config)
    if config.engine == "llamacpp" and model.format != "gguf":
        raise PlanRefused(
            f"llama.cpp loads GGUF files and {model.path} is a {model.format} model; convert "
            "it to GGUF or plan it with engine='vllm'"
        )
    if config.engine == "vllm":
        if model.format != "safetensors":
            raise PlanRefused(
                f"vLLM is planned for safetensors model directories and {model.path} is "
                f"{model.format}; use engine='llamacpp' for GGUF files"
            )
        if config.device == "cpu":
            raise PlanRefused(
                "vLLM runs on CUDA GPUs only; use engine='llamacpp' with a GGUF for CPU"
            )
    if config.engine not in ("llamacpp", "vllm"):
        raise PlanRefused(f"no runtime planning for engine {config.engine!r}; use llamacpp or vllm")
    context = config.context_length or (
        min(DEFAULT_LLAMACPP_CONTEXT, model.meta.context_length or DEFAULT_LLAMACPP_CONTEXT)
        if config.engine == "llamacpp"
        else model.meta.context_length or 4096
    )
    nodes = list(config.nodes)
    if config.node_id is not None:
        nodes = [n for n in nodes if n.node_id == config.node_id]
        if not nodes:
            known = ", ".join(n.node_id for n in config.nodes) or "(none)"
            raise PlanRefused(f"node {config.node_id!r} is not known; known nodes: {known}")
    if not nodes:
        raise PlanRefused("no nodes to plan on; pass the cluster's NodeFacts in config.nodes")

    options: list[_Option] = []
    reasons: list[str] = []
    for node in nodes:
        found, why = (
            _llamacpp_options(model, config, context, node)
            if config.engine == "llamacpp"
            else _vllm_options(model, config, context, node)
        )
        options += found
        reasons += why
    if not options:
        largest_ram = max(nodes, key=free_ram)
        gpus = [(n, g) for n in nodes for g in n.gpus]
        largest = f"largest free RAM {gib(free_ram(largest_ram))} on {largest_ram.node_id}"
        if gpus:
            n, g = max(gpus, key=lambda ng: free_gpu(ng[1]))
            largest += (
                f", largest free GPU memory {gib(free_gpu(g))} (GPU {g.index} on {n.node_id})"
            )
        raise PlanRefused(
            f"no node can run {model.name} with {config.engine} at {context} tokens: "
            + "; ".join(reasons)
            + f" ({largest}). Lower context_length, use a smaller quantization, or add capacity"
        )
    best = max(
        options,
        key=lambda o: (o.fallback is None, o.device == "cuda", o.gpu_layers, o.fit.headroom_bytes),
    )
    return RuntimePlan(
        engine=config.engine,
        node_id=best.node.node_id,
        device=best.device,
        gpu_layers=best.est.gpu_layers,
        context_length=best.est.context_length,
        kv_cache_type=best.est.kv_cache_type,
        model=model,
        estimate=best.est,
        fit=best.fit,
        fallback=best.fallback,
        gpu_indices=best.fit.gpu_indices,
    )
