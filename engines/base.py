"""The engine-provider interface and the facts every provider declares.

A provider is one engine kind (llama.cpp, vLLM, a remote OpenAI-compatible
endpoint). This module holds what the control plane needs to reason about a
provider without touching a node: its identity, manifest, dependencies, config
schema, config validation and whether a node can support it. The side-effecting
half (install, readiness on a node, launch) lives beside each provider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A provider config is malformed: the message names the field and the fix."""


class Dependency(BaseModel):
    """Something a provider needs on a node before it can run."""

    model_config = ConfigDict(frozen=True)

    dependency_key: str
    label: str
    scope: Literal["shared", "local"] = "local"

    def payload(self) -> dict[str, str]:
        return {"dependency_key": self.dependency_key, "label": self.label}


class GpuFact(BaseModel):
    index: int
    name: str = ""
    memory_bytes: int = 0
    free_memory_bytes: int | None = None


class NodeFacts(BaseModel):
    """What a node agent reports about its node; all fields optional but the id."""

    node_id: str
    hostname: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0
    free_memory_bytes: int | None = None
    disk_free_bytes: int = 0
    gpus: list[GpuFact] = Field(default_factory=list)
    cuda_toolkit: bool = False
    os: str = ""
    python: str = ""


class ValidationPayload(TypedDict):
    ready: bool
    message: str


class Support(BaseModel):
    supported: bool
    reason: str = ""


def format_validation_error(provider_id: str, error: ValidationError) -> str:
    """Turn a pydantic error into one sentence per bad field."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        parts.append(f"{where}: {item['msg']}")
    return f"invalid {provider_id} config: " + "; ".join(parts)


class EngineProvider(ABC):
    """One engine kind. Subclasses declare the class attributes and the schema."""

    id: ClassVar[str]
    label: ClassVar[str]
    manifest_version: ClassVar[int] = 1
    default_engine_version: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    #: True when activation needs user-supplied config (e.g. an API key).
    requires_config: ClassVar[bool] = False

    def manifest(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version,
            "engine_version": self.default_engine_version,
        }

    @abstractmethod
    def dependencies(self) -> list[Dependency]:
        """What must be installed on a node before the engine can run."""

    def parse_config(self, config: dict[str, Any] | None) -> BaseModel:
        """Return the typed config, or raise ConfigError naming the bad fields."""
        if config is not None and not isinstance(config, dict):
            raise ConfigError(
                f"{self.id} config must be a JSON object, got {type(config).__name__}"
            )
        try:
            return self.config_model.model_validate(config or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(self.id, exc)) from None

    def validate_config_local(self, config: dict[str, Any] | None) -> ValidationPayload:
        """Engine-defined readiness of a config: ``{ready, message}``; never raises."""
        try:
            parsed = self.parse_config(config)
        except ConfigError as exc:
            return {"ready": False, "message": str(exc)}
        problem = self.config_problem(parsed)
        return {"ready": problem is None, "message": problem or ""}

    def config_problem(self, config: BaseModel) -> str | None:
        """A reason this (well-formed) config cannot run yet, or None."""
        return None

    @abstractmethod
    def is_supported(self, facts: NodeFacts) -> Support:
        """Whether a node can run this engine, with the reason when not."""

    def describe(self) -> dict[str, Any]:
        """The provider's static facts as an API payload."""
        return {
            "id": self.id,
            "label": self.label,
            "manifest": self.manifest(),
            "requires_config": self.requires_config,
            "dependencies": [
                {**d.payload(), "scope": d.scope} for d in self.dependencies()
            ],
            "config_schema": self.config_model.model_json_schema(),
        }
