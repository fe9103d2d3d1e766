"""The node an engine is installed on and run on: its facts plus its settings.

``Node`` is what every side-effecting provider method takes. ``detect_node_facts``
looks at this machine (cores, memory, disk, NVIDIA GPUs, CUDA toolkit) and is
what a node agent reports.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engines.base import GpuFact, NodeFacts
from events.settings import Settings


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    # No /proc (not Linux): no memory facts.
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    return out


def detect_gpus() -> list[GpuFact]:
    """NVIDIA GPUs as ``nvidia-smi`` reports them; empty when it is absent or fails."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        proc = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,memory.free",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    gpus = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            gpus.append(
                GpuFact(
                    index=int(parts[0]),
                    name=parts[1],
                    memory_bytes=int(float(parts[2])) * 1024 * 1024,
                    free_memory_bytes=int(float(parts[3])) * 1024 * 1024,
                )
            )
        except ValueError:
            continue
    return gpus


def has_cuda_toolkit() -> bool:
    """True when ``nvcc`` is on PATH or under CUDA_HOME / /usr/local/cuda."""
    if shutil.which("nvcc"):
        return True
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and Path(base, "bin", "nvcc").exists():
            return True
    return False


def detect_node_facts(node_id: str | None = None, disk_path: Path | None = None) -> NodeFacts:
    """Facts about this machine; ``disk_path`` is where free disk is measured (default cwd)."""
    mem = _meminfo()
    try:
        disk_free = shutil.disk_usage(disk_path or Path.cwd()).free
    except OSError:
        disk_free = 0
    return NodeFacts(
        node_id=node_id or socket.gethostname(),
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=mem.get("MemTotal", 0),
        free_memory_bytes=mem.get("MemAvailable"),
        disk_free_bytes=disk_free,
        gpus=detect_gpus(),
        cuda_toolkit=has_cuda_toolkit(),
        os=f"{platform.system()}-{platform.machine()}",
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
    )


@dataclass(frozen=True)
class Node:
    """A node as the provisioning code sees it: reported facts plus local settings."""

    facts: NodeFacts
    settings: Settings = field(default_factory=Settings.from_env)

    @classmethod
    def local(cls, settings: Settings | None = None, node_id: str | None = None) -> Node:
        """This machine, with settings from the environment unless given."""
        s = settings or Settings.from_env()
        root = s.engine_root_path
        probe = root if root.exists() else Path.cwd()
        return cls(facts=detect_node_facts(node_id, probe), settings=s)

    @property
    def engine_root(self) -> Path:
        return self.settings.engine_root_path

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_path

    @property
    def runtime_dir(self) -> Path:
        """Where handoff files and engine logs of running engines live."""
        return self.engine_root / "run"

    @property
    def has_gpu(self) -> bool:
        return bool(self.facts.gpus)
