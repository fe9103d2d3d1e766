"""The estimate against the real llama.cpp: logged KV cache and the process's resident memory.

Each case loads SmolLM2 with llama-cpp-python (the ``llamacpp_env`` install's
Python) in a child process, evaluates a prompt that fills the context (the
resident peak of serving a full context), and compares:

* the KV-cache size llama.cpp logs with the estimate (within 1%);
* the compute buffer it logs with the estimate (within 2%);
* the child's VmRSS growth over the load and prompt with ``ram_bytes`` (within 20%).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.gguf_meta import read_gguf_meta
from engines.plan import InstallRecord
from engines.resources import estimate
from engines.resources.probe import measure_llamacpp

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("n_ctx", [512, 2048])
def test_estimate_matches_the_real_llamacpp_load(
    llamacpp_env: InstallRecord, smollm2_path: Path, n_ctx: int
) -> None:
    assert llamacpp_env.python, "the llama.cpp install record names no python"
    measured = measure_llamacpp(
        llamacpp_env.python, smollm2_path, n_ctx=n_ctx, prompt_tokens=n_ctx - 64, timeout_s=600
    )
    est = estimate(read_gguf_meta(smollm2_path), n_ctx)

    assert measured.log.n_ctx == n_ctx
    assert measured.log.kv_bytes is not None, measured.stderr[-2000:]
    assert est.kv_cache_bytes == pytest.approx(measured.log.kv_bytes, rel=0.01)
    assert measured.log.kv_bytes / 2**20 == pytest.approx({512: 11.25, 2048: 45.00}[n_ctx])
    assert est.compute_bytes == pytest.approx(sum(measured.log.compute_bytes.values()), rel=0.02)
    assert est.weights_bytes == pytest.approx(sum(measured.log.model_bytes.values()), rel=0.01)
    assert measured.rss_growth > est.kv_cache_bytes + est.weights_bytes // 2
    assert est.ram_bytes == pytest.approx(measured.rss_growth, rel=0.20), (
        f"estimated {est.ram_bytes / 2**20:.1f} MiB RAM, measured "
        f"{measured.rss_growth / 2**20:.1f} MiB RSS growth"
    )
