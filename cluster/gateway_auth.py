"""Who may call the gateway: the admin bearer token for ``/api`` and API keys for ``/v1``.

The admin token is ``ROUNDHOUSE_API_TOKEN``, else the one ``roundhouse up`` generated
and stored as ``<home>/api_token`` (mode 0600). More admin tokens, each acting for
an organization, may be listed in ``<home>/api_tokens.json``
(``{"<token>": {"user_id": 1, "organization_id": "acme"}}``). A token of an
organization other than ``ROUNDHOUSE_ORGANIZATION_ID`` is refused with 403.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events.settings import Settings

TOKEN_FILE = "api_token"
TOKENS_FILE = "api_tokens.json"


@dataclass(frozen=True)
class Principal:
    """The caller a token stands for; ``requested_by`` of the events it causes."""

    user_id: int | str | None = None
    organization_id: int | str | None = None

    def requested_by(self) -> dict[str, Any]:
        return {k: v for k, v in (("user_id", self.user_id),
                                  ("organization_id", self.organization_id)) if v is not None}


@dataclass
class GatewayAuth:
    """Admin tokens (token → principal), the gateway's organization, and /v1 API keys."""

    admin_tokens: dict[str, Principal] = field(default_factory=dict)
    organization_id: str | None = None
    api_keys: frozenset[str] = frozenset()

    def admin(self, token: str | None) -> Principal | None:
        """The principal of ``token``, or None when it is unknown."""
        if not token:
            return None
        for known, principal in self.admin_tokens.items():
            if hmac.compare_digest(known, token):
                return principal
        return None

    def same_organization(self, principal: Principal) -> bool:
        return (self.organization_id is None or principal.organization_id is None
                or str(principal.organization_id) == self.organization_id)

    def api_key_ok(self, key: str | None) -> bool:
        if not self.api_keys:
            return True
        return bool(key) and any(hmac.compare_digest(k, key or "") for k in self.api_keys)

    @classmethod
    def from_settings(cls, settings: Settings, create: bool = False) -> GatewayAuth:
        """Tokens from the settings and the home directory; ``create`` makes the stored token
        when none exists (what ``roundhouse up`` does)."""
        org = settings.organization_id or None
        tokens: dict[str, Principal] = {}
        main = admin_token(settings, create=create)
        if main:
            tokens[main] = Principal(user_id="admin", organization_id=org)
        extra = settings.home / TOKENS_FILE
        if extra.is_file():
            for token, who in json.loads(extra.read_text()).items():
                tokens[token] = Principal(user_id=who.get("user_id"),
                                          organization_id=who.get("organization_id"))
        return cls(admin_tokens=tokens, organization_id=org,
                   api_keys=frozenset(settings.api_keys))


def admin_token(settings: Settings, create: bool = False) -> str | None:
    """``ROUNDHOUSE_API_TOKEN``, else the stored token; with ``create`` store a new one."""
    if settings.api_token:
        return settings.api_token
    path = settings.home / TOKEN_FILE
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    return _store_token(path)


def _store_token(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "rh-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token
