"""llama.cpp: llama-cpp-python's OpenAI-compatible server (package mode) or a real
``llama-server`` binary (binary and source modes), on CPU or CUDA.

Package mode runs ``python -m llama_cpp.server`` from the engine environment.
That server has no ``/health``, ``/metrics`` or ``/props``: it loads the model
before it opens its port, so readiness is ``GET /v1/models`` answering 200, and
its version is ``info.version`` of ``GET /openapi.json`` (read from its
installed source, llama_cpp/server/app.py). ``llama-server`` has ``/health``
(503 while loading), ``/metrics`` (with ``--metrics``) and ``/props``
(``build_info``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.base import (
    ConfigError,
    Dependency,
    EngineProvider,
    NodeFacts,
    Support,
    as_node,
)
from engines.errors import GpuUnavailable, NotInstalled
from engines.installers import installed_record
from engines.installers.package import engine_python, python_tag
from engines.installers.source import resolve_ref
from engines.launch import (
    ModelRef,
    PreparedEngine,
    default_threads,
    flag_value,
    force_cpu,
    free_port,
    has_flag,
    llamacpp_python_args,
    normalize_llamacpp_flags,
    with_llamacpp_defaults,
)
from engines.node import Node
from engines.plan import GpuBackend, InstallPlan, InstallRecord, check_policy
from engines.sandbox import resolve_run_as, sanitized_env

#: Portable CPU build: a -march=native build can crash on CPUs with AMX.
CPU_CMAKE_ARGS = "-DGGML_NATIVE=OFF"
CUDA_CMAKE_ARGS = "-DGGML_CUDA=ON -DGGML_NATIVE=OFF"

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


class LlamaCppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: llama-cpp-python release installed in package mode.
    version: str = LLAMA_CPP_PYTHON_VERSION
    install_mode: Literal["package", "binary", "source"] = "package"
    #: CMake flags for the build; None lets the node choose (CUDA or portable CPU).
    cmake_args: str | None = None
    #: Extra llama.cpp server flags, e.g. ["--ctx-size", "4096"].
    server_flags: list[str] = Field(default_factory=list)
    #: Layers offloaded to the GPU (-1 = all, 0 = CPU only).
    n_gpu_layers: int = 0
    ctx_size: int = 2048
    #: Decode threads; None = one less than the node's cores.
    n_threads: int | None = None
    #: binary mode: pinned archive URL and its sha256.
    binary_url: str | None = None
    binary_sha256: str | None = None
    #: source mode: repository URL or local path, and the ref to build.
    source_repo: str | None = None
    source_ref: str = "master"
    #: Fall back to CPU when a GPU is requested on a node without one.
    allow_cpu_fallback: bool = True
    #: package mode: a package index to install from (must be in ROUNDHOUSE_PACKAGE_INDEXES).
    index_url: str | None = None


class LlamaCppProvider(EngineProvider):
    id: ClassVar[str] = "llamacpp"
    label: ClassVar[str] = "llama.cpp"
    default_engine_version: ClassVar[str] = LLAMA_CPP_PYTHON_VERSION
    config_model: ClassVar[type[BaseModel]] = LlamaCppConfig

    def dependencies(self) -> list[Dependency]:
        return [
            Dependency(
                dependency_key="llama-cpp-python",
                label="llama-cpp-python[server]",
                scope="local",
            )
        ]

    def config_problem(self, config: BaseModel) -> str | None:
        assert isinstance(config, LlamaCppConfig)
        if config.install_mode == "binary" and not (config.binary_url and config.binary_sha256):
            return "binary mode needs binary_url and binary_sha256; set both in the config"
        if config.install_mode == "source" and not config.source_repo:
            return "source mode needs source_repo (a git URL or local path); set it in the config"
        return None

    def is_supported(self, facts: NodeFacts) -> Support:
        return Support(supported=True)

    # --- install --------------------------------------------------------------------

    def gpu_layers(self, cfg: LlamaCppConfig, node: Node) -> tuple[int, bool]:
        """``(n_gpu_layers to use, cpu_fallback)``; raises GpuUnavailable when a GPU is
        requested on a node without one and the config does not allow CPU fallback."""
        flags = normalize_llamacpp_flags(cfg.server_flags)
        raw = flag_value(flags, "--n-gpu-layers")
        try:
            layers = int(raw) if raw is not None else cfg.n_gpu_layers
        except ValueError:
            raise ConfigError(f"--n-gpu-layers needs a whole number, got {raw!r}") from None
        if layers != 0 and not node.has_gpu:
            if not cfg.allow_cpu_fallback:
                raise GpuUnavailable(
                    f"llama.cpp is configured for {layers} GPU layers but node "
                    f"{node.facts.node_id} has no GPU; set n_gpu_layers to 0, set "
                    "allow_cpu_fallback to true, or run it on a GPU node"
                )
            return 0, True
        return layers, False

    def build_flags(self, cfg: LlamaCppConfig, node: Node) -> tuple[str, GpuBackend, list[str]]:
        """CMake flags, GPU backend and notes: the config's flags when set, else CUDA when
        the node has a GPU and the CUDA toolkit, else a portable CPU build."""
        if cfg.cmake_args is not None:
            cuda = re.search(r"GGML_CUDA=(ON|1|TRUE|YES)", cfg.cmake_args.upper())
            return cfg.cmake_args, ("cuda" if cuda else "cpu"), []
        if node.has_gpu and node.facts.cuda_toolkit:
            return CUDA_CMAKE_ARGS, "cuda", []
        notes = []
        if node.has_gpu:
            notes.append(
                "node has a GPU but no CUDA toolkit (nvcc): building for CPU; install the "
                "CUDA toolkit and reinstall for GPU offload"
            )
        return CPU_CMAKE_ARGS, "cpu", notes

    def plan_install(
        self,
        config: BaseModel | dict[str, Any] | None,
        node: Node | NodeFacts,
        *,
        mode: str | None = None,
        enforce_policy: bool = True,
    ) -> InstallPlan:
        """Plan a package, binary or source install; see ``EngineProvider.plan_install``."""
        cfg = self.typed_config(config)
        assert isinstance(cfg, LlamaCppConfig)
        n = as_node(node)
        chosen = mode or cfg.install_mode
        if chosen != cfg.install_mode:
            cfg = cfg.model_copy(update={"install_mode": chosen})
        if chosen not in ("package", "binary", "source"):
            raise ConfigError(
                f"llama.cpp has no {chosen!r} install mode; use package, binary or source"
            )
        problem = self.config_problem(cfg)
        if problem:
            raise ConfigError(problem)
        _, fallback = self.gpu_layers(cfg, n)
        notes: list[str] = []
        if fallback:
            notes.append("GPU requested on a node without one: CPU fallback (allow_cpu_fallback)")
        cmake_args, backend, build_notes = self.build_flags(cfg, n)
        notes += build_notes
        inputs: dict[str, Any]
        if chosen == "package":
            indexes = [cfg.index_url] if cfg.index_url else list(n.settings.package_indexes)
            inputs = {
                "requirement": "llama-cpp-python",
                "extras": ["server"],
                "version": cfg.version,
                "build_env": {"CMAKE_ARGS": cmake_args},
                "python": python_tag(engine_python(n.settings)),
                "indexes": indexes,
                "index_url": cfg.index_url,
                "import_check": "llama_cpp.server.app",
            }
        elif chosen == "binary":
            assert cfg.binary_url and cfg.binary_sha256
            inputs = {
                "url": cfg.binary_url,
                "sha256": cfg.binary_sha256.lower(),
                "binary_name": "llama-server",
            }
            backend = "cuda" if n.has_gpu and not fallback else "cpu"
        else:
            assert cfg.source_repo
            inputs = {
                "repo": cfg.source_repo,
                "ref": cfg.source_ref,
                "cmake_args": cmake_args,
                "target": "llama-server",
            }
        plan = InstallPlan.build(
            provider=self.id,
            mode=chosen,  # type: ignore[arg-type]
            inputs=inputs,
            engine_root=n.engine_root,
            cache_dir=n.cache_dir,
            gpu_backend=backend,
            cpu_fallback=fallback,
            notes=notes,
        )
        if enforce_policy:
            check_policy(plan, n.settings)
        if chosen == "source":
            # The commit is an input: a moved branch must be a new cache key.
            inputs = {**inputs, "commit": resolve_ref(str(cfg.source_repo), cfg.source_ref)}
            plan = InstallPlan.build(
                provider=self.id,
                mode="source",
                inputs=inputs,
                engine_root=n.engine_root,
                cache_dir=n.cache_dir,
                gpu_backend=backend,
                cpu_fallback=fallback,
                notes=notes,
            )
        return plan

    # --- launch ----------------------------------------------------------------------

    def prepare(
        self,
        model: ModelRef | str | Path,
        config: BaseModel | dict[str, Any] | None,
        node: Node | NodeFacts,
        *,
        port: int | None = None,
        record: InstallRecord | None = None,
        extra_flags: Sequence[str] = (),
    ) -> PreparedEngine:
        """The llama.cpp server for ``model``: llama-cpp-python's server in package mode,
        ``llama-server`` in binary/source modes; see ``EngineProvider.prepare``."""
        cfg = self.typed_config(config)
        assert isinstance(cfg, LlamaCppConfig)
        n = as_node(node)
        ref = model if isinstance(model, ModelRef) else ModelRef.from_path(model)
        if ref.path is not None and not Path(ref.path).is_absolute():
            ref = ModelRef(id=ref.id, path=Path(ref.path).absolute())
        if ref.path is None or not Path(ref.path).is_file():
            raise ConfigError(
                f"model file {ref.path} does not exist; pass the path of a GGUF file"
            )
        if record is None:
            plan = self.plan_install(cfg, n)
            record = installed_record(plan)
            if record is None:
                raise NotInstalled(
                    f"llama.cpp ({plan.mode}) is not installed on node {n.facts.node_id} under "
                    f"{n.engine_root}; run: python -m engines install llamacpp --mode "
                    f"{plan.mode} --root {n.engine_root}"
                )
        layers, fallback = self.gpu_layers(cfg, n)
        threads = cfg.n_threads or default_threads(n.facts.cpu_count or os.cpu_count() or 1)
        flags = with_llamacpp_defaults(
            [*cfg.server_flags, *extra_flags],
            n_gpu_layers=layers,
            ctx_size=cfg.ctx_size,
            threads=threads,
            alias=ref.id,
        )
        notes: list[str] = []
        if fallback:
            flags = force_cpu(flags)
            notes.append(
                f"GPU requested on node {n.facts.node_id} which has none: running on CPU "
                "(allow_cpu_fallback)"
            )
        host = "127.0.0.1"
        chosen_port = port or free_port(host)
        uses_gpu = layers != 0 and not fallback
        gpu_ids = [g.index for g in n.facts.gpus] if uses_gpu else []
        extra_env: dict[str, str] = {}
        if gpu_ids:
            extra_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
        elif n.has_gpu:
            extra_env["CUDA_VISIBLE_DEVICES"] = ""
        workdir = n.runtime_dir
        workdir.mkdir(parents=True, exist_ok=True)
        common: dict[str, Any] = {
            "engine": self.id,
            "env": sanitized_env(extra_env),
            "port": chosen_port,
            "host": host,
            "workdir": str(workdir),
            "provisioning_mode": record.mode,
            "engine_version": record.engine_version,
            "model": ref,
            "user": resolve_run_as(n.settings.engine_user).user,
            "gpu_ids": gpu_ids,
            "cpu_fallback": fallback,
        }
        if record.mode == "package":
            py_args, dropped = llamacpp_python_args(flags)
            return PreparedEngine(
                bin=str(record.python),
                args=[
                    "-m", "llama_cpp.server",
                    "--model", str(ref.path),
                    "--host", host,
                    "--port", str(chosen_port),
                    *py_args,
                ],
                flags=py_args,
                health_path="/v1/models",
                metrics_path=None,
                version_path="/openapi.json",
                version_field="info.version",
                notes=notes + dropped,
                **common,
            )
        return PreparedEngine(
            bin=str(record.bin),
            args=["--model", str(ref.path), "--host", host, "--port", str(chosen_port), *flags],
            flags=flags,
            health_path="/health",
            metrics_path="/metrics" if has_flag(flags, "--metrics") else None,
            version_path="/props",
            version_field="build_info",
            notes=notes,
            **common,
        )
