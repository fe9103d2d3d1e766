"""The engine-provider interface and the facts every provider declares.

A provider is one engine kind (llama.cpp, vLLM, a remote OpenAI-compatible
endpoint). This module holds what the control plane needs to reason about a
provider without touching a node: its identity, manifest, dependencies, config
schema, config validation and whether a node can support it. The side-effecting
half (install, readiness on a node, launch) lives beside each provider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from engines.launch import ModelRef, PreparedEngine
    from engines.node import Node
    from engines.plan import InstallPlan, InstallRecord, ProgressCallback
    from engines.readiness import ReadinessReport
    from events.settings import Settings


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

    # --- the side-effecting half (install, readiness, launch) -----------------------

    def typed_config(self, config: BaseModel | dict[str, Any] | None) -> BaseModel:
        """``config`` as this provider's config model (raises ConfigError when malformed)."""
        if isinstance(config, self.config_model):
            return config
        if isinstance(config, BaseModel):
            config = config.model_dump()
        return self.parse_config(config)

    @abstractmethod
    def plan_install(
        self,
        config: BaseModel | dict[str, Any] | None,
        node: Node | NodeFacts,
        *,
        mode: str | None = None,
        enforce_policy: bool = True,
    ) -> InstallPlan:
        """The deterministic install plan for ``config`` on ``node`` (no side effects but
        resolving a source ref). Raises ConfigError, GpuUnavailable, or PolicyRefused
        unless ``enforce_policy`` is false (readiness of what is already installed)."""

    def install(
        self,
        plan: InstallPlan,
        progress: ProgressCallback | None = None,
        *,
        force: bool = False,
        settings: Settings | None = None,
    ) -> InstallRecord:
        """Carry out ``plan`` (idempotent, single-flight); see ``engines.installers.install``."""
        from engines.installers import install

        return install(plan, progress, force=force, settings=settings)

    def check_ready(
        self, node: Node | NodeFacts, config: BaseModel | dict[str, Any] | None = None
    ) -> ReadinessReport:
        """``{ready, missing_shared, missing_local}`` for ``config`` on ``node``, found by
        looking at the installed engine (it imports / runs), never by a stored flag."""
        from engines.errors import ProvisionError
        from engines.installers import installed_record
        from engines.readiness import not_ready, probe_record, ready

        deps = self.dependencies()
        dep = deps[0] if deps else Dependency(dependency_key=self.id, label=self.label)
        try:
            plan = self.plan_install(config, node, enforce_policy=False)
        except (ConfigError, ProvisionError) as exc:
            return not_ready(dep, str(exc))
        record = installed_record(plan)
        if record is None:
            return not_ready(
                dep,
                f"{self.label} ({plan.mode}) is not installed under {plan.install_dir}; "
                f"install it (python -m engines install {self.id} --mode {plan.mode})",
            )
        problem = probe_record(record)
        if problem:
            return not_ready(dep, problem)
        return ready(record.engine_version)

    @abstractmethod
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
        """The process to start for ``model``: ``PreparedEngine {bin, args, env, port, workdir}``.

        Raises NotInstalled (saying how to install), GpuUnavailable, ConfigError
        for bad flags, or NotLaunchable for providers that run no process.
        """


def as_node(node: Node | NodeFacts) -> Node:
    """A ``Node``; bare facts get settings from the environment."""
    from engines.node import Node

    return node if isinstance(node, Node) else Node(facts=node)
