"""A Ray head on this machine that outlives the command that started it (``roundhouse up``).

``start_head`` runs ``ray start --head`` on free ports with its own short temp
dir, so that ``stop_head`` can stop exactly that head's processes (found by
their command lines naming the temp dir) and never another Ray on the machine,
as ``ray stop`` would. What was started is written to ``<home>/cluster.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Head:
    """A head started by ``start_head``: its GCS address, dashboard and temp dir."""

    address: str
    dashboard_url: str
    temp_dir: str

    def save(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "cluster.json").write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, home: Path) -> Head | None:
        """The head recorded in ``home``, or None."""
        try:
            return cls(**json.loads((home / "cluster.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_executable() -> str:
    """The ``ray`` script of the running interpreter's environment (so that jobs and
    workers find the same Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("the `ray` command was not found; install ray[serve] in this "
                                "environment")
    return found


def start_head(num_cpus: int | None = None, num_gpus: int | None = None,
               port: int | None = None, dashboard_port: int | None = None,
               env: dict[str, str] | None = None, timeout_s: float = 120.0) -> Head:
    """Start a Ray head (with the dashboard, which job submission needs) and return it.

    The environment of the head (and so of its workers and jobs) is this process's,
    with the interpreter's directory first on PATH. Raises RuntimeError with the tail
    of ``ray start``'s output when it fails.
    """
    port = port or free_port()
    dashboard_port = dashboard_port or free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh-ray-")
    argv = [ray_executable(), "start", "--head", f"--port={port}",
            f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}"]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    child_env = dict(env if env is not None else os.environ)
    child_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + child_env.get("PATH", "")
    proc = subprocess.run(argv, env=child_env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        _kill_by_temp_dir(temp_dir, port)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
    return Head(address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                temp_dir=temp_dir)


def _pids_under(temp_dir: str, gcs_port: int | None = None) -> list[int]:
    """Processes of one head: their command line names its temp dir or its GCS port."""
    gcs = re.compile(rf"\d+\.\d+\.\d+\.\d+:{gcs_port}\b") if gcs_port else None
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline or (gcs is not None and "ray" in cmdline
                                   and gcs.search(cmdline)):
            pids.append(int(entry.name))
    return _with_descendants(pids)


def _with_descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (Ray renames its agents and workers, so
    they are found through their parents)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def _kill_by_temp_dir(temp_dir: str, gcs_port: int | None = None,
                      grace_s: float = 10.0) -> int:
    pids = _pids_under(temp_dir, gcs_port)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids + _pids_under(temp_dir, gcs_port):
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_head(head: Head) -> int:
    """Stop the processes of ``head`` (SIGTERM, then SIGKILL after a grace period) and
    remove its temp dir; return how many processes were signalled. Worker processes
    are found through the head's temp dir as well."""
    count = _kill_by_temp_dir(head.temp_dir, int(head.address.rsplit(":", 1)[1]))
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return count
