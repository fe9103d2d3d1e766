"""Binary mode against local archives: checksums, idempotence, cache keys, readiness
after a hand-deleted install, and single-flight across two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import file_server, make_archive, make_node

from engines.errors import ChecksumMismatch, PolicyRefused
from engines.plan import InstallProgress
from engines.registry import get_provider

llamacpp = get_provider("llamacpp")
LOCAL = "http://127.0.0.1"


def binary_config(url: str, sha: str) -> dict:
    return {"install_mode": "binary", "binary_url": url, "binary_sha256": sha}


def test_good_checksum_installs_and_stamps_the_checksum(tmp_path: Path) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    node = make_node(tmp_path, allowed_url_prefixes=[LOCAL])
    reports: list[InstallProgress] = []
    with file_server(archive.parent) as (base, counter):
        plan = llamacpp.plan_install(binary_config(f"{base}/{archive.name}", sha), node)
        record = llamacpp.install(plan, reports.append, settings=node.settings)
    assert record.engine_version.startswith(f"sha256:{sha}")
    assert "9999" in record.engine_version  # what the binary said for --version
    assert record.bin and Path(record.bin).name == "llama-server"
    assert os.access(record.bin, os.X_OK)
    assert counter.gets == 1
    assert {r.stage for r in reports} >= {"download", "unpack", "done"}
    assert json.loads(plan.record_path.read_text())["cache_key"] == plan.cache_key


def test_bad_checksum_deletes_the_download_and_names_both_checksums(tmp_path: Path) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    wrong = "0" * 64
    node = make_node(tmp_path, allowed_url_prefixes=[LOCAL])
    with file_server(archive.parent) as (base, _):
        plan = llamacpp.plan_install(binary_config(f"{base}/{archive.name}", wrong), node)
        with pytest.raises(ChecksumMismatch) as err:
            llamacpp.install(plan, settings=node.settings)
    assert wrong in str(err.value) and sha in str(err.value)
    assert not plan.install_dir.exists()
    assert not (Path(plan.cache_dir) / "downloads" / wrong).exists()
    assert not llamacpp.check_ready(node, binary_config(f"{LOCAL}/x", wrong)).ready


def test_reinstalling_the_same_plan_is_a_no_op_unless_forced(tmp_path: Path) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    node = make_node(tmp_path, allowed_url_prefixes=[LOCAL])
    with file_server(archive.parent) as (base, _):
        plan = llamacpp.plan_install(binary_config(f"{base}/{archive.name}", sha), node)
        first = llamacpp.install(plan, settings=node.settings)
        again = llamacpp.install(plan, settings=node.settings)
        forced = llamacpp.install(plan, force=True, settings=node.settings)
    assert not first.reused
    assert again.reused and again.installed_at == first.installed_at
    assert not forced.reused and forced.installed_at > first.installed_at


def test_a_changed_cache_key_installs_into_a_new_directory(tmp_path: Path) -> None:
    old, old_sha = make_archive(tmp_path / "dist", name="old.tar.gz")
    new, new_sha = make_archive(tmp_path / "dist", extra_args="--build-info b2", name="new.tar.gz")
    node = make_node(tmp_path, allowed_url_prefixes=[LOCAL])
    with file_server(old.parent) as (base, counter):
        old_cfg = binary_config(f"{base}/{old.name}", old_sha)
        new_cfg = binary_config(f"{base}/{new.name}", new_sha)
        first = llamacpp.install(llamacpp.plan_install(old_cfg, node), settings=node.settings)
        assert not llamacpp.check_ready(node, new_cfg).ready
        second = llamacpp.install(llamacpp.plan_install(new_cfg, node), settings=node.settings)
        assert llamacpp.check_ready(node, new_cfg).ready
    assert not second.reused
    assert second.cache_key != first.cache_key
    assert second.install_dir != first.install_dir
    assert counter.gets == 2


def test_check_ready_looks_at_disk_after_the_install_is_deleted_by_hand(tmp_path: Path) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    node = make_node(tmp_path, allowed_url_prefixes=[LOCAL])
    with file_server(archive.parent) as (base, _):
        cfg = binary_config(f"{base}/{archive.name}", sha)
        record = llamacpp.install(llamacpp.plan_install(cfg, node), settings=node.settings)
        report = llamacpp.check_ready(node, cfg)
        assert report.ready and report.engine_version == record.engine_version
        shutil.rmtree(Path(record.install_dir) / "dist")  # the record file stays behind
        report = llamacpp.check_ready(node, cfg)
        assert not report.ready
        assert report.missing_local[0]["dependency_key"] == "llama-cpp-python"
        assert "missing" in report.missing_local[0]["reason"]
        assert not llamacpp.install(llamacpp.plan_install(cfg, node), settings=node.settings).reused
        assert llamacpp.check_ready(node, cfg).ready


def test_two_processes_installing_the_same_plan_download_and_install_once(tmp_path: Path) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    root = tmp_path / "engines"
    env = {
        **os.environ,
        "ROUNDHOUSE_CACHE_DIR": str(tmp_path / "cache"),
        "ROUNDHOUSE_ALLOWED_URL_PREFIXES": LOCAL,
    }
    with file_server(archive.parent, delay_s=1.0) as (base, counter):
        cfg = json.dumps(binary_config(f"{base}/{archive.name}", sha))
        argv = [sys.executable, "-m", "engines", "install", "llamacpp", "--mode", "binary",
                "--root", str(root), "--config", cfg]
        procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    records = [json.loads(out) for out, _ in outs]
    assert sorted(r["reused"] for r in records) == [False, True]
    assert records[0]["cache_key"] == records[1]["cache_key"]
    assert counter.gets == 1


def test_a_policy_change_refuses_new_installs_but_not_readiness_of_existing_ones(
    tmp_path: Path,
) -> None:
    archive, sha = make_archive(tmp_path / "dist")
    cfg = binary_config(archive.as_uri(), sha)
    node = make_node(tmp_path, allowed_url_prefixes=["file://"])
    llamacpp.install(llamacpp.plan_install(cfg, node), settings=node.settings)
    locked = make_node(tmp_path, allowed_url_prefixes=["https://mirror.example/"])
    assert llamacpp.check_ready(locked, cfg).ready
    with pytest.raises(PolicyRefused, match="ROUNDHOUSE_ALLOWED_URL_PREFIXES"):
        llamacpp.plan_install(cfg, locked)
    plan = llamacpp.plan_install(cfg, node)
    with pytest.raises(PolicyRefused):
        llamacpp.install(plan, force=True, settings=locked.settings)
    assert llamacpp.check_ready(locked, cfg).ready  # a refused install touches nothing
