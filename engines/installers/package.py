"""Package mode: an isolated Python environment per (provider, version, build flags).

The environment is created with ``uv`` (``venv`` + ``pip`` when uv is
missing). A package that needs compiling (llama-cpp-python with its CMake
flags) is built once into a wheel cache keyed by everything that changes the
wheel (name, version, build environment, Python and platform), so another node
or a reinstall on the same machine installs the cached wheel instead of
compiling again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from engines.errors import InstallError
from engines.plan import InstallPlan, InstallProgress, InstallRecord, ProgressCallback
from engines.sandbox import RunAs, chown_tree, run_step, sanitized_env
from events.settings import Settings


def python_tag(interpreter: str | None = None) -> str:
    """``cpXY-<platform>`` of an interpreter (default: the running one)."""
    if interpreter is None or Path(interpreter).resolve() == Path(sys.executable).resolve():
        return f"cp{sys.version_info.major}{sys.version_info.minor}-{sysconfig.get_platform()}"
    out = subprocess.run(
        [
            interpreter,
            "-c",
            "import sys, sysconfig; "
            "print(f'cp{sys.version_info.major}{sys.version_info.minor}-"
            "{sysconfig.get_platform()}')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        raise InstallError(
            f"engine Python {interpreter!r} does not run ({out.stderr.strip()[-200:]}); "
            "fix ROUNDHOUSE_ENGINE_PYTHON"
        )
    return out.stdout.strip()


def engine_python(settings: Settings) -> str:
    """The interpreter package-mode environments are created from."""
    return settings.engine_python or sys.executable


def _uv() -> str | None:
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def wheel_cache_dir(plan: InstallPlan) -> Path:
    """``<cache>/wheels/<name>-<version>-<key>``: where this plan's compiled wheel is kept."""
    inputs = plan.inputs
    key_inputs = {
        "requirement": inputs["requirement"],
        "version": inputs["version"],
        "build_env": inputs.get("build_env", {}),
        "python": inputs["python"],
    }
    key = hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:16]
    return Path(plan.cache_dir) / "wheels" / f"{inputs['requirement']}-{inputs['version']}-{key}"


def _cached_wheel(directory: Path) -> Path | None:
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    return wheels[0] if wheels else None


