"""Container mode: podman (preferred) or docker pulls an image pinned by digest.

The install pulls and records the image digest as the stamp; launching builds
a ``run`` command with the port mapping, the model directory as a read-only
volume and the GPU device mask. Nothing here needs a running container engine
to be tested: command construction is pure.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from engines.errors import ContainerRuntimeMissing, InstallError
from engines.plan import InstallPlan, InstallProgress, InstallRecord, ProgressCallback
from engines.sandbox import RunAs, run_step, sanitized_env
from events.settings import Settings

RUNTIMES = ("podman", "docker")


def find_runtime(preferred: str | None = None) -> tuple[str, str]:
    """``(name, path)`` of the container runtime to use: podman first, then docker.

    Raises ContainerRuntimeMissing naming what was looked for.
    """
    order = [preferred] if preferred else list(RUNTIMES)
    for name in order:
        path = shutil.which(name)
        if path:
            return name, path
    looked = " or ".join(order)
    raise ContainerRuntimeMissing(
        f"no container runtime on this node: {looked} is not on PATH; install podman "
        "(preferred) or docker, or use install_mode=package"
    )


def image_digest(image: str) -> str | None:
    """The ``sha256:...`` digest pinned in an image reference, or None."""
    _, sep, digest = image.partition("@")
    return digest if sep and digest.startswith("sha256:") else None


def pull_argv(runtime: str, image: str) -> list[str]:
    return [runtime, "pull", image]


def inspect_argv(runtime: str, image: str) -> list[str]:
    return [runtime, "image", "inspect", "--format", "{{json .RepoDigests}}", image]


def gpu_args(runtime_name: str, gpu_ids: Sequence[int]) -> list[str]:
    """Device mask flags: docker ``--gpus device=..``; podman CDI ``--device nvidia.com/gpu=..``."""
    if not gpu_ids:
        return []
    if runtime_name == "docker":
        return ["--gpus", "device=" + ",".join(str(i) for i in gpu_ids)]
    out: list[str] = []
    for i in gpu_ids:
        out += ["--device", f"nvidia.com/gpu={i}"]
    return out


def run_argv(
    runtime: str,
    runtime_name: str,
    *,
    image: str,
    name: str,
    host_port: int,
    container_port: int,
    model_dir: Path,
    gpu_ids: Sequence[int],
    engine_args: Sequence[str],
    host: str = "127.0.0.1",
) -> list[str]:
    """The ``run`` argv: removed on exit, port mapped on ``host``, model dir mounted read-only."""
    return [
        runtime,
        "run",
        "--rm",
        "--name",
        name,
        "-p",
        f"{host}:{host_port}:{container_port}",
        "-v",
        f"{model_dir}:/models:ro",
        *gpu_args(runtime_name, gpu_ids),
        image,
        *engine_args,
    ]


def install_container(
    plan: InstallPlan, report: ProgressCallback, settings: Settings, run_as: RunAs
) -> InstallRecord:
    """Pull the image and record its digest."""
    image: str = plan.inputs["image"]
    name, runtime = find_runtime(plan.inputs.get("runtime"))
    env = sanitized_env()
    report(InstallProgress("pull", f"{name} pull {image}", 0.1))
    try:
        run_step(f"{name} pull", pull_argv(runtime, image), env=env, timeout_s=3600)
    except InstallError as exc:
        raise InstallError(
            f"{exc}\nIs the {name} service running and can this node reach the registry?"
        ) from None
    out = run_step(f"{name} image inspect", inspect_argv(runtime, image), env=env)
    pinned = image_digest(image)
    if pinned and pinned not in out:
        raise InstallError(
            f"pulled {image} but its repo digests ({out.strip()}) do not include {pinned}; "
            "check the image reference"
        )
    return InstallRecord(
        provider=plan.provider,
        mode="container",
        engine_version=pinned or out.strip(),
        cache_key=plan.cache_key,
        install_dir=str(plan.install_dir),
        plan=plan,
        bin=runtime,
        image=image,
        gpu_backend=plan.gpu_backend,
    )
