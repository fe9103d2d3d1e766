"""Whether an estimate fits a node, and which node to place a load on.

Pure functions over :class:`engines.base.NodeFacts`. Free memory is the
reported free figure when the node agent gave one, else the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from engines.base import GpuFact, NodeFacts
from engines.resources.estimate import GiB, ResourceEstimate


class NoNodeFits(ValueError):
    """No node has room for a load; the message names the largest free memory found."""

    def __init__(self, message: str, fits: list[NodeFit]) -> None:
        super().__init__(message)
        self.fits = fits


@dataclass(frozen=True)
class NodeFit:
    """The answer for one node: ``{node_id, fits, reason, free_bytes}`` plus the GPUs chosen."""

    node_id: str
    fits: bool
    reason: str
    #: Free memory of the binding resource: GPU memory for GPU loads, RAM otherwise.
    free_bytes: int
    free_ram_bytes: int = 0
    gpu_indices: tuple[int, ...] = ()
    #: Headroom left after the load (negative when it does not fit).
    headroom_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu_indices"] = list(self.gpu_indices)
        return data


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (``1.25 GiB``)."""
    return f"{n / GiB:.2f} GiB"


def free_ram(node: NodeFacts) -> int:
    return node.free_memory_bytes if node.free_memory_bytes is not None else node.memory_bytes


def free_gpu(gpu: GpuFact) -> int:
    return gpu.free_memory_bytes if gpu.free_memory_bytes is not None else gpu.memory_bytes


def fits(estimate: ResourceEstimate, node: NodeFacts) -> NodeFit:
    """Whether ``estimate`` fits ``node`` now, with the reason either way.

    llama.cpp: VRAM must fit in the free memory of the node's GPUs (layers
    split across them, best GPU first), RAM in the node's free memory. vLLM:
    ``tensor_parallel_size`` GPUs must each have ``gpu_memory_utilization`` *
    their memory free (vLLM refuses to start otherwise) and that budget must
    hold the per-GPU need; RAM as for llama.cpp.
    """
    ram = free_ram(node)
    need_ram = estimate.ram_bytes
    if not estimate.needs_gpu:
        ok = ram >= need_ram
        reason = (
            f"needs {gib(need_ram)} RAM; {node.node_id} has {gib(ram)} free"
            if ok
            else f"needs {gib(need_ram)} RAM but {node.node_id} has only {gib(ram)} free; "
            "lower context_length or pick a smaller model/quantization"
        )
        return NodeFit(node.node_id, ok, reason, ram, ram, (), ram - need_ram)
    if not node.gpus:
        return NodeFit(
            node.node_id, False,
            f"needs {gib(estimate.vram_bytes)} of GPU memory but {node.node_id} has no GPU; "
            "use gpu_layers=0 (CPU) or a GPU node",
            0, ram, (), -estimate.vram_bytes,
        )  # fmt: skip
    gpus = sorted(node.gpus, key=free_gpu, reverse=True)
    if estimate.provider == "vllm":
        return _fits_vllm(estimate, node, gpus, ram)
    chosen: list[int] = []
    room = 0
    for gpu in gpus:
        chosen.append(gpu.index)
        room += free_gpu(gpu)
        if room >= estimate.vram_bytes:
            break
    if room < estimate.vram_bytes:
        best = gpus[0]
        return NodeFit(
            node.node_id, False,
            f"needs {gib(estimate.vram_bytes)} of GPU memory but {node.node_id}'s GPUs have "
            f"{gib(room)} free in all (largest: GPU {best.index} {best.name} with "
            f"{gib(free_gpu(best))}); lower gpu_layers or context_length",
            room, ram, tuple(chosen), room - estimate.vram_bytes,
        )  # fmt: skip
    if ram < need_ram:
        return NodeFit(
            node.node_id, False,
            f"GPU memory suffices but it needs {gib(need_ram)} RAM and {node.node_id} has "
            f"{gib(ram)} free; free memory or offload more layers",
            room, ram, tuple(chosen), ram - need_ram,
        )  # fmt: skip
    where = ", ".join(f"GPU {i}" for i in chosen)
    return NodeFit(
        node.node_id, True,
        f"needs {gib(estimate.vram_bytes)} GPU memory ({where}: {gib(room)} free) and "
        f"{gib(need_ram)} RAM ({gib(ram)} free)",
        room, ram, tuple(chosen), room - estimate.vram_bytes,
    )  # fmt: skip


