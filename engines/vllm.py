"""vLLM's OpenAI-compatible server (CUDA GPUs only), from a package or a container.

Package mode runs ``vllm serve MODEL`` from the engine environment; container
mode runs the vllm-openai image (its entrypoint is the OpenAI API server,
listening on 8000) with the model directory mounted read-only. The server has
``/health``, ``/metrics`` and ``/version``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.base import ConfigError, Dependency, EngineProvider, NodeFacts, Support, as_node
from engines.errors import GpuUnavailable, NotInstalled
from engines.installers import installed_record
from engines.installers.container import find_runtime, image_digest, run_argv
from engines.installers.package import engine_python, python_tag
from engines.launch import ModelRef, PreparedEngine, free_port, parse_flags
from engines.node import Node
from engines.plan import InstallPlan, InstallRecord, check_policy
from engines.sandbox import resolve_run_as, sanitized_env

#: Port the vllm-openai image listens on inside the container.
CONTAINER_PORT = 8000
_RESERVED = {"--port", "--host", "--model"}

VLLM_VERSION = "0.33.0"


class VllmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = VLLM_VERSION
    install_mode: Literal["package", "container"] = "package"
    #: container mode: image reference, pinned by digest (image@sha256:...).
    image: str | None = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_model_len: int | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    extra_flags: list[str] = Field(default_factory=list)
    #: package mode: a package index to install from (must be in ROUNDHOUSE_PACKAGE_INDEXES).
    index_url: str | None = None
    #: container mode: force "podman" or "docker" (default: podman, then docker).
    container_runtime: Literal["podman", "docker"] | None = None


class VllmProvider(EngineProvider):
    id: ClassVar[str] = "vllm"
    label: ClassVar[str] = "vLLM"
    default_engine_version: ClassVar[str] = VLLM_VERSION
    config_model: ClassVar[type[BaseModel]] = VllmConfig

    def dependencies(self) -> list[Dependency]:
        return [Dependency(dependency_key="vllm", label="vllm", scope="local")]

    def config_problem(self, config: BaseModel) -> str | None:
        assert isinstance(config, VllmConfig)
        if config.install_mode == "container" and not config.image:
            return "container mode needs image (e.g. vllm/vllm-openai@sha256:...); set it"
        if config.install_mode == "container" and config.image and not image_digest(config.image):
            return (
                f"image {config.image!r} is not pinned by digest; write it as "
                "name@sha256:<digest> so every node runs the same image"
            )
        return None

    def is_supported(self, facts: NodeFacts) -> Support:
        if not facts.gpus:
            return Support(
                supported=False,
                reason=f"vLLM needs a CUDA GPU and node {facts.node_id} reports none",
            )
        return Support(supported=True)

    def _require_gpu(self, node: Node) -> None:
        support = self.is_supported(node.facts)
        if not support.supported:
            raise GpuUnavailable(support.reason + "; run vLLM on a GPU node or use llama.cpp")

    def plan_install(
        self,
        config: BaseModel | dict[str, Any] | None,
        node: Node | NodeFacts,
        *,
        mode: str | None = None,
        enforce_policy: bool = True,
    ) -> InstallPlan:
        """Plan a package or container install; refuses (GpuUnavailable) on a node without
        a GPU. See ``EngineProvider.plan_install``."""
        cfg = self.typed_config(config)
        assert isinstance(cfg, VllmConfig)
        n = as_node(node)
        chosen = mode or cfg.install_mode
        if chosen not in ("package", "container"):
            raise ConfigError(f"vLLM has no {chosen!r} install mode; use package or container")
        cfg = cfg.model_copy(update={"install_mode": chosen})
        problem = self.config_problem(cfg)
        if problem:
            raise ConfigError(problem)
        self._require_gpu(n)
        inputs: dict[str, Any]
        if chosen == "package":
            inputs = {
                "requirement": "vllm",
                "extras": [],
                "version": cfg.version,
                "build_env": {},
                "python": python_tag(engine_python(n.settings)),
                "indexes": [cfg.index_url] if cfg.index_url else list(n.settings.package_indexes),
                "index_url": cfg.index_url,
                "import_check": "vllm",
            }
        else:
            inputs = {"image": cfg.image, "runtime": cfg.container_runtime}
        plan = InstallPlan.build(
            provider=self.id,
            mode=chosen,  # type: ignore[arg-type]
            inputs=inputs,
            engine_root=n.engine_root,
            cache_dir=n.cache_dir,
            gpu_backend="cuda",
        )
        if enforce_policy:
            check_policy(plan, n.settings)
        return plan

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
        """``vllm serve`` (package) or the vllm-openai container for ``model`` (a model
        directory or file); see ``EngineProvider.prepare``."""
        cfg = self.typed_config(config)
        assert isinstance(cfg, VllmConfig)
        n = as_node(node)
        self._require_gpu(n)
        ref = model if isinstance(model, ModelRef) else ModelRef.from_path(model)
        if ref.path is not None and not Path(ref.path).is_absolute():
            ref = ModelRef(id=ref.id, path=Path(ref.path).absolute())
        if ref.path is None or not Path(ref.path).exists():
            raise ConfigError(f"model path {ref.path} does not exist; pass a model directory")
        if record is None:
            plan = self.plan_install(cfg, n)
            record = installed_record(plan)
            if record is None:
                raise NotInstalled(
                    f"vLLM ({plan.mode}) is not installed on node {n.facts.node_id} under "
                    f"{n.engine_root}; run: python -m engines install vllm --mode {plan.mode} "
                    f"--root {n.engine_root}"
                )
        user_flags = [*cfg.extra_flags, *extra_flags]
        for name, _ in parse_flags(user_flags):
            if name.split("=")[0] in _RESERVED:
                raise ConfigError(f"vLLM flag {name} is set by Roundhouse; remove it")
        flags = [
            "--served-model-name", ref.id,
            "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
            "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        ]
        if cfg.max_model_len:
            flags += ["--max-model-len", str(cfg.max_model_len)]
        flags += user_flags
        host = "127.0.0.1"
        chosen_port = port or free_port(host)
        gpu_ids = [g.index for g in n.facts.gpus][: cfg.tensor_parallel_size]
        workdir = n.runtime_dir
        workdir.mkdir(parents=True, exist_ok=True)
        common: dict[str, Any] = {
            "engine": self.id,
            "port": chosen_port,
            "host": host,
            "workdir": str(workdir),
            "provisioning_mode": record.mode,
            "engine_version": record.engine_version,
            "model": ref,
            "flags": flags,
            "health_path": "/health",
            "metrics_path": "/metrics",
            "version_path": "/version",
            "version_field": "version",
            "gpu_ids": gpu_ids,
        }
        if record.mode == "container":
            rt_name, runtime = find_runtime(cfg.container_runtime)
            path = Path(ref.path)
            mount = path.parent if path.is_file() else path
            inside = f"/models/{path.name}" if path.is_file() else "/models"
            name = "roundhouse-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", f"{ref.id}-{chosen_port}")
            return PreparedEngine(
                bin=runtime,
                args=run_argv(
                    runtime, rt_name,
                    image=str(record.image), name=name, host_port=chosen_port,
                    container_port=CONTAINER_PORT, model_dir=mount, gpu_ids=gpu_ids,
                    engine_args=["--model", inside, *flags], host=host,
                )[1:],
                env=sanitized_env(),
                stop_argv=[runtime, "stop", "-t", "5", name],
                **common,
            )
        assert record.python
        vllm_bin = Path(record.python).parent / "vllm"
        return PreparedEngine(
            bin=str(vllm_bin),
            args=["serve", str(ref.path), "--host", host, "--port", str(chosen_port), *flags],
            env=sanitized_env({"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids)}),
            user=resolve_run_as(n.settings.engine_user).user,
            **common,
        )
