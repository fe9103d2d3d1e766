"""Readiness by looking: does the engine environment import, does the binary run,
does the remote endpoint answer ``GET /models``? Never by trusting a stored flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from engines.base import Dependency
from engines.errors import InstallError
from engines.installers.binary import binary_version
from engines.installers.container import find_runtime, inspect_argv
from engines.installers.package import probe_package
from engines.plan import InstallRecord
from engines.sandbox import run_step, sanitized_env


class ReadinessReport(BaseModel):
    """``ready`` is true only when nothing is missing. Each missing item is a dependency
    payload (``dependency_key``, ``label``) plus the ``reason`` found by looking."""

    ready: bool
    missing_shared: list[dict[str, str]] = Field(default_factory=list)
    missing_local: list[dict[str, str]] = Field(default_factory=list)
    engine_version: str | None = None

    def payload(self) -> dict[str, Any]:
        return self.model_dump()


def missing(dependency: Dependency, reason: str) -> dict[str, str]:
    return {**dependency.payload(), "reason": reason}


def ready(engine_version: str | None = None) -> ReadinessReport:
    return ReadinessReport(ready=True, engine_version=engine_version)


def not_ready(dependency: Dependency, reason: str) -> ReadinessReport:
    item = missing(dependency, reason)
    if dependency.scope == "shared":
        return ReadinessReport(ready=False, missing_shared=[item])
    return ReadinessReport(ready=False, missing_local=[item])


def probe_record(record: InstallRecord) -> str | None:
    """Why the installed engine is not usable, or None when it is (looks on disk and runs it)."""
    try:
        if record.mode == "package":
            if not record.python or not Path(record.python).exists():
                return f"engine environment {record.install_dir} is missing its python"
            inputs = record.plan.inputs
            probe_package(record.python, inputs["requirement"], inputs.get("import_check"))
        elif record.mode in ("binary", "source"):
            if not record.bin or not Path(record.bin).exists():
                return f"engine binary {record.bin} is missing"
            binary_version(Path(record.bin))
        elif record.mode == "container":
            _, runtime = find_runtime(record.plan.inputs.get("runtime"))
            run_step("image inspect", inspect_argv(runtime, str(record.image)), env=sanitized_env())
    except InstallError as exc:
        return str(exc)
    return None


def probe_openai_endpoint(
    base_url: str, api_key: str | None, timeout_s: float = 10.0
) -> str | None:
    """Why ``GET {base_url}/models`` does not answer 200, or None when it does.

    The key is sent as a bearer token and never appears in the returned text.
    """
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"GET {url} failed: {type(exc).__name__}; check base_url and that the endpoint is up"
    if resp.status_code == 200:
        return None
    if resp.status_code in (401, 403):
        return f"GET {url} answered {resp.status_code}: the api_key was refused; update it"
    return f"GET {url} answered HTTP {resp.status_code}; check base_url"
