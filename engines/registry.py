"""Which engine kinds exist."""

from __future__ import annotations

from engines.base import EngineProvider
from engines.llamacpp import LlamaCppProvider
from engines.openai import OpenAIProvider
from engines.vllm import VllmProvider


class UnknownProvider(LookupError):
    def __init__(self, provider_id: object) -> None:
        known = ", ".join(sorted(PROVIDERS))
        super().__init__(f"unknown provider {provider_id!r}; known providers: {known}")
        self.provider_id = provider_id


PROVIDERS: dict[str, EngineProvider] = {
    p.id: p for p in (LlamaCppProvider(), VllmProvider(), OpenAIProvider())
}


def get_provider(provider_id: str) -> EngineProvider:
    """Return the provider for an engine kind id, or raise UnknownProvider listing the known."""
    try:
        return PROVIDERS[provider_id]
    except (KeyError, TypeError):
        raise UnknownProvider(provider_id) from None


def list_providers() -> list[EngineProvider]:
    return [PROVIDERS[k] for k in sorted(PROVIDERS)]
