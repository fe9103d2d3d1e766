"""Helpers for the Ray-layer tests: environment for simulated nodes, polling."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from events.settings import Settings

T = TypeVar("T")


def ray_test_env(home: Path) -> dict[str, str]:
    """Environment for a Roundhouse on simulated Ray nodes: a private home, one engine root
    per node, the project's wheel cache (no compiling), a fast node watch, no Ray auth."""
    return {
        "ROUNDHOUSE_HOME": str(home),
        "ROUNDHOUSE_ENGINE_ROOT_PER_NODE": "true",
        "ROUNDHOUSE_CACHE_DIR": str(Settings.from_env().cache_path),
        "ROUNDHOUSE_NODE_WATCH_INTERVAL_S": "0.5",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


async def wait_for(probe: Callable[[], Awaitable[T | None]], what: str,
                   timeout_s: float = 120.0, interval_s: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")
