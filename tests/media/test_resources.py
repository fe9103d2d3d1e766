"""Resource estimates and placement: llama.cpp figures for SmolLM2, offload splits, vLLM, fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.base import GpuFact, NodeFacts
from engines.gguf_meta import read_gguf_meta, read_safetensors_meta
from engines.resources import (
    EstimateError,
    NoNodeFits,
    choose_fit,
    estimate,
    fits,
    kv_cache_bytes,
    llamacpp_cells,
)
from engines.resources.probe import parse_llamacpp_log
from media.model_files import write_hf_model_dir, write_tiny_gguf

MiB = 2**20
GiB = 2**30


@pytest.fixture(scope="module")
def smol(smollm2: Path):
    return read_gguf_meta(smollm2)


@pytest.mark.parametrize("ctx, mib", [(512, 11.25), (2048, 45.00)])
def test_smollm2_f16_kv_cache_matches_llamacpp(smol, ctx: int, mib: float):
    # llama.cpp: "llama_kv_cache: size = 11.25 MiB (512 cells ...)" and 45.00 MiB at 2048.
    est = estimate(smol, ctx)
    assert est.kv_cache_bytes / MiB == pytest.approx(mib, rel=0.01)
    assert est.context_length == ctx


def test_context_is_padded_to_256_cells_like_llamacpp(smol):
    assert llamacpp_cells(1000) == 1024
    assert llamacpp_cells(1) == 256
    assert llamacpp_cells(2048, parallel=3) == 3 * 768  # pad(2048 / 3) per slot
    est = estimate(smol, 1000)
    assert est.context_length == 1024 and est.requested_context_length == 1000
    assert est.kv_cache_bytes / MiB == pytest.approx(22.5)


def test_quantized_kv_types_scale_by_block_size(smol):
    f16 = estimate(smol, 2048).kv_cache_bytes
    q8 = estimate(smol, 2048, overrides={"kv_cache_type": "q8_0", "flash_attn": True})
    q4 = estimate(smol, 2048, overrides={"kv_cache_type": "q4_0", "flash_attn": True})
    assert q8.kv_cache_bytes == pytest.approx(f16 * 34 / 64)
    assert q4.kv_cache_bytes == pytest.approx(f16 * 18 / 64)
    assert q8.kv_cache_type == "q8_0"
    mixed = estimate(smol, 2048, overrides={"cache_type_k": "q8_0", "cache_type_v": "f16"})
    assert mixed.kv_cache_type == "q8_0/f16"


def test_quantized_v_cache_without_flash_attention_is_refused(smol):
    with pytest.raises(EstimateError, match="flash_attn"):
        estimate(smol, 2048, overrides={"kv_cache_type": "q8_0"})
    with pytest.raises(EstimateError, match="q3_k"):
        estimate(smol, 2048, overrides={"kv_cache_type": "q3_k"})


def test_context_beyond_training_is_refused(smol):
    with pytest.raises(EstimateError, match="8192"):
        estimate(smol, 16384)


def test_cpu_only_estimate_has_no_vram_and_matches_the_logged_compute_buffer(smol):
    est = estimate(smol, 512)
    assert est.vram_bytes == 0
    assert est.weights_bytes / MiB == pytest.approx(92.10, abs=0.01)
    # "CPU compute buffer size = 98.25 MiB" at n_ctx 512 (and 49.13 at 256).
    assert est.compute_bytes / MiB == pytest.approx(98.25, rel=0.01)
    assert estimate(smol, 256).compute_bytes / MiB == pytest.approx(49.13, rel=0.01)
    assert est.ram_bytes > est.weights_bytes + est.kv_cache_bytes


def test_gpu_layers_move_weights_and_kv_to_vram(smol):
    cpu = estimate(smol, 2048)
    half = estimate(smol, 2048, overrides={"gpu_layers": 15})
    full = estimate(smol, 2048, overrides={"gpu_layers": -1})
    assert half.details["kv_vram"] == pytest.approx(cpu.kv_cache_bytes / 2)
    assert half.details["weights_vram"] == sum(smol.layer_bytes[15:])
    assert 0 < half.vram_bytes < full.vram_bytes
    assert full.gpu_layers == smol.n_layers + 1
    assert full.details["kv_ram"] == 0
    # Tied head: offloading the output puts a copy of the embedding table on the GPU,
    # while the input embedding stays in RAM.
    assert full.details["weights_vram"] == sum(smol.layer_bytes) + smol.output_bytes + (
        smol.embedding_bytes
    )
    assert full.details["weights_ram"] == smol.embedding_bytes
    assert full.ram_bytes < half.ram_bytes < cpu.ram_bytes


def test_per_layer_kv_heads_are_summed(tmp_path: Path):
    meta = read_gguf_meta(
        write_tiny_gguf(tmp_path / "t.gguf", n_layers=3, n_kv_heads=[1, 2, 4], key_length=24,
                        value_length=8)
    )  # fmt: skip
    assert kv_cache_bytes(meta, 256) == 256 * (1 + 2 + 4) * (24 + 8) * 2


def test_vllm_estimate_for_a_safetensors_model(tmp_path: Path):
    meta = read_safetensors_meta(
        write_hf_model_dir(tmp_path / "m", layers=4, hidden=256, heads=8, kv_heads=2)
    )
    est = estimate(meta, 4096, "vllm", {"max_model_len": 2048})
    assert est.context_length == 2048  # max_model_len caps the context
    assert est.details["kv_bytes_per_token"] == 2 * 4 * 2 * 32 * 2  # bf16
    assert est.kv_cache_bytes == 2048 * est.details["kv_bytes_per_token"]
    assert est.weights_bytes == meta.tensor_bytes
    fp8 = estimate(meta, 2048, "vllm", {"kv_cache_dtype": "fp8"})
    assert fp8.kv_cache_bytes == est.kv_cache_bytes // 2
    with pytest.raises(EstimateError, match="max_position_embeddings"):
        estimate(meta, 2048, "vllm", {"max_model_len": 100_000})
    with pytest.raises(EstimateError, match="GGUF"):
        estimate(meta, 2048, "llamacpp")


def test_vllm_fit_uses_gpu_memory_utilization(tmp_path: Path):
    meta = read_safetensors_meta(write_hf_model_dir(tmp_path / "m"))
    est = estimate(meta, 4096, "vllm", {"gpu_memory_utilization": 0.5})
    need = est.details["vram_per_gpu"]
    roomy = NodeFacts(node_id="g", memory_bytes=64 * GiB,
                      gpus=[GpuFact(index=0, name="A", memory_bytes=4 * need)])  # fmt: skip
    assert fits(est, roomy).fits
    tight = NodeFacts(node_id="t", memory_bytes=64 * GiB,
                      gpus=[GpuFact(index=0, name="A", memory_bytes=int(1.5 * need))])  # fmt: skip
    answer = fits(est, tight)
    assert not answer.fits and "gpu_memory_utilization" in answer.reason
    busy_gpu = GpuFact(index=0, memory_bytes=4 * need, free_memory_bytes=need)
    busy = NodeFacts(node_id="b", memory_bytes=64 * GiB, gpus=[busy_gpu])
    assert "is free" in fits(est, busy).reason
    cpu_only = NodeFacts(node_id="c", memory_bytes=64 * GiB)
    assert "no GPU" in fits(est, cpu_only).reason


def test_fits_and_choose_fit_name_the_largest_free_memory(smol):
    est = estimate(smol, 2048)
    small = NodeFacts(node_id="small", memory_bytes=8 * GiB, free_memory_bytes=100 * MiB)
    big = NodeFacts(node_id="big", memory_bytes=8 * GiB, free_memory_bytes=6 * GiB)
    assert not fits(est, small).fits
    assert "0.10 GiB free" in fits(est, small).reason
    answer = choose_fit(est, [small, big])
    assert answer.node_id == "big" and answer.fits and answer.free_bytes == 6 * GiB
    with pytest.raises(NoNodeFits, match=r"largest free RAM is 0\.10 GiB on small") as info:
        choose_fit(est, [small])
    assert [f.node_id for f in info.value.fits] == ["small"]

    gpu_est = estimate(smol, 2048, overrides={"gpu_layers": -1})
    tiny_gpu = NodeFacts(node_id="g1", memory_bytes=8 * GiB,
                         gpus=[GpuFact(index=0, name="T4", memory_bytes=64 * MiB)])  # fmt: skip
    with pytest.raises(NoNodeFits, match=r"largest free GPU memory is 0\.06 GiB \(GPU 0 on g1\)"):
        choose_fit(gpu_est, [tiny_gpu, big])


def test_gpu_fit_spreads_layers_over_several_gpus(smol):
    est = estimate(smol, 2048, overrides={"gpu_layers": -1})
    half = est.vram_bytes // 2 + MiB
    node = NodeFacts(node_id="two", memory_bytes=8 * GiB, gpus=[
        GpuFact(index=0, memory_bytes=half), GpuFact(index=1, memory_bytes=half)])  # fmt: skip
    answer = fits(est, node)
    assert answer.fits and set(answer.gpu_indices) == {0, 1}


def test_llamacpp_log_parsing():
    log = parse_llamacpp_log(
        "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n"
        "load_tensors:        CUDA0 model buffer size =    10.00 MiB\n"
        "llama_context: n_ctx                 = 2048\n"
        "llama_context:        CPU  output buffer size =     0.19 MiB\n"
        "llama_kv_cache:      CUDA0 KV buffer size =    40.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =     5.00 MiB\n"
        "llama_kv_cache: size =   45.00 MiB (  2048 cells,  30 layers,  1/1 seqs), "
        "K (f16):   22.50 MiB, V (q8_0):   22.50 MiB\n"
        "sched_reserve:        CPU compute buffer size =    99.38 MiB\n"
        "~llama_context:        CPU compute buffer size is  99.3770 MiB, matches expectation\n"
    )
    assert log.n_ctx == 2048
    assert log.kv_bytes == 45 * MiB and log.kv_cells == 2048
    assert (log.kv_type_k, log.kv_type_v) == ("f16", "q8_0")
    assert log.compute_bytes == {"CPU": round(99.38 * MiB)}
    assert log.model_bytes == {"CPU_Mapped": round(92.10 * MiB), "CUDA0": 10 * MiB}
    assert log.output_bytes == {"CPU": round(0.19 * MiB)}
    assert log.kv_buffers == {"CUDA0": 40 * MiB, "CPU": 5 * MiB}
    assert log.on_gpu(log.kv_buffers) == 40 * MiB
    assert log.on_gpu(log.model_bytes) == 10 * MiB
    assert parse_llamacpp_log("nothing here").kv_bytes is None