def ensure_wheel(
    plan: InstallPlan, report: ProgressCallback, settings: Settings, run_as: RunAs
) -> tuple[Path, bool]:
    """The compiled wheel for ``plan``: ``(path, from_cache)``.

    Builds it (``pip wheel --no-binary``, no pip cache, with the plan's build
    environment) when the cache lacks it; one build at a time per cache entry.
    """
    directory = wheel_cache_dir(plan)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        cached = _cached_wheel(directory)
        if cached is not None:
            report(InstallProgress("wheel", f"using cached wheel {cached.name}"))
            return cached, True
        name, version = plan.inputs["requirement"], plan.inputs["version"]
        build_env: dict[str, str] = dict(plan.inputs.get("build_env", {}))
        report(
            InstallProgress(
                "build",
                f"compiling {name}=={version} with {build_env} (takes minutes; cached after)",
            )
        )
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=directory.parent) as tmp:
            tmp_path = Path(tmp)
            chown_tree(tmp_path, run_as)
            env = sanitized_env(
                {
                    **build_env,
                    "FORCE_CMAKE": "1",
                    "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                }
            )
            if run_as.home:
                env["HOME"] = run_as.home
            builder = _make_env(tmp_path / "builder", settings, run_as, env, seed=True)
            argv = [
                builder,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                "--no-binary",
                name,
                "--wheel-dir",
                str(tmp_path / "out"),
                *_index_args(plan, pip=True),
                f"{name}=={version}",
            ]
            run_step(f"compile {name} wheel", argv, env=env, cwd=tmp_path, run_as=run_as,
                     timeout_s=3600)
            built = _cached_wheel(tmp_path / "out")
            if built is None:
                raise InstallError(f"pip wheel produced no wheel for {name}=={version}")
            staging = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.move(str(built), staging / built.name)
            (staging / "inputs.json").write_text(
                json.dumps(
                    {
                        "requirement": name,
                        "version": version,
                        "build_env": build_env,
                        "python": plan.inputs["python"],
                        "build_seconds": round(time.monotonic() - started, 1),
                    },
                    indent=2,
                )
            )
            staging.replace(directory)
        wheel = _cached_wheel(directory)
        assert wheel is not None
        return wheel, False


def _index_args(plan: InstallPlan, pip: bool) -> list[str]:
    indexes: list[str] = list(plan.inputs.get("indexes") or [])
    if not indexes:
        return []
    args = ["--index-url", indexes[0]]
    for extra in indexes[1:]:
        args += ["--extra-index-url", extra]
    return args


def _make_env(
    path: Path, settings: Settings, run_as: RunAs, env: dict[str, str], seed: bool = False
) -> str:
    """Create a virtual environment at ``path``; return its python."""
    base = engine_python(settings)
    uv = _uv()
    if uv:
        argv = [uv, "venv", "--quiet", "--python", base, str(path)]
        if seed:
            argv.insert(2, "--seed")
        run_step("create environment", argv, env=env, run_as=run_as)
    else:
        run_step("create environment", [base, "-m", "venv", str(path)], env=env, run_as=run_as)
    python = path / "bin" / "python"
    if not python.exists():
        raise InstallError(f"environment at {path} has no bin/python; is {base} a CPython?")
    return str(python)


def install_package(
    plan: InstallPlan, report: ProgressCallback, settings: Settings, run_as: RunAs
) -> InstallRecord:
    """Create the environment, install the pinned requirement, verify it imports."""
    inputs: dict[str, Any] = plan.inputs
    name, version = inputs["requirement"], inputs["version"]
    extras = inputs.get("extras") or []
    extra_txt = f"[{','.join(extras)}]" if extras else ""
    base = engine_python(settings)
    tag = python_tag(base)
    if tag != inputs["python"]:
        raise InstallError(
            f"the plan was made for {inputs['python']} but the engine Python {base} is {tag}; "
            "re-plan on this node or set ROUNDHOUSE_ENGINE_PYTHON"
        )
    uv_cache = Path(plan.cache_dir) / ("uv" if run_as.user is None else f"uv-{run_as.user}")
    uv_cache.mkdir(parents=True, exist_ok=True)
    chown_tree(uv_cache, run_as)  # the engine user's own package cache
    env = sanitized_env({"UV_CACHE_DIR": str(uv_cache)})
    if run_as.home:
        env["HOME"] = run_as.home
    chown_tree(plan.install_dir, run_as)
    report(InstallProgress("environment", f"creating environment in {plan.install_dir}", 0.05))
    python = _make_env(plan.install_dir / "env", settings, run_as, env)

    from_cache = False
    if inputs.get("build_env"):
        wheel, from_cache = ensure_wheel(plan, report, settings, run_as)
        spec = f"{name}{extra_txt} @ {wheel.resolve().as_uri()}"
    else:
        spec = f"{name}{extra_txt}=={version}"
    report(InstallProgress("install", f"installing {spec}", 0.5))
    uv = _uv()
    if uv:
        argv = [uv, "pip", "install", "--quiet", "--python", python, *_index_args(plan, False)]
        argv.append(spec)
    else:
        argv = [python, "-m", "pip", "install", "--quiet", *_index_args(plan, True), spec]
    run_step(f"install {name}", argv, env=env, run_as=run_as, timeout_s=3600)

    report(InstallProgress("verify", f"importing {inputs.get('import_check', name)}", 0.9))
    installed = probe_package(python, name, inputs.get("import_check"), env, run_as)
    backend = plan.gpu_backend
    flags = " ".join(f"{k}={v}" for k, v in sorted(inputs.get("build_env", {}).items()))
    stamp = f"{installed}+{backend}" + (f" ({flags})" if flags else "")
    return InstallRecord(
        provider=plan.provider,
        mode="package",
        engine_version=stamp,
        cache_key=plan.cache_key,
        install_dir=str(plan.install_dir),
        plan=plan,
        python=python,
        gpu_backend=backend,
        build_flags=flags,
        wheel_from_cache=from_cache,
    )


def probe_package(
    python: str,
    name: str,
    import_check: str | None,
    env: dict[str, str] | None = None,
    run_as: RunAs | None = None,
) -> str:
    """Import ``import_check`` in the environment and return ``name``'s installed version.

    Raises InstallError with the interpreter's output when either fails.
    """
    code = (
        "import importlib, importlib.metadata as m, sys\n"
        f"mod = {import_check!r}\n"
        "if mod: importlib.import_module(mod)\n"
        f"print(m.version({name!r}))\n"
    )
    out = run_step(
        f"import {import_check or name}",
        [python, "-c", code],
        env=env or sanitized_env(),
        run_as=run_as,
        timeout_s=300,
    )
    return out.strip().splitlines()[-1]
