"""Names of the Roundhouse actors and how to reach them.

The naming contract: every Roundhouse actor lives in the Ray namespace
``roundhouse``; the control-plane actor is named ``roundhouse-control`` and the
agent of Ray node ``<id>`` is ``roundhouse-agent-<id>``.

Calls through these helpers raise the control plane's own errors
(``actors.errors.RoundhouseError`` subclasses) with their messages intact; Ray's
wrapper and its remote stack trace are dropped. A call that finds the actor
restarting (``RayActorError``) is retried until ``RESTART_WAIT_S`` has passed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from actors.errors import RoundhouseError

NAMESPACE = "roundhouse"
CONTROL_NAME = "roundhouse-control"
AGENT_PREFIX = "roundhouse-agent-"
#: How long a caller waits for a restarting actor before giving up.
RESTART_WAIT_S = 60.0


class ControlPlaneUnavailable(RoundhouseError):
    """The control-plane actor is not running (or did not come back in time)."""

    code = "unavailable"


def agent_name(node_id: str) -> str:
    """The actor name of the agent on Ray node ``node_id``."""
    return AGENT_PREFIX + node_id


def control_plane_handle() -> ActorHandle:
    """The control-plane actor of the connected Ray cluster.

    Raises ControlPlaneUnavailable (saying how to start it) when it does not exist.
    """
    try:
        return ray.get_actor(CONTROL_NAME, namespace=NAMESPACE)
    except ValueError:
        raise ControlPlaneUnavailable(
            f"no Roundhouse control plane ({CONTROL_NAME!r} in namespace {NAMESPACE!r}) runs "
            "in this Ray cluster; start it with `roundhouse up --address auto` or "
            "cluster.connect(address='auto')"
        ) from None


def agent_handle(node_id: str) -> ActorHandle | None:
    """The agent of ``node_id``, or None when it does not exist."""
    try:
        return ray.get_actor(agent_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None


def unwrap(exc: RayTaskError) -> BaseException:
    """The user-facing error inside a Ray task error: a RoundhouseError as it was raised
    (same type, same message), anything else unchanged."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RoundhouseError):
        return cause
    return exc


def call_control(handle: ActorHandle, method: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``ControlPlane.<method>(*args, **kwargs)`` in the control-plane actor (blocking)."""
    return get(handle.call, method, args, kwargs)


def get(method: Any, *args: Any, wait_s: float = RESTART_WAIT_S) -> Any:
    """``ray.get(method.remote(*args))`` with errors unwrapped and restarts waited out."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return ray.get(method.remote(*args))
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except RayActorError as exc:
            if time.monotonic() > deadline:
                raise ControlPlaneUnavailable(
                    f"the actor did not answer within {wait_s:.0f}s ({exc.__class__.__name__}); "
                    "check `ray status` and the actor's log"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


async def aget(method: Any, *args: Any, wait_s: float = RESTART_WAIT_S) -> Any:
    """Async ``get``: awaits the reference instead of blocking the event loop."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return await method.remote(*args)
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except RayActorError as exc:
            if time.monotonic() > deadline:
                raise ControlPlaneUnavailable(
                    f"the actor did not answer within {wait_s:.0f}s ({exc.__class__.__name__}); "
                    "check `ray status` and the actor's log"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
