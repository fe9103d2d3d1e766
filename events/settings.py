"""Every Roundhouse setting in one typed registry.

Each setting is read from the environment variable ``ROUNDHOUSE_<NAME>`` (upper
case). ``Settings.from_env()`` reads them once; nothing else in the code base
reads ``ROUNDHOUSE_*`` variables directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "ROUNDHOUSE_"


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("roundhouse", appauthor=False))


class SettingsError(ValueError):
    """A ROUNDHOUSE_* variable holds a value of the wrong type."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- store -----------------------------------------------------------------
    # Directory holding the embedded store, views, artifacts and engines.
    home: Path = Field(default_factory=_default_home)
    # SQLAlchemy URL of a PostgreSQL database; empty = embedded SQLite in `home`.
    database_url: str = ""
    # SQLite `synchronous` pragma for the embedded store (FULL survives power loss).
    sqlite_synchronous: str = "NORMAL"
    # Seconds between projection catch-up polls in readers that are not the writer.
    projection_poll_interval_s: float = 0.2

    # --- provisioning ----------------------------------------------------------
    # Root under which a node installs engines; empty = `home`/engines.
    engine_root: str = ""
    # Install under `engine_root`/<node id> (several simulated Ray nodes on one machine).
    engine_root_per_node: bool = False
    # Seconds between a node agent's refreshes of its node's facts.
    node_facts_refresh_s: float = 60.0
    # Seconds between a node agent's periodic reconciles (a safety net for lost notices).
    node_resync_interval_s: float = 30.0
    # Seconds between the control plane's checks for Ray nodes that joined or died.
    node_watch_interval_s: float = 1.0
    # Cache of compiled wheels and downloads; empty = `home`/cache.
    cache_dir: str = ""
    # Allow package-mode installs (pip/uv into an engine environment).
    allow_package_installs: bool = True
    # Package indexes an install may use, comma separated; empty = the default index.
    package_indexes: list[str] = Field(default_factory=list)
    # URL prefixes binary downloads may come from, comma separated; empty = any https URL.
    allowed_url_prefixes: list[str] = Field(default_factory=list)
    # Allow source-mode builds (git clone + CMake).
    allow_source_builds: bool = True
    # Allow container-mode installs (image pulls with podman or docker).
    allow_container_pulls: bool = True
    # Unprivileged user that engine processes and builds run as when the service is root.
    engine_user: str = ""
    # Python interpreter for package-mode engine environments; empty = the one running Roundhouse.
    engine_python: str = ""
    # Seconds an engine process may take to answer its health endpoint after (re)start.
    engine_ready_timeout_s: float = 300.0

    # --- serving ---------------------------------------------------------------
    # Address the HTTP gateway binds to (127.0.0.1 = this machine only).
    gateway_host: str = "127.0.0.1"
    # TCP port of the HTTP gateway.
    gateway_port: int = 8765
    # Requests that may wait (queued, resolving, loading) before the gateway answers 429.
    gateway_max_queue: int = 64
    # Requests the gateway runs at once across all runtimes; more wait in the queue.
    gateway_max_running: int = 16
    # Seconds a 429 asks the client to wait (Retry-After).
    gateway_retry_after_s: float = 1.0
    # Seconds a runtime stays loaded after its last request (0 = unload at once, -1 = never).
    keep_alive_s: float = 300.0
    # Seconds running requests may take to finish when their runtime is unloaded.
    drain_timeout_s: float = 30.0
    # Where runtimes go among nodes with the engine installed: spread (most free) or pack.
    placement_strategy: str = "spread"
    # Bearer token for the /api admin routes; empty = the one `up` stored in `home`.
    api_token: str = ""
    # Organization the admin token acts for; tokens of another organization get 403.
    organization_id: str = ""
    # API keys accepted on /v1, comma separated; empty = /v1 is open.
    api_keys: list[str] = Field(default_factory=list)

    # --- artifacts -------------------------------------------------------------
    # Shared artifact store directory; empty = `home`/artifacts.
    artifact_store: str = ""
    # This node's model cache, where artifacts are materialized before loads; empty = home/models.
    models_dir: str = ""
    # How a node materializes an artifact: copy, hardlink (copy across volumes) or symlink.
    materialize_mode: str = "hardlink"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``ROUNDHOUSE_*`` variables; raise SettingsError naming a bad one."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = source.get(PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            if field.annotation == list[str]:
                values[name] = [part.strip() for part in raw.split(",") if part.strip()]
            else:
                values[name] = raw
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            item = exc.errors()[0]
            var = PREFIX + str(item["loc"][0]).upper()
            raise SettingsError(f"{var}: {item['msg']} (got {item.get('input')!r})") from None

    # Derived locations -------------------------------------------------------------
    @property
    def engine_root_path(self) -> Path:
        return Path(self.engine_root) if self.engine_root else self.home / "engines"

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.home / "cache"

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir) if self.models_dir else self.home / "models"

    @property
    def artifact_store_path(self) -> Path:
        return Path(self.artifact_store) if self.artifact_store else self.home / "artifacts"
