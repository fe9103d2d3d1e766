"""Carry out an install plan: one module per mode, one entry point, ``install``.

``install`` is idempotent and single-flight per install directory: a file
lock beside the directory serializes installers across processes, and a
directory whose record has the plan's cache key (and whose engine is still on
disk) is reused without doing anything unless ``force`` is set.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from filelock import FileLock

from engines.errors import InstallError
from engines.installers.binary import install_binary
from engines.installers.container import install_container
from engines.installers.package import install_package
from engines.installers.source import install_source
from engines.plan import (
    InstallPlan,
    InstallProgress,
    InstallRecord,
    ProgressCallback,
    check_policy,
    no_progress,
)
from engines.sandbox import resolve_run_as
from events.settings import Settings

log = logging.getLogger("roundhouse.engines")


def _still_present(record: InstallRecord) -> bool:
    """Cheap check that what the record points at is still there."""
    if record.mode == "package":
        return bool(record.python) and Path(str(record.python)).exists()
    if record.mode in ("binary", "source"):
        return bool(record.bin) and Path(str(record.bin)).exists()
    return True


def install(
    plan: InstallPlan,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    settings: Settings | None = None,
) -> InstallRecord:
    """Install what ``plan`` describes and return its record (with ``engine_version``).

    Refuses (PolicyRefused) a plan the node's settings do not allow. Raises
    InstallError (or a subclass) naming the failed step; a failed install leaves
    no record behind, so readiness stays false and the next call retries.
    """
    report = progress or no_progress
    cfg = settings or Settings.from_env()
    check_policy(plan, cfg)
    log.info("install plan: %s", plan.summary())
    if plan.mode == "remote":
        return InstallRecord(
            provider=plan.provider,
            mode="remote",
            engine_version=str(plan.inputs.get("api", "v1")),
            cache_key=plan.cache_key,
            install_dir="",
            plan=plan,
            gpu_backend="none",
            reused=True,
        )
    target = plan.install_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    report(InstallProgress("lock", f"waiting for the install lock {plan.lock_path.name}"))
    with FileLock(str(plan.lock_path)):
        existing = InstallRecord.load(target)
        if (
            existing is not None
            and existing.cache_key == plan.cache_key
            and not force
            and _still_present(existing)
        ):
            report(InstallProgress("done", f"already installed: {existing.engine_version}", 1.0))
            return existing.model_copy(update={"reused": True})
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        run_as = resolve_run_as(cfg.engine_user)
        started = time.monotonic()
        installers = {
            "package": install_package,
            "binary": install_binary,
            "source": install_source,
            "container": install_container,
        }
        try:
            record = installers[plan.mode](plan, report, cfg, run_as)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        record = record.model_copy(update={"duration_s": time.monotonic() - started})
        record.save()
        log.info("installed %s %s: %s", plan.provider, plan.mode, record.engine_version)
        report(InstallProgress("done", f"installed {record.engine_version}", 1.0))
        return record


def installed_record(plan: InstallPlan) -> InstallRecord | None:
    """The record of ``plan``'s install when present with the same cache key, else None."""
    record = InstallRecord.load(plan.install_dir)
    if record is None or record.cache_key != plan.cache_key:
        return None
    return record


def require(condition: bool, message: str) -> None:
    """Raise InstallError(message) unless ``condition``."""
    if not condition:
        raise InstallError(message)