def _fits_vllm(
    estimate: ResourceEstimate, node: NodeFacts, gpus: list[GpuFact], ram: int
) -> NodeFit:
    tp = int(estimate.details.get("tensor_parallel_size", 1))
    util = float(estimate.details.get("gpu_memory_utilization", 0.9))
    per_gpu = int(estimate.details.get("vram_per_gpu", estimate.vram_bytes))
    if len(gpus) < tp:
        return NodeFit(
            node.node_id, False,
            f"tensor_parallel_size={tp} needs {tp} GPUs; {node.node_id} has {len(gpus)}",
            free_gpu(gpus[0]), ram, (), -per_gpu,
        )  # fmt: skip
    chosen = gpus[:tp]
    worst = min(chosen, key=free_gpu)
    budget = int(util * worst.memory_bytes)
    if free_gpu(worst) < budget:
        return NodeFit(
            node.node_id, False,
            f"vLLM takes gpu_memory_utilization={util} * {gib(worst.memory_bytes)} = "
            f"{gib(budget)} on GPU {worst.index} but only {gib(free_gpu(worst))} is free; "
            "lower gpu_memory_utilization or free the GPU",
            free_gpu(worst), ram, tuple(g.index for g in chosen), free_gpu(worst) - budget,
        )  # fmt: skip
    if budget < per_gpu:
        return NodeFit(
            node.node_id, False,
            f"needs {gib(per_gpu)} per GPU (weights, KV for {estimate.context_length} tokens, "
            f"activations) but the vLLM budget is {gib(budget)}; lower max_model_len, raise "
            "gpu_memory_utilization or add tensor parallelism",
            free_gpu(worst), ram, tuple(g.index for g in chosen), budget - per_gpu,
        )  # fmt: skip
    if ram < estimate.ram_bytes:
        return NodeFit(
            node.node_id, False,
            f"needs {gib(estimate.ram_bytes)} RAM for the vLLM processes; {node.node_id} has "
            f"{gib(ram)} free",
            free_gpu(worst), ram, tuple(g.index for g in chosen), ram - estimate.ram_bytes,
        )  # fmt: skip
    kv_per_token = int(estimate.details.get("kv_bytes_per_token", 0)) or 1
    spare_tokens = (budget - per_gpu) * tp // kv_per_token + estimate.context_length
    return NodeFit(
        node.node_id, True,
        f"fits: vLLM budget {gib(budget)} per GPU holds {gib(per_gpu)}; KV room for about "
        f"{spare_tokens} tokens",
        free_gpu(worst), ram, tuple(g.index for g in chosen), budget - per_gpu,
    )  # fmt: skip


def choose_fit(estimate: ResourceEstimate, nodes: Sequence[NodeFacts]) -> NodeFit:
    """The node with the most headroom that fits ``estimate``; NoNodeFits naming the largest free.

    The refusal says what the load needs and the largest free GPU memory and
    RAM seen on any node (and where), so the caller can lower gpu_layers,
    context_length or pick a smaller quantization.
    """
    if not nodes:
        raise NoNodeFits("no nodes are known; start a node agent (or a Ray node) first", [])
    answers = [fits(estimate, n) for n in nodes]
    good = [a for a in answers if a.fits]
    if good:
        return max(good, key=lambda a: a.headroom_bytes)
    best_ram = max(nodes, key=free_ram)
    parts = [f"the largest free RAM is {gib(free_ram(best_ram))} on {best_ram.node_id}"]
    gpu_nodes = [(n, g) for n in nodes for g in n.gpus]
    if estimate.needs_gpu:
        if gpu_nodes:
            node, gpu = max(gpu_nodes, key=lambda ng: free_gpu(ng[1]))
            parts.insert(
                0,
                f"the largest free GPU memory is {gib(free_gpu(gpu))} "
                f"(GPU {gpu.index} on {node.node_id})",
            )
        else:
            parts.insert(0, "no node has a GPU")
    need = f"{gib(estimate.ram_bytes)} RAM"
    if estimate.needs_gpu:
        need = f"{gib(estimate.vram_bytes)} GPU memory and " + need
    raise NoNodeFits(
        f"no node can hold this {estimate.provider} load (needs {need} at "
        f"{estimate.context_length} tokens): {'; '.join(parts)}. Lower context_length or "
        "gpu_layers, use a smaller quantization, or add capacity",
        answers,
    )
