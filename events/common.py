"""What every event carries, the domain errors, and aggregate ids."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

#: Namespace for deterministic aggregate ids (integer rows, names, pairs).
NAMESPACE = uuid.UUID("6f0c3a52-7d1e-4d0e-9c1a-52a0f3c1e7b4")

#: ``requested_by`` for changes the system makes on its own (node agents, idle unload).
SYSTEM_ACTOR: dict[str, Any] = {"user_id": None, "organization_id": None, "actor": "system"}


class DomainError(Exception):
    """A command was refused by an aggregate. The message says what to do instead."""


class InvalidTransition(DomainError):
    """A command is not allowed in the aggregate's current state."""

    def __init__(self, kind: str, key: object, state: str, command: str,
                 allowed: Iterable[str]) -> None:
        allowed_list = sorted(allowed)
        allowed_text = ", ".join(allowed_list) if allowed_list else "none"
        super().__init__(
            f"cannot {command} {kind} {key}: it is {state}; "
            f"commands allowed while {state}: {allowed_text}"
        )
        self.state = state
        self.command = command
        self.allowed = allowed_list


class BadRequester(DomainError):
    """``requested_by`` is not ``{user_id, organization_id[, actor]}``."""


def requested_by_payload(requested_by: Mapping[str, Any] | None) -> dict[str, Any]:
    """Normalize who asked: ``{user_id, organization_id, actor}``; None means the system."""
    if requested_by is None:
        return dict(SYSTEM_ACTOR)
    if not isinstance(requested_by, Mapping):
        raise BadRequester(
            "requested_by must be a dict like {'user_id': 42, 'organization_id': 7}, "
            f"got {type(requested_by).__name__}"
        )
    unknown = set(requested_by) - {"user_id", "organization_id", "actor"}
    if unknown:
        raise BadRequester(
            f"requested_by has unknown keys {sorted(unknown)}; "
            "use user_id, organization_id and optionally actor"
        )
    payload = {
        "user_id": requested_by.get("user_id"),
        "organization_id": requested_by.get("organization_id"),
        "actor": requested_by.get("actor") or "user",
    }
    for key in ("user_id", "organization_id"):
        value = payload[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise BadRequester(f"requested_by.{key} must be an int or a string, got {value!r}")
    return payload


def uid(*parts: object) -> uuid.UUID:
    """Deterministic aggregate id for a tuple of parts."""
    return uuid.uuid5(NAMESPACE, "/".join(str(p) for p in parts))


def engine_id(row_id: int) -> uuid.UUID:
    return uid("engine", row_id)


def model_id(row_id: int) -> uuid.UUID:
    return uid("model", row_id)


def node_id_of(node: str) -> uuid.UUID:
    return uid("node", node)


def node_install_id(engine_row_id: int, node: str) -> uuid.UUID:
    return uid("node-install", engine_row_id, node)


def runtime_id(engine_row_id: int, model_row_id: int, node: str) -> uuid.UUID:
    return uid("runtime", engine_row_id, model_row_id, node)


def name_claim_id(kind: str, name: str) -> uuid.UUID:
    return uid("name", kind, name)
