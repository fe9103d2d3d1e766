"""A remote OpenAI-compatible endpoint: nothing to install, ready when it answers."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, SecretStr

from engines.base import Dependency, EngineProvider, NodeFacts, Support


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
            return f"the OpenAI-compatible provider needs {' and '.join(missing)}; set them"
        assert config.base_url is not None
        if not config.base_url.startswith(("http://", "https://")):
            return f"base_url must start with http:// or https://, got {config.base_url!r}"
        return None

    def is_supported(self, facts: NodeFacts) -> Support:
        return Support(supported=True)
