"""The SDK backend that talks to the control-plane actor (``roundhouse-control``).

Every SDK call becomes ``call(method, args, kwargs)`` on the actor. Errors come
back as the same ``RoundhouseError`` subclasses with the same messages as
in-process (Ray's wrapper and remote trace are dropped); a call that finds the
actor restarting waits for it (``actors.handles.RESTART_WAIT_S``).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.actor import ActorHandle

from actors.handles import aget


class RayBackend:
    """``Backend`` over the control-plane actor. ``owns_ray``: ``close`` shuts Ray down
    (true for the embedded cluster that ``cluster.connect()`` started)."""

    def __init__(self, handle: ActorHandle, owns_ray: bool = False) -> None:
        self.handle = handle
        self.owns_ray = owns_ray

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await aget(self.handle.call, method, args, kwargs)

    async def close(self) -> None:
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
