"""Where a model runtime goes: a pure decision over the nodes that have the engine installed.

``choose_node(candidates, estimate, strategy)`` takes the rows of
``ControlPlane.installed_nodes`` (alive nodes whose latest install of the engine
succeeded, with their facts) and the model's memory estimate when one exists, and
returns a ``Placement``. It never touches Ray, the ledger or a process: callers
turn its answer into a pinned Serve replica.

Rules, in order:

1. only nodes with the engine installed are candidates (none: ``NoPlacement``);
2. with an estimate, a node must fit it (``engines.resources.fits``), after
   subtracting memory that runtimes already placed there reserve (facts may be
   older than the latest loads); none fits: ``NoPlacement`` naming the best free memory;
3. GPUs are Ray's logical GPUs (``facts.ray_resources.GPU``, what the pinned replica
   requests): a GPU estimate needs a node with enough of them; where the node
   reports no physical GPU memory (a simulated node declaring GPUs) the GPU
   memory is unknown and only the count and the RAM are checked;
4. ``spread`` (default) prefers the most free memory of the binding resource,
   ``pack`` the least free memory that still fits; ties go to the lowest node id
   so the answer is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engines.base import NodeFacts
from engines.resources import ResourceEstimate, fits
from engines.resources.fit import NodeFit, free_ram, gib

Strategy = Literal["spread", "pack"]
STRATEGIES: tuple[str, ...] = ("spread", "pack")


class NoPlacement(ValueError):
    """No node can take the runtime; the message says why and what to do."""


@dataclass(frozen=True)
class Candidate:
    """One node that has the engine installed: its id, facts and install record."""

    node_id: str
    facts: NodeFacts
    record: dict[str, Any] = field(default_factory=dict)
    engine_version: str = ""
    #: Ray's logical GPUs on the node (``facts.ray_resources.GPU``); None when not reported.
    ray_gpus: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Candidate:
        """Build from an ``installed_nodes`` row (``facts`` may be a dict or NodeFacts)."""
        facts = row.get("facts") or {}
        ray_gpus: float | None = None
        if not isinstance(facts, NodeFacts):
            resources = facts.get("ray_resources")
            if isinstance(resources, Mapping):
                ray_gpus = float(resources.get("GPU", 0) or 0)
            facts = NodeFacts.model_validate({**facts, "node_id": row["node_id"]})
        return cls(node_id=str(row["node_id"]), facts=facts,
                   record=dict(row.get("record") or {}),
                   engine_version=str(row.get("engine_version") or ""), ray_gpus=ray_gpus)


@dataclass(frozen=True)
class Placement:
    """The chosen node, the GPUs to use there (empty on CPU) and why it was chosen."""

    node_id: str
    record: dict[str, Any]
    reason: str
    gpu_indices: tuple[int, ...] = ()
    free_bytes: int | None = None

    @property
    def num_gpus(self) -> int:
        return len(self.gpu_indices)


def _less_reserved(facts: NodeFacts, reserved: int) -> NodeFacts:
    if reserved <= 0:
        return facts
    return facts.model_copy(update={"free_memory_bytes": max(0, free_ram(facts) - reserved)})


def _gpus_needed(estimate: ResourceEstimate) -> int:
    if estimate.provider == "vllm":
        return max(1, int(estimate.details.get("tensor_parallel_size", 1)))
    return 1


def _fit(estimate: ResourceEstimate, facts: NodeFacts, ray_gpus: float | None) -> NodeFit:
    """``engines.resources.fits`` with Ray's logical GPU count applied (see rule 3)."""
    if not estimate.needs_gpu or ray_gpus is None:
        return fits(estimate, facts)
    want = _gpus_needed(estimate)
    if ray_gpus < 1:
        return NodeFit(facts.node_id, False, f"needs a GPU but Ray reports no GPU on "
                       f"{facts.node_id}", 0, free_ram(facts))
    if facts.gpus:
        fit = fits(estimate, facts)
        if fit.fits and len(fit.gpu_indices) > ray_gpus:
            return NodeFit(facts.node_id, False,
                           f"needs {len(fit.gpu_indices)} GPUs but Ray offers {ray_gpus:g} on "
                           f"{facts.node_id}", fit.free_bytes, fit.free_ram_bytes)
        return fit
    ram = free_ram(facts)
    if ray_gpus < want:
        return NodeFit(facts.node_id, False, f"needs {want} GPUs but Ray offers {ray_gpus:g} "
                       f"on {facts.node_id}", 0, ram)
    if ram < estimate.ram_bytes:
        return NodeFit(facts.node_id, False,
                       f"needs {gib(estimate.ram_bytes)} RAM but {facts.node_id} has only "
                       f"{gib(ram)} free", 0, ram)
    return NodeFit(facts.node_id, True,
                   f"{want} of {ray_gpus:g} logical GPUs (GPU memory not reported; "
                   f"{gib(estimate.vram_bytes)} needed) and {gib(estimate.ram_bytes)} RAM "
                   f"({gib(ram)} free)", ram, ram, tuple(range(want)))


def choose_node(
    candidates: Sequence[Candidate | Mapping[str, Any]],
    estimate: ResourceEstimate | None = None,
    strategy: str = "spread",
    reserved_bytes: Mapping[str, int] | None = None,
    engine_label: str = "the engine",
) -> Placement:
    """Pick the node for one runtime; raise ``NoPlacement`` when none qualifies.

    ``reserved_bytes`` maps node ids to RAM already promised to runtimes placed
    there. Without an estimate every candidate fits and free RAM decides.
    """
    if strategy not in STRATEGIES:
        raise NoPlacement(f"placement strategy must be one of {', '.join(STRATEGIES)}, "
                          f"got {strategy!r}; set ROUNDHOUSE_PLACEMENT_STRATEGY")
    cands = [c if isinstance(c, Candidate) else Candidate.from_row(c) for c in candidates]
    if not cands:
        raise NoPlacement(f"no alive node has {engine_label} installed; install it first "
                          "(sdk.engines.begin_install) and check sdk.engines.install_status")
    reserved = dict(reserved_bytes or {})
    scored: list[tuple[int, str, Placement]] = []
    refusals: list[str] = []
    for cand in cands:
        facts = _less_reserved(cand.facts, reserved.get(cand.node_id, 0))
        if estimate is None:
            free = free_ram(facts)
            scored.append((free, cand.node_id, Placement(
                cand.node_id, cand.record, f"{gib(free)} RAM free (no estimate)", (), free)))
            continue
        fit = _fit(estimate, facts, cand.ray_gpus)
        if not fit.fits:
            refusals.append(f"{cand.node_id}: {fit.reason}")
            continue
        scored.append((fit.free_bytes, cand.node_id, Placement(
            cand.node_id, cand.record, fit.reason, tuple(fit.gpu_indices), fit.free_bytes)))
    if not scored:
        raise NoPlacement("no node with the engine installed has room for the model ("
                          + "; ".join(refusals) + "); unload another model, lower the "
                          "context length, or add a node with more memory")
    if strategy == "pack":
        scored.sort(key=lambda s: (s[0], s[1]))
    else:
        scored.sort(key=lambda s: (-s[0], s[1]))
    return scored[0][2]
