"""vLLM's OpenAI-compatible server (CUDA GPUs only)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.base import Dependency, EngineProvider, NodeFacts, Support

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
        return None

    def is_supported(self, facts: NodeFacts) -> Support:
        if not facts.gpus:
            return Support(
                supported=False,
                reason=f"vLLM needs a CUDA GPU and node {facts.node_id} reports none",
            )
        return Support(supported=True)
