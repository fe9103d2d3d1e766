"""Resource estimates: what a model needs at a context length, and where it fits.

``estimate(meta, context_length, provider, overrides)`` → :class:`ResourceEstimate`
(weights, KV cache, compute, VRAM, RAM); ``fits(estimate, node)`` →
:class:`NodeFit`; ``choose_fit(estimate, nodes)`` picks a node or raises
:class:`NoNodeFits`. ``probe`` measures the real llama.cpp to check them.
"""

from engines.resources.estimate import (
    KV_TYPE_BYTES,
    EstimateError,
    ResourceEstimate,
    estimate,
    kv_cache_bytes,
    llamacpp_cells,
)
from engines.resources.fit import NodeFit, NoNodeFits, choose_fit, fits

__all__ = [
    "KV_TYPE_BYTES",
    "EstimateError",
    "NoNodeFits",
    "NodeFit",
    "ResourceEstimate",
    "choose_fit",
    "estimate",
    "fits",
    "kv_cache_bytes",
    "llamacpp_cells",
]
