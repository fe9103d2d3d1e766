"""``python -m engines``: install prints the record, run prints the handoff once ready and
stops the engine's whole process group on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import make_archive, pid_alive

from engines.launch import free_port, parse_flags


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ROUNDHOUSE_CACHE_DIR": str(tmp_path / "cache"),
            "ROUNDHOUSE_ALLOWED_URL_PREFIXES": "file://"}


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engines", *args], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=120)


def test_install_prints_the_record_and_progress_goes_to_stderr(tmp_path: Path) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    cfg = json.dumps({"binary_url": archive.as_uri(), "binary_sha256": sha})
    done = cli(tmp_path, "install", "llamacpp", "--mode", "binary", "--root",
               str(tmp_path / "root"), "--config", cfg)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["engine_version"].startswith(f"sha256:{sha}")
    assert "[download" in done.stderr and "plan:" in done.stderr
    check = cli(tmp_path, "check", "llamacpp", "--root", str(tmp_path / "root"),
                "--config", json.dumps({"install_mode": "binary", "binary_url": archive.as_uri(),
                                        "binary_sha256": sha}))
    assert check.returncode == 0 and json.loads(check.stdout)["ready"] is True


def test_refusals_exit_2_with_the_setting_to_change(tmp_path: Path) -> None:
    cfg = json.dumps({"binary_url": "http://example.org/x.tgz", "binary_sha256": "0" * 64})
    done = cli(tmp_path, "install", "llamacpp", "--mode", "binary", "--root",
               str(tmp_path / "root"), "--config", cfg)
    assert done.returncode == 2
    assert "ROUNDHOUSE_ALLOWED_URL_PREFIXES" in done.stderr
    unknown = cli(tmp_path, "install", "tgi")
    assert unknown.returncode == 2 and "known providers" in unknown.stderr


def test_run_without_an_install_says_how_to_install(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    done = cli(tmp_path, "run", "llamacpp", "--root", str(tmp_path / "root"), "--model",
               str(model))
    assert done.returncode == 1
    assert "python -m engines install llamacpp --mode package" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_prints_the_handoff_and_stops_cleanly_on_a_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    root = tmp_path / "root"
    cfg = json.dumps({"install_mode": "binary", "binary_url": archive.as_uri(),
                      "binary_sha256": sha})
    installed = cli(tmp_path, "install", "llamacpp", "--root", str(root), "--config", cfg)
    assert installed.returncode == 0, installed.stderr
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engines", "run", "llamacpp", "--root", str(root), "--config",
         cfg, "--model", str(model), "--port", str(port), "--", "--ngl", "0", "-np", "2"],
        env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("}"):
                break
        handoff = json.loads("".join(lines))
        assert handoff["url"] == f"http://127.0.0.1:{port}"
        assert handoff["engine_version"] == "b9999-fake"
        assert handoff["provisioning_mode"] == "binary"
        flags = dict(parse_flags(handoff["flags"]))
        assert flags["--n-gpu-layers"] == "0" and flags["--parallel"] == "2"
        assert "--metrics" in flags and "--no-webui" in flags
        handoff_files = list((root / "run").glob("llamacpp-*.json"))
        assert len(handoff_files) == 1
        engine_pid = handoff["pid"]
        assert pid_alive(engine_pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not pid_alive(engine_pid)
    assert not any((root / "run").glob("llamacpp-*.json"))
