"""A remote OpenAI-compatible endpoint: nothing to install, ready when it answers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SecretStr

from engines.base import ConfigError, Dependency, EngineProvider, NodeFacts, Support, as_node
from engines.errors import NotLaunchable
from engines.launch import ModelRef, PreparedEngine
from engines.node import Node
from engines.plan import InstallPlan, InstallRecord
from engines.readiness import ReadinessReport, not_ready, probe_openai_endpoint, ready

ENDPOINT = Dependency(dependency_key="endpoint", label="OpenAI-compatible endpoint", scope="shared")


class OpenAIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None
    api_key: SecretStr | None = None
    #: Model names served by the endpoint; empty means ask it (GET /models).
    models: list[str] = []
    timeout_s: float = 60.0


class OpenAIProvider(EngineProvider):
    id: ClassVar[str] = "openai"
    label: ClassVar[str] = "OpenAI-compatible"
    default_engine_version: ClassVar[str] = "v1"
    config_model: ClassVar[type[BaseModel]] = OpenAIConfig
    requires_config: ClassVar[bool] = True

    def dependencies(self) -> list[Dependency]:
        return []

    def config_problem(self, config: BaseModel) -> str | None:
        assert isinstance(config, OpenAIConfig)
        missing = [
            name
            for name, value in (("base_url", config.base_url), ("api_key", config.api_key))
            if not value
        ]
        if missing:
            pronoun = "it" if len(missing) == 1 else "them"
            return f"the OpenAI-compatible provider needs {' and '.join(missing)}; set {pronoun}"
        assert config.base_url is not None
        if not config.base_url.startswith(("http://", "https://")):
            return f"base_url must start with http:// or https://, got {config.base_url!r}"
        return None

    def is_supported(self, facts: NodeFacts) -> Support:
        return Support(supported=True)

    def plan_install(
        self,
        config: BaseModel | dict[str, Any] | None,
        node: Node | NodeFacts,
        *,
        mode: str | None = None,
        enforce_policy: bool = True,
    ) -> InstallPlan:
        """A ``remote`` plan: nothing to install. The API key is not part of the plan."""
        cfg = self.typed_config(config)
        assert isinstance(cfg, OpenAIConfig)
        if mode not in (None, "remote"):
            raise ConfigError(f"the OpenAI-compatible provider has no {mode!r} mode; it is remote")
        n = as_node(node)
        return InstallPlan.build(
            provider=self.id,
            mode="remote",
            inputs={"base_url": cfg.base_url, "api": self.default_engine_version},
            engine_root=n.engine_root,
            cache_dir=n.cache_dir,
            gpu_backend="none",
        )

    def check_ready(
        self, node: Node | NodeFacts, config: BaseModel | dict[str, Any] | None = None
    ) -> ReadinessReport:
        """Ready when ``GET {base_url}/models`` answers 200 with the configured key."""
        try:
            cfg = self.typed_config(config)
        except ConfigError as exc:
            return not_ready(ENDPOINT, str(exc))
        assert isinstance(cfg, OpenAIConfig)
        problem = self.config_problem(cfg)
        if problem:
            return not_ready(ENDPOINT, problem)
        assert cfg.base_url is not None
        key = cfg.api_key.get_secret_value() if cfg.api_key else None
        reason = probe_openai_endpoint(cfg.base_url, key, timeout_s=min(cfg.timeout_s, 10.0))
        return not_ready(ENDPOINT, reason) if reason else ready(self.default_engine_version)

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
        """Always raises NotLaunchable: a remote endpoint has no local process."""
        raise NotLaunchable(
            "the OpenAI-compatible provider runs no local engine process; send requests to "
            "its base_url (see remote_handoff for the handoff payload)"
        )

    def remote_handoff(self, config: BaseModel | dict[str, Any] | None, model_id: str) -> dict:
        """The handoff payload for a remote model; it never contains the API key."""
        cfg = self.typed_config(config)
        assert isinstance(cfg, OpenAIConfig)
        return {
            "engine": self.id,
            "engine_version": self.default_engine_version,
            "provisioning_mode": "remote",
            "url": cfg.base_url,
            "model": {"id": model_id, "path": None},
            "flags": [],
            "pid": None,
        }
