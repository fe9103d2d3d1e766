"""Source mode: clone a repository at a pinned commit and build the server with CMake.

The plan resolves the ref to a commit SHA (so a moved branch is a new cache
key); the install clones, checks that commit out, configures with the plan's
CMake flags and builds only the server target. Stamp: commit SHA + flags.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil

from engines.errors import InstallError
from engines.plan import InstallPlan, InstallProgress, InstallRecord, ProgressCallback
from engines.sandbox import RunAs, chown_tree, run_step, sanitized_env
from events.settings import Settings

_SHA = re.compile(r"^[0-9a-f]{40}$")


def resolve_ref(repo: str, ref: str, timeout_s: float = 60.0) -> str:
    """The commit SHA ``ref`` names in ``repo`` (a URL or local path).

    A full 40-hex SHA is returned as is. Raises InstallError when git cannot
    reach the repository or the ref does not exist.
    """
    if _SHA.match(ref):
        return ref
    out = run_step(
        "resolve source ref",
        ["git", "ls-remote", repo, ref],
        env=sanitized_env({"GIT_TERMINAL_PROMPT": "0"}),
        timeout_s=timeout_s,
    )
    refs = dict(
        (parts[1], parts[0])
        for parts in (line.split() for line in out.splitlines())
        if len(parts) == 2
    )
    for name in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
        if name in refs:
            return refs[name]
    if refs:
        return next(iter(refs.values()))
    raise InstallError(
        f"ref {ref!r} was not found in {repo}; set source_ref to a branch, tag or full commit SHA"
    )


def install_source(
    plan: InstallPlan, report: ProgressCallback, settings: Settings, run_as: RunAs
) -> InstallRecord:
    """Clone, check out the plan's commit, build the target, copy it to ``bin/``."""
    repo: str = plan.inputs["repo"]
    commit: str = plan.inputs["commit"]
    target: str = plan.inputs.get("target", "llama-server")
    cmake_args: str = plan.inputs.get("cmake_args", "")
    jobs = str(os.cpu_count() or 1)
    env = sanitized_env({"GIT_TERMINAL_PROMPT": "0"})
    if run_as.home:
        env["HOME"] = run_as.home
    src = plan.install_dir / "src"
    build = plan.install_dir / "build"
    log_file = plan.install_dir.with_name(plan.install_dir.name + ".build.log")
    log_file.unlink(missing_ok=True)
    chown_tree(plan.install_dir, run_as)
    report(InstallProgress("clone", f"cloning {repo}", 0.05))
    run_step("git clone", ["git", "clone", "--quiet", repo, str(src)], env=env, run_as=run_as,
             timeout_s=1800, log_file=log_file)
    run_step("git checkout", ["git", "-C", str(src), "checkout", "--quiet", commit], env=env,
             run_as=run_as, log_file=log_file)
    head = run_step("git rev-parse", ["git", "-C", str(src), "rev-parse", "HEAD"], env=env,
                    run_as=run_as).strip()
    if head != commit:
        raise InstallError(f"checked out {head} but the plan pinned {commit}; re-plan and retry")
    report(InstallProgress("configure", f"cmake {cmake_args}", 0.2))
    run_step(
        "cmake configure",
        ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         *shlex.split(cmake_args)],
        env=env, run_as=run_as, timeout_s=1800, log_file=log_file,
    )
    report(InstallProgress("build", f"building {target}", 0.4))
    run_step(
        "cmake build",
        ["cmake", "--build", str(build), "--target", target, "--parallel", jobs],
        env=env, run_as=run_as, timeout_s=7200, log_file=log_file,
    )
    built = sorted(p for p in build.rglob(target) if p.is_file() and os.access(p, os.X_OK))
    if not built:
        raise InstallError(
            f"the build finished but produced no executable named {target!r}; "
            f"see {log_file} and check source_repo/source_ref"
        )
    bin_dir = plan.install_dir / "bin"
    bin_dir.mkdir()
    binary = bin_dir / target
    shutil.copy2(built[0], binary)
    shutil.rmtree(build, ignore_errors=True)
    return InstallRecord(
        provider=plan.provider,
        mode="source",
        engine_version=f"{commit}" + (f" ({cmake_args})" if cmake_args else ""),
        cache_key=plan.cache_key,
        install_dir=str(plan.install_dir),
        plan=plan,
        bin=str(binary),
        gpu_backend=plan.gpu_backend,
        build_flags=cmake_args,
    )
