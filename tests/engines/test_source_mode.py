"""Source mode against a local git repository holding a tiny CMake project whose
``llama-server`` target prints its build flavor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from engine_helpers import make_node

from engines.errors import InstallError
from engines.registry import get_provider

llamacpp = get_provider("llamacpp")

CMAKE = """cmake_minimum_required(VERSION 3.16)
project(fakellama C)
set(FLAVOR "default" CACHE STRING "build flavor")
add_executable(llama-server server.c)
target_compile_definitions(llama-server PRIVATE FLAVOR="${FLAVOR}" REVISION=%d)
add_executable(unrelated server.c)
target_compile_definitions(unrelated PRIVATE FLAVOR="x" REVISION=0)
"""
SERVER_C = """#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--version") == 0) {
    fprintf(stderr, "version: %d (" FLAVOR ")\\n", REVISION);
    return 0;
  }
  return 1;
}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(repo), *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def commit_revision(repo: Path, revision: int) -> str:
    (repo / "CMakeLists.txt").write_text(CMAKE % revision)
    (repo / "server.c").write_text(SERVER_C)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", f"revision {revision}")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "llama.cpp"
    path.mkdir()
    git(path, "init", "-q", "-b", "master")
    return path


def test_source_build_stamps_the_commit_and_flags(tmp_path: Path, repo: Path) -> None:
    sha = commit_revision(repo, 1)
    node = make_node(tmp_path)
    cfg = {"install_mode": "source", "source_repo": str(repo), "source_ref": "master",
           "cmake_args": "-DGGML_NATIVE=OFF -DFLAVOR=portable"}
    plan = llamacpp.plan_install(cfg, node)
    assert plan.inputs["commit"] == sha
    record = llamacpp.install(plan, settings=node.settings)
    assert record.engine_version == f"{sha} (-DGGML_NATIVE=OFF -DFLAVOR=portable)"
    assert record.bin and Path(record.bin).name == "llama-server"
    out = subprocess.run([record.bin, "--version"], capture_output=True, text=True)
    assert "version: 1 (portable)" in out.stderr  # built with the plan's flags
    report = llamacpp.check_ready(node, cfg)
    assert report.ready and report.engine_version == record.engine_version


def test_a_moved_branch_is_a_new_cache_key_and_a_rebuild(tmp_path: Path, repo: Path) -> None:
    commit_revision(repo, 1)
    node = make_node(tmp_path)
    cfg = {"install_mode": "source", "source_repo": str(repo)}
    first = llamacpp.install(llamacpp.plan_install(cfg, node), settings=node.settings)
    new_sha = commit_revision(repo, 2)
    assert not llamacpp.check_ready(node, cfg).ready
    second = llamacpp.install(llamacpp.plan_install(cfg, node), settings=node.settings)
    assert not second.reused and second.cache_key != first.cache_key
    assert second.engine_version.startswith(new_sha)
    out = subprocess.run([str(second.bin), "--version"], capture_output=True, text=True)
    assert "version: 2" in out.stderr


def test_an_unknown_ref_says_what_to_set(tmp_path: Path, repo: Path) -> None:
    commit_revision(repo, 1)
    cfg = {"install_mode": "source", "source_repo": str(repo), "source_ref": "no-such-branch"}
    with pytest.raises(InstallError, match="source_ref"):
        llamacpp.plan_install(cfg, make_node(tmp_path))
