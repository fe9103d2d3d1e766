"""Measure what the real llama.cpp allocates: parse its load log and the child's resident memory.

:func:`measure_llamacpp` runs ``python -c`` with the engine environment's
Python (one that can ``import llama_cpp``), loads a GGUF with ``verbose=True``
so llama.cpp logs its buffers to stderr, optionally evaluates a prompt, and
reports ``VmRSS`` from ``/proc/self/status`` before the load, after it, and
after the prompt. :func:`parse_llamacpp_log` turns lines such as::

    llama_kv_cache: size =   11.25 MiB (   512 cells,  30 layers,  1/1 seqs), K (f16): ...
    sched_reserve:        CPU compute buffer size =    98.25 MiB
    load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
    llama_context:        CPU  output buffer size =     0.19 MiB

into byte counts. Used by the real-engine test and ``scripts/bench_resources.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

#: llama.cpp's ggml_type ids for the KV-cache types llama-cpp-python accepts as type_k/type_v.
GGML_TYPE_IDS = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
    "iq4_nl": 20, "bf16": 30,
}  # fmt: skip

_KV_RE = re.compile(
    r"llama_kv_cache\w*:\s+size\s*=\s*([\d.]+)\s*MiB\s*\(\s*(\d+)\s*cells,\s*(\d+)\s*layers"
    r".*?K\s*\((\w+)\):\s*([\d.]+)\s*MiB,\s*V\s*\((\w+)\):\s*([\d.]+)\s*MiB"
)
_KV_OLD_RE = re.compile(r"KV self size\s*=\s*([\d.]+)\s*MiB")
_COMPUTE_RE = re.compile(r"(\S+)\s+compute buffer size\s*=\s*([\d.]+)\s*MiB")
_MODEL_RE = re.compile(r"(\S+)\s+model buffer size\s*=\s*([\d.]+)\s*MiB")
_KV_BUF_RE = re.compile(r"(\S+)\s+KV buffer size\s*=\s*([\d.]+)\s*MiB")
_OUTPUT_RE = re.compile(r"(\S+)\s+output buffer size\s*=\s*([\d.]+)\s*MiB")
_NCTX_RE = re.compile(r"llama_context:\s+n_ctx\s*=\s*(\d+)")

_CHILD = r"""
import json, os, sys
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
args = json.loads(sys.argv[1])
from llama_cpp import Llama
before = rss()
llm = Llama(model_path=args["model"], verbose=True, **args["kwargs"])
after_load = rss()
after_eval = after_load
n = args["prompt_tokens"]
if n:
    tokens = llm.tokenize(b" hello world" * (n // 2 + 8), add_bos=True)[:n]
    llm.eval(tokens)
    after_eval = rss()
sys.stdout.write("ROUNDHOUSE_PROBE " + json.dumps(
    {"rss_before": before, "rss_after_load": after_load, "rss_after_eval": after_eval,
     "prompt_tokens": n}) + "\n")
sys.stdout.flush()
"""


class ProbeError(RuntimeError):
    """The engine could not be started or its log did not say what was allocated."""


@dataclass(frozen=True)
class LlamaCppLog:
    """Byte counts llama.cpp logged while loading one model."""

    n_ctx: int | None = None
    kv_bytes: int | None = None
    kv_cells: int | None = None
    kv_type_k: str = ""
    kv_type_v: str = ""
    compute_bytes: dict[str, int] = field(default_factory=dict)
    model_bytes: dict[str, int] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    #: KV-cache buffers per device (``CPU``, ``CUDA0``…).
    kv_buffers: dict[str, int] = field(default_factory=dict)

    def on_gpu(self, sizes: dict[str, int]) -> int:
        """Bytes of ``sizes`` held by GPU devices (names other than CPU/CPU_Mapped/host)."""
        return sum(v for dev, v in sizes.items() if not dev.upper().startswith("CPU")
                   and "HOST" not in dev.upper())  # fmt: skip


def _mib(text: str) -> int:
    return round(float(text) * MiB)


def parse_llamacpp_log(text: str) -> LlamaCppLog:
    """Parse llama.cpp's verbose load log (stderr); missing lines leave fields empty/None."""
    kv = _KV_RE.search(text)
    kv_bytes = kv_cells = None
    tk = tv = ""
    if kv:
        kv_bytes, kv_cells = _mib(kv.group(1)), int(kv.group(2))
        tk, tv = kv.group(4), kv.group(6)
    elif old := _KV_OLD_RE.search(text):
        kv_bytes = _mib(old.group(1))
    compute: dict[str, int] = {}
    for dev, size in _COMPUTE_RE.findall(text):
        compute[dev] = _mib(size)  # the last reservation wins (llama.cpp may re-reserve)
    model: dict[str, int] = {}
    for dev, size in _MODEL_RE.findall(text):
        model[dev] = model.get(dev, 0) + _mib(size)
    output = {dev: _mib(size) for dev, size in _OUTPUT_RE.findall(text)}
    kv_buffers: dict[str, int] = {}
    for dev, size in _KV_BUF_RE.findall(text):
        kv_buffers[dev] = kv_buffers.get(dev, 0) + _mib(size)
    nctx = _NCTX_RE.search(text)
    return LlamaCppLog(
        n_ctx=int(nctx.group(1)) if nctx else None,
        kv_bytes=kv_bytes,
        kv_cells=kv_cells,
        kv_type_k=tk,
        kv_type_v=tv,
        compute_bytes=compute,
        model_bytes=model,
        output_bytes=output,
        kv_buffers=kv_buffers,
    )


@dataclass(frozen=True)
class LlamaCppMeasurement:
    """One real load: what llama.cpp logged and how the child's resident memory grew."""

    log: LlamaCppLog
    rss_before: int
    rss_after_load: int
    rss_after_eval: int
    prompt_tokens: int
    stderr: str

    @property
    def rss_growth(self) -> int:
        """Resident bytes the load (and prompt, if any) added to the process."""
        return max(self.rss_after_load, self.rss_after_eval) - self.rss_before


def measure_llamacpp(
    python: str | Path,
    model_path: str | Path,
    *,
    n_ctx: int,
    n_gpu_layers: int = 0,
    kv_cache_type: str = "f16",
    n_batch: int = 512,
    flash_attn: bool = False,
    prompt_tokens: int = 0,
    n_threads: int | None = None,
    timeout_s: float = 300,
    extra_kwargs: dict[str, Any] | None = None,
) -> LlamaCppMeasurement:
    """Load ``model_path`` with llama-cpp-python under ``python`` and measure it.

    ``prompt_tokens`` > 0 also evaluates a prompt of that many tokens (the
    working set of generation). Raises ProbeError with the tail of stderr when
    the child fails or prints no measurement.
    """
    kwargs: dict[str, Any] = {
        "n_ctx": n_ctx,
        "n_gpu_layers": n_gpu_layers,
        "n_batch": n_batch,
        "n_threads": n_threads or max(1, (os.cpu_count() or 2) - 1),
        "type_k": GGML_TYPE_IDS[kv_cache_type],
        "type_v": GGML_TYPE_IDS[kv_cache_type],
        "flash_attn": flash_attn,
        **(extra_kwargs or {}),
    }
    payload = json.dumps(
        {"model": str(model_path), "kwargs": kwargs, "prompt_tokens": prompt_tokens}
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", _CHILD, payload],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ProbeError(f"llama.cpp load of {model_path} took over {timeout_s}s") from exc
    except OSError as exc:
        raise ProbeError(
            f"cannot run {python}: {exc}; give the engine environment's python"
        ) from exc
    line = next(
        (ln for ln in proc.stdout.splitlines() if ln.startswith("ROUNDHOUSE_PROBE ")), None
    )
    if proc.returncode != 0 or line is None:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise ProbeError(
            f"llama.cpp load of {model_path} (n_ctx={n_ctx}, n_gpu_layers={n_gpu_layers}) "
            f"failed with exit code {proc.returncode}:\n{tail}"
        )
    data = json.loads(line.removeprefix("ROUNDHOUSE_PROBE "))
    return LlamaCppMeasurement(
        log=parse_llamacpp_log(proc.stderr),
        rss_before=int(data["rss_before"]),
        rss_after_load=int(data["rss_after_load"]),
        rss_after_eval=int(data["rss_after_eval"]),
        prompt_tokens=int(data["prompt_tokens"]),
        stderr=proc.stderr,
    )
