"""cluster: how Roundhouse is run and reached (Ray bootstrap, the SDK, the CLI, Serve apps).

``cluster.connect(address=None)`` returns the SDK backed by the Ray actors (see
``cluster.bootstrap``); ``cluster.client.open_local`` is the same SDK in-process.
"""

from __future__ import annotations

from typing import Any

__all__ = ["connect", "start", "stop"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing cluster.client (in-process SDK) does not import Ray.
    if name in __all__:
        from cluster import bootstrap

        return getattr(bootstrap, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
