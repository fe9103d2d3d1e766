"""Placement is a pure function: nodes with the engine installed, fit, spread or pack."""

from __future__ import annotations

import pytest

from actors.placement import Candidate, NoPlacement, choose_node
from engines.base import GpuFact, NodeFacts
from engines.resources import ResourceEstimate

GiB = 1024**3


def node(node_id: str, free_gib: float, gpus: int = 0) -> dict[str, object]:
    facts = NodeFacts(node_id=node_id, cpu_count=2, memory_bytes=int(32 * GiB),
                      free_memory_bytes=int(free_gib * GiB),
                      gpus=[GpuFact(index=i, name="G", memory_bytes=16 * GiB,
                                    free_memory_bytes=16 * GiB) for i in range(gpus)])
    return {"node_id": node_id, "facts": facts.model_dump(), "record": {"python": "/x"},
            "engine_version": "1"}


def cpu_estimate(ram_gib: float) -> ResourceEstimate:
    n = int(ram_gib * GiB)
    return ResourceEstimate(provider="llamacpp", context_length=2048,
                            requested_context_length=2048, weights_bytes=n, kv_cache_bytes=0,
                            compute_bytes=0, vram_bytes=0, ram_bytes=n, gpu_layers=0,
                            kv_cache_type="f16")


def test_no_installed_node_is_refused_with_what_to_do() -> None:
    with pytest.raises(NoPlacement, match="begin_install"):
        choose_node([], None)


def test_spread_prefers_most_free_memory_and_pack_the_least_that_fits() -> None:
    rows = [node("a", 4), node("b", 12), node("c", 1)]
    assert choose_node(rows, cpu_estimate(2)).node_id == "b"
    assert choose_node(rows, cpu_estimate(2), strategy="pack").node_id == "a"
    assert choose_node(rows, None).node_id == "b"


def test_a_node_that_does_not_fit_is_skipped_and_none_fitting_names_the_nodes() -> None:
    rows = [node("small", 1), node("big", 8)]
    assert choose_node(rows, cpu_estimate(4), strategy="pack").node_id == "big"
    with pytest.raises(NoPlacement, match=r"small.*big|big.*small"):
        choose_node(rows, cpu_estimate(20))


def test_memory_reserved_by_runtimes_already_placed_counts() -> None:
    rows = [node("a", 6), node("b", 5)]
    assert choose_node(rows, cpu_estimate(1)).node_id == "a"
    assert choose_node(rows, cpu_estimate(1), reserved_bytes={"a": 3 * GiB}).node_id == "b"


def test_ties_are_broken_by_node_id_and_candidates_accept_dataclasses() -> None:
    rows = [Candidate.from_row(node("z", 4)), Candidate.from_row(node("m", 4))]
    assert choose_node(rows, None).node_id == "m"
    assert choose_node(rows, None).record == {"python": "/x"}


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(NoPlacement, match="spread, pack"):
        choose_node([node("a", 1)], None, strategy="random")


def gpu_estimate(vram_gib: float, ram_gib: float = 1) -> ResourceEstimate:
    return ResourceEstimate(provider="llamacpp", context_length=2048,
                            requested_context_length=2048, weights_bytes=int(vram_gib * GiB),
                            kv_cache_bytes=0, compute_bytes=0, vram_bytes=int(vram_gib * GiB),
                            ram_bytes=int(ram_gib * GiB), gpu_layers=-1, kv_cache_type="f16")


def with_ray_gpus(row: dict[str, object], gpus: float) -> dict[str, object]:
    facts = dict(row["facts"])  # type: ignore[call-overload]
    facts["ray_resources"] = {"CPU": 2.0, "GPU": gpus}
    return {**row, "facts": facts}


def test_gpu_estimate_goes_to_the_node_with_logical_gpus_even_without_gpu_facts() -> None:
    rows = [with_ray_gpus(node("cpu", 20), 0), with_ray_gpus(node("sim-gpu", 4), 1)]
    placed = choose_node(rows, gpu_estimate(2))
    assert placed.node_id == "sim-gpu" and placed.num_gpus == 1
    assert "logical GPUs" in placed.reason
    assert choose_node(rows, cpu_estimate(2)).node_id == "cpu"  # CPU loads: most free RAM
    with pytest.raises(NoPlacement, match="Ray reports no GPU"):
        choose_node(rows[:1], gpu_estimate(2))


def test_physical_gpus_are_capped_by_what_ray_offers() -> None:
    rows = [with_ray_gpus(node("two", 8, gpus=2), 1)]
    with pytest.raises(NoPlacement, match="Ray offers 1"):
        choose_node(rows, gpu_estimate(20))  # needs both 16 GiB GPUs; Ray lends one
    assert choose_node(rows, gpu_estimate(10)).gpu_indices == (0,)
