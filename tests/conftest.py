"""Shared test configuration: GPU tests skip cleanly where no GPU is present."""

from __future__ import annotations

import shutil
import subprocess

import pytest

# Session fixtures that install and run the real llama.cpp engine (tests/fixtures_engine.py).
pytest_plugins = ["fixtures_engine"]


def _has_cuda_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (nvidia-smi found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
