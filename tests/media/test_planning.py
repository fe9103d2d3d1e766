"""Materialization into a node's model cache, discovery, resolution and runtime plans."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from engines.artifacts import ChecksumMismatch, DirectoryArtifactStore, materialize
from engines.base import GpuFact, NodeFacts
from engines.planning import (
    ModelNotFound,
    PlanRefused,
    RuntimeConfig,
    discover_local_models,
    plan,
    resolve,
)
from media.model_files import write_hf_model_dir, write_tiny_gguf

MiB = 2**20
GiB = 2**30

CPU_NODE = NodeFacts(node_id="cpu-a", cpu_count=2, memory_bytes=24 * GiB,
                     free_memory_bytes=20 * GiB)  # fmt: skip


def gpu_node(node_id: str, gpu_bytes: int, ram: int = 24 * GiB) -> NodeFacts:
    return NodeFacts(
        node_id=node_id, memory_bytes=ram, free_memory_bytes=ram,
        gpus=[GpuFact(index=0, name="L4", memory_bytes=gpu_bytes)],
    )  # fmt: skip


# --- materialize -------------------------------------------------------------------------


def test_materialize_copies_verifies_and_reuses(store: DirectoryArtifactStore, tmp_path: Path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    ref = store.add_from_source("tiny", {"type": "local", "path": str(src)}).ref
    models = tmp_path / "node-models"
    calls: list[tuple[str, int, int | None, int]] = []
    path = materialize(store, ref, models, lambda *a: calls.append(a))
    assert path.name == "tiny.gguf" and path.read_bytes() == src.read_bytes()
    assert path.is_relative_to(models)
    assert calls[-1] == ("tiny.gguf", src.stat().st_size, src.stat().st_size, 0)
    mtime = path.stat().st_mtime_ns
    assert materialize(store, ref, models) == path  # reused, not copied again
    assert path.stat().st_mtime_ns == mtime
    assert list((models / ".staging").iterdir()) == []


def test_materialize_link_modes(store: DirectoryArtifactStore, tmp_path: Path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    ref = store.add_from_source("tiny", {"type": "local", "path": str(src)}).ref
    stored = store.file_path(ref, "tiny.gguf")
    hard = materialize(store, ref, tmp_path / "hard", mode="hardlink")
    assert os.stat(hard).st_ino == os.stat(stored).st_ino
    soft = materialize(store, ref, tmp_path / "soft", mode="symlink")
    assert soft.is_symlink() and soft.resolve() == stored.resolve()


def test_materialize_refuses_a_corrupt_store_copy(store: DirectoryArtifactStore, tmp_path: Path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    ref = store.add_from_source("tiny", {"type": "local", "path": str(src)}).ref
    stored = store.file_path(ref, "tiny.gguf")
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    models = tmp_path / "node"
    with pytest.raises(ChecksumMismatch, match=hashlib.sha256(bytes(data)).hexdigest()):
        materialize(store, ref, models)
    assert not (models / "tiny").exists()
    assert list((models / ".staging").iterdir()) == []


# --- discover / resolve ------------------------------------------------------------------


def test_discover_lists_gguf_files_and_model_dirs(store: DirectoryArtifactStore, tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / "loose.gguf")
    write_hf_model_dir(models / "org" / "hf-model")
    (models / "notes.txt").write_text("not a model")
    (models / "broken.gguf").write_bytes(b"nope")
    write_tiny_gguf(models / "big-00002-of-00002.gguf")  # a non-first shard is not a model
    ref = store.add_from_source(
        "tiny", {"type": "local", "path": str(write_tiny_gguf(tmp_path / "t.gguf"))}
    ).ref
    materialize(store, ref, models)

    found = {m.name: m for m in discover_local_models(models)}
    assert set(found) == {"loose", "hf-model", "tiny"}
    assert found["loose"].format == "gguf" and found["loose"].meta.n_layers == 2
    assert found["hf-model"].format == "safetensors"
    assert found["tiny"].artifact_ref == ref
    assert discover_local_models(tmp_path / "absent") == ()


def test_resolve_by_path_name_and_artifact_ref(store: DirectoryArtifactStore, tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    loose = write_tiny_gguf(models / "loose.gguf")
    ref = store.add_from_source(
        "tiny", {"type": "local", "path": str(write_tiny_gguf(tmp_path / "t.gguf"))}
    ).ref
    local = materialize(store, ref, models)

    assert resolve(str(loose), models).path == loose
    assert resolve("loose.gguf", models).path == loose
    assert resolve("loose", models).path == loose
    by_name = resolve("tiny", models)
    assert by_name.path == local and by_name.artifact_ref == ref
    by_ref = resolve(ref, models)
    assert by_ref.path == local and by_ref.size_bytes == local.stat().st_size
    assert by_ref.to_dict()["meta"]["architecture"] == "llama"
    with pytest.raises(ModelNotFound, match="loose, tiny"):
        resolve("missing", models)
    with pytest.raises(ModelNotFound, match="climbs out"):
        resolve("../outside.gguf", models)
    with pytest.raises(ModelNotFound, match="materialize"):
        resolve("tiny@ffffffffffffffff", models)


# --- plan --------------------------------------------------------------------------------


def test_plan_cpu_node_runs_on_cpu_without_fallback(smollm2: Path):
    p = plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], context_length=2048))
    assert (p.node_id, p.device, p.gpu_layers, p.fallback) == ("cpu-a", "cpu", 0, None)
    assert p.context_length == 2048 and p.kv_cache_type == "f16"
    assert p.estimate.kv_cache_bytes / MiB == pytest.approx(45.0)
    assert p.to_dict()["fit"]["fits"] is True


def test_plan_gpu_requested_on_a_cpu_node_falls_back_with_reason(smollm2: Path):
    p = plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], device="cuda"))
    assert (p.device, p.gpu_layers) == ("cpu", 0)
    assert p.fallback is not None and "has none" in p.fallback
    assert p.estimate.vram_bytes == 0


def test_plan_gpu_requested_without_fallback_is_refused(smollm2: Path):
    with pytest.raises(PlanRefused, match="allow_cpu_fallback is off"):
        plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], device="cuda",
                           allow_cpu_fallback=False))  # fmt: skip


def test_plan_prefers_a_gpu_node_and_offloads_everything(smollm2: Path):
    p = plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE, gpu_node("gpu-b", 16 * GiB)]))
    assert (p.node_id, p.device, p.fallback) == ("gpu-b", "cuda", None)
    assert p.gpu_layers == 31 and p.gpu_indices == (0,)


def test_plan_offloads_only_the_layers_that_fit(smollm2: Path):
    full = plan(RuntimeConfig(model=str(smollm2), nodes=[gpu_node("g", 16 * GiB)]))
    small = gpu_node("small", full.estimate.vram_bytes // 2)
    p = plan(RuntimeConfig(model=str(smollm2), nodes=[small]))
    assert p.device == "cuda" and 0 < p.gpu_layers < 30
    assert p.fallback is not None and f"only {p.gpu_layers} of 31 layers" in p.fallback
    assert p.estimate.vram_bytes <= small.gpus[0].memory_bytes


def test_plan_refuses_when_nothing_fits_naming_the_largest_free(smollm2: Path):
    tiny = NodeFacts(node_id="tiny", memory_bytes=GiB, free_memory_bytes=64 * MiB)
    with pytest.raises(PlanRefused, match=r"largest free RAM 0\.06 GiB on tiny"):
        plan(RuntimeConfig(model=str(smollm2), nodes=[tiny]))


def test_plan_refuses_impossible_requests(smollm2: Path, tmp_path: Path):
    with pytest.raises(PlanRefused, match="8192"):
        plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], context_length=100_000))
    with pytest.raises(PlanRefused, match="flash_attn"):
        plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], kv_cache_type="q4_0"))
    with pytest.raises(PlanRefused, match="not known; known nodes: cpu-a"):
        plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], node_id="elsewhere"))
    with pytest.raises(PlanRefused, match="GGUF"):
        plan(RuntimeConfig(model=str(write_hf_model_dir(tmp_path / "hf")), nodes=[CPU_NODE]))
    with pytest.raises(PlanRefused, match="CUDA GPU"):
        plan(RuntimeConfig(model=str(tmp_path / "hf"), engine="vllm", nodes=[CPU_NODE]))
    with pytest.raises(PlanRefused, match="contradict"):
        plan(RuntimeConfig(model=str(smollm2), nodes=[CPU_NODE], device="cpu", gpu_layers=5))


def test_plan_vllm_on_a_gpu_node(tmp_path: Path):
    d = write_hf_model_dir(tmp_path / "hf")
    p = plan(RuntimeConfig(model=str(d), engine="vllm", nodes=[CPU_NODE, gpu_node("g", 24 * GiB)],
                           overrides={"max_model_len": 2048}))  # fmt: skip
    assert (p.node_id, p.device, p.context_length) == ("g", "cuda", 2048)
    assert p.estimate.provider == "vllm"
