"""llama.cpp through llama-cpp-python's OpenAI-compatible server."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.base import Dependency, EngineProvider, NodeFacts, Support

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
