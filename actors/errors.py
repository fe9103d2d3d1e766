"""Errors a user of the SDK can get. Each message says what was wrong and what to do.

Every error has a ``code`` (``bad_request``, ``not_found``, ``conflict``) so the
HTTP layer and the Ray client can map them without parsing messages.
"""

from __future__ import annotations


class RoundhouseError(Exception):
    code = "error"

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Errors cross process boundaries (Ray) with their message intact.
        return (type(self), (str(self),))


class BadInput(RoundhouseError, ValueError):
    code = "bad_request"


class LifecycleFieldRefused(BadInput):
    """``engine_registry.update`` was asked to set a lifecycle field; the message names the
    method that owns it."""


class NotFound(RoundhouseError, LookupError):
    code = "not_found"


class Conflict(RoundhouseError):
    code = "conflict"


class DuplicateName(Conflict):
    """The name is held by another row of the same kind."""
