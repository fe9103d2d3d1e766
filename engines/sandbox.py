"""How engine builds and engine processes are run: a sanitized environment and, as root, a user.

Nothing from the service's own environment reaches an engine unless it is on
the allow-list below (no API keys, no ``ROUNDHOUSE_*`` settings, no Ray
variables). When the service runs as root and ``ROUNDHOUSE_ENGINE_USER`` names a
user, engine processes and builds run as that user.
"""

from __future__ import annotations

import logging
import os
import pwd
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engines.errors import InstallError

log = logging.getLogger("roundhouse.engines")

#: Variables passed through to builds and engine processes when set.
ALLOWED_ENV_VARS: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "CC",
        "CXX",
    }
)
#: Prefixes of variables passed through (locale settings).
ALLOWED_ENV_PREFIXES: tuple[str, ...] = ("LC_",)

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def sanitized_env(
    extra: Mapping[str, str] | None = None, source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the allow-listed subset of ``source`` (default ``os.environ``) plus ``extra``.

    ``PATH`` is always present. ``extra`` wins over inherited values.
    """
    env_in = os.environ if source is None else source
    env = {
        k: v
        for k, v in env_in.items()
        if k in ALLOWED_ENV_VARS or k.startswith(ALLOWED_ENV_PREFIXES)
    }
    env.setdefault("PATH", _DEFAULT_PATH)
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user a child runs as; None fields mean "as the service"."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    home: str | None = None


def resolve_run_as(engine_user: str, euid: int | None = None) -> RunAs:
    """Who engine processes run as.

    Only a root service switches user: it runs children as ``engine_user`` when
    set (raising InstallError when that user does not exist) and as itself,
    with a warning, when unset. A non-root service runs children as itself.
    """
    current = os.geteuid() if euid is None else euid
    if current != 0:
        return RunAs()
    if not engine_user:
        log.warning(
            "running engines as root; set ROUNDHOUSE_ENGINE_USER to an unprivileged user"
        )
        return RunAs()
    try:
        entry = pwd.getpwnam(engine_user)
    except KeyError:
        raise InstallError(
            f"ROUNDHOUSE_ENGINE_USER={engine_user!r} is not a user on this node; "
            "create it (useradd --system) or change the setting"
        ) from None
    return RunAs(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def chown_tree(path: Path, run_as: RunAs) -> None:
    """Give ``path`` (recursively) to the engine user so builds and engines can write there."""
    if run_as.uid is None or run_as.gid is None:
        return
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), run_as.uid, run_as.gid)
    os.lchown(path, run_as.uid, run_as.gid)


def run_step(
    step: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    run_as: RunAs | None = None,
    timeout_s: float | None = None,
    log_file: Path | None = None,
) -> str:
    """Run one install step (no shell) and return its stdout+stderr.

    Raises InstallError naming the step, the command and the tail of its
    output when it exits non-zero, cannot be started or times out.
    """
    who = run_as or RunAs()
    log.info("install step %s: %s", step, " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            user=who.uid,
            group=who.gid,
            extra_groups=[] if who.uid is not None else None,
        )
    except FileNotFoundError:
        raise InstallError(
            f"{step}: {argv[0]!r} was not found on PATH; install it on this node"
        ) from None
    except subprocess.TimeoutExpired as exc:
        out = exc.output if isinstance(exc.output, str) else ""
        raise InstallError(
            f"{step}: timed out after {timeout_s:.0f}s running {' '.join(argv)}; "
            f"last output:\n{tail(out)}"
        ) from None
    if log_file is not None:
        with log_file.open("a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(argv)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        raise InstallError(
            f"{step} failed (exit {proc.returncode}) running {' '.join(argv)}; "
            f"last output:\n{tail(proc.stdout)}"
        )
    return proc.stdout


def tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip().splitlines()[-lines:])
