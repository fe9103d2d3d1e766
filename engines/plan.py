"""Install plans, install records and the policy gates that refuse a plan.

A plan is pure data: given a provider, its config and a node's facts it is
deterministic, names its mode and every input, and carries a cache key derived
from all inputs (a different version, build flag, URL, checksum, commit or
image is a different key and therefore a different install directory). The
plan is logged and stored inside the install record, so an install can be
audited and repeated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.errors import PolicyRefused
from events.settings import Settings

InstallMode = Literal["package", "binary", "source", "container", "remote"]
GpuBackend = Literal["cpu", "cuda", "none"]

#: Name of the record file inside an install directory; its presence means "installed".
RECORD_FILE = "install.json"


def cache_key(provider: str, mode: str, inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines what gets installed."""
    blob = json.dumps(
        {"provider": provider, "mode": mode, "inputs": inputs},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class InstallPlan(BaseModel):
    """What an install will do, decided before doing anything.

    ``inputs`` holds every input of the install (and nothing else) and
    ``cache_key`` is derived from them. ``engine_root`` and ``cache_dir`` are
    where it happens and are not part of the key.
    """

    model_config = ConfigDict(frozen=True)

    provider: str
    mode: InstallMode
    inputs: dict[str, Any]
    cache_key: str
    engine_root: str
    cache_dir: str
    gpu_backend: GpuBackend = "cpu"
    #: True when a GPU was asked for on a node without one and the config allowed CPU.
    cpu_fallback: bool = False
    notes: list[str] = Field(default_factory=list)

    @classmethod
    def build(
        cls,
        *,
        provider: str,
        mode: InstallMode,
        inputs: dict[str, Any],
        engine_root: Path,
        cache_dir: Path,
        gpu_backend: GpuBackend = "cpu",
        cpu_fallback: bool = False,
        notes: list[str] | None = None,
    ) -> InstallPlan:
        """Make a plan, deriving its cache key from provider, mode and inputs."""
        return cls(
            provider=provider,
            mode=mode,
            inputs=inputs,
            cache_key=cache_key(provider, mode, inputs),
            engine_root=str(engine_root),
            cache_dir=str(cache_dir),
            gpu_backend=gpu_backend,
            cpu_fallback=cpu_fallback,
            notes=list(notes or []),
        )

    @property
    def install_dir(self) -> Path:
        """``<engine_root>/<provider>/<mode>-<key prefix>``: one directory per cache key."""
        return Path(self.engine_root) / self.provider / f"{self.mode}-{self.cache_key[:16]}"

    @property
    def lock_path(self) -> Path:
        """Lock file beside the install directory (survives deleting the directory)."""
        return self.install_dir.with_name(self.install_dir.name + ".lock")

    @property
    def record_path(self) -> Path:
        return self.install_dir / RECORD_FILE

    def summary(self) -> str:
        """One log line naming the plan's mode, key and inputs."""
        return (
            f"{self.provider} {self.mode} install key={self.cache_key[:16]} "
            f"backend={self.gpu_backend} inputs={json.dumps(self.inputs, sort_keys=True)}"
        )


class InstallRecord(BaseModel):
    """What an install left on the node; written as ``install.json`` in its directory.

    ``engine_version`` is the version stamp: for package mode the installed
    package version, GPU backend and build flags; binary mode the archive's
    sha256; source mode the commit SHA and flags; container mode the image
    digest. ``python`` is the engine environment's interpreter (package mode)
    and ``bin`` the server executable (binary and source modes).
    """

    provider: str
    mode: InstallMode
    engine_version: str
    cache_key: str
    install_dir: str
    plan: InstallPlan
    python: str | None = None
    bin: str | None = None
    image: str | None = None
    gpu_backend: GpuBackend = "cpu"
    build_flags: str = ""
    #: package mode: True when the compiled wheel came from the wheel cache.
    wheel_from_cache: bool = False
    installed_at: float = Field(default_factory=time.time)
    duration_s: float = 0.0
    #: True when this call found the same install already present and did nothing.
    reused: bool = False

    def save(self) -> None:
        """Write the record (atomically) into its install directory."""
        path = Path(self.install_dir) / RECORD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, install_dir: Path) -> InstallRecord | None:
        """The record in ``install_dir``, or None when absent or unreadable."""
        path = install_dir / RECORD_FILE
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class InstallProgress:
    """One progress report: a stage name, a human message, and a fraction when known."""

    stage: str
    message: str
    fraction: float | None = None


ProgressCallback = Callable[[InstallProgress], None]


def no_progress(_: InstallProgress) -> None:
    """A progress callback that ignores reports."""


# --- policy --------------------------------------------------------------------------


def check_policy(plan: InstallPlan, settings: Settings) -> None:
    """Raise PolicyRefused when ``settings`` do not allow the plan's sources; else return.

    The message names the ``ROUNDHOUSE_*`` variable to change.
    """
    mode = plan.mode
    if mode == "package":
        if not settings.allow_package_installs:
            raise PolicyRefused(
                f"package installs are disabled on this node, so {plan.provider} cannot be "
                "installed in package mode; set ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS=true "
                "or choose another install_mode",
                "ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS",
            )
        index = plan.inputs.get("index_url")
        if index and index not in settings.package_indexes:
            allowed = ", ".join(settings.package_indexes) or "only the default index"
            raise PolicyRefused(
                f"package index {index!r} is not allowed (allowed: {allowed}); add it to "
                "ROUNDHOUSE_PACKAGE_INDEXES or remove index_url from the config",
                "ROUNDHOUSE_PACKAGE_INDEXES",
            )
    elif mode == "binary":
        url = str(plan.inputs.get("url", ""))
        prefixes = settings.allowed_url_prefixes
        ok = any(url.startswith(p) for p in prefixes) if prefixes else url.startswith("https://")
        if not ok:
            allowed = ", ".join(prefixes) if prefixes else "any https:// URL"
            raise PolicyRefused(
                f"binary download URL {url!r} is not allowed (allowed: {allowed}); add its "
                "prefix to ROUNDHOUSE_ALLOWED_URL_PREFIXES or use another binary_url",
                "ROUNDHOUSE_ALLOWED_URL_PREFIXES",
            )
    elif mode == "source":
        if not settings.allow_source_builds:
            raise PolicyRefused(
                f"source builds are disabled on this node, so {plan.provider} cannot be "
                "built from source; set ROUNDHOUSE_ALLOW_SOURCE_BUILDS=true or choose "
                "another install_mode",
                "ROUNDHOUSE_ALLOW_SOURCE_BUILDS",
            )
        repo = str(plan.inputs.get("repo", ""))
        prefixes = settings.allowed_url_prefixes
        if "://" in repo and prefixes and not any(repo.startswith(p) for p in prefixes):
            raise PolicyRefused(
                f"source repository {repo!r} is not under an allowed URL prefix "
                f"({', '.join(prefixes)}); add its prefix to ROUNDHOUSE_ALLOWED_URL_PREFIXES",
                "ROUNDHOUSE_ALLOWED_URL_PREFIXES",
            )
    elif mode == "container" and not settings.allow_container_pulls:
        raise PolicyRefused(
            f"container pulls are disabled on this node, so {plan.provider} cannot be "
            "installed in container mode; set ROUNDHOUSE_ALLOW_CONTAINER_PULLS=true or "
            "choose another install_mode",
            "ROUNDHOUSE_ALLOW_CONTAINER_PULLS",
        )
