"""`roundhouse up`, a `ray job submit` of the install job, the CLI against it, `down`.

One real Ray head started by `roundhouse up` (explicit free ports, its own temp
dir); `roundhouse down` stops exactly that head, and the test stops it too if
anything failed before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray_helpers import ray_test_env

from cluster.head import Head, _pids_under, free_port, stop_head

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def head_env(tmp_path_factory: pytest.TempPathFactory, llamacpp_env: object) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("cli-home")
    env = {**os.environ, **ray_test_env(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("ROUNDHOUSE_API_TOKEN", None)
    env["ROUNDHOUSE_GATEWAY_PORT"] = str(free_port())
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    try:
        yield env
    finally:
        head = Head.load(home)
        if head is not None:
            stop_head(head)


def test_up_job_submit_cli_and_down(head_env: dict[str, str]) -> None:
    home = Path(head_env["ROUNDHOUSE_HOME"])
    up = _run([str(BIN / "roundhouse"), "up", "--num-cpus", "2"], head_env)
    assert up.returncode == 0, up.stdout + up.stderr
    head = Head.load(home)
    assert head is not None and "ray job submit" in up.stdout
    port = head_env["ROUNDHOUSE_GATEWAY_PORT"]
    assert f"gateway: http://127.0.0.1:{port}" in up.stdout, up.stdout
    token = (home / "api_token").read_text().strip()
    assert f"admin token: {token}" in up.stdout
    refused = httpx.get(f"http://127.0.0.1:{port}/api/engines", timeout=30)
    assert refused.status_code == 401

    job = _run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url,
                "--working-dir", ".", "--", "python", "scripts/install_engine_job.py",
                "--provider", "llamacpp", "--name", "job-llamacpp"], head_env, timeout=420)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "RESULT" in job.stdout

    listed = _run([str(BIN / "roundhouse"), "engines", "list"], head_env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["job-llamacpp"]["status"] == "active"

    admin = httpx.get(f"http://127.0.0.1:{port}/api/engines", timeout=30,
                      headers={"Authorization": f"Bearer {token}"})
    assert admin.status_code == 200 and "job-llamacpp" in admin.text
    rid = str(rows["job-llamacpp"]["id"])
    installed = _run([str(BIN / "roundhouse"), "install", rid, "--wait"], head_env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "installed" in installed.stdout and "node" in installed.stdout

    missing = _run([str(BIN / "roundhouse"), "engines", "show", "99999"], head_env)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr

    down = _run([str(BIN / "roundhouse"), "down"], head_env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert Head.load(home) is None
    assert _pids_under(head.temp_dir, int(head.address.rsplit(":", 1)[1])) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
