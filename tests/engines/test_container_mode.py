"""Container mode without a container engine: runtime choice, refusal when none is
installed, command construction, and the install flow against a scripted fake CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_helpers import make_node

from engines.errors import ContainerRuntimeMissing, GpuUnavailable, InstallError
from engines.installers.container import find_runtime, gpu_args, run_argv
from engines.plan import InstallPlan, InstallRecord
from engines.registry import get_provider

vllm = get_provider("vllm")
DIGEST = "sha256:" + "c" * 64
IMAGE = f"vllm/vllm-openai@{DIGEST}"


def fake_cli(bin_dir: Path, name: str, log: Path, *, fail_pull: str | None = None) -> None:
    """A ``podman``/``docker`` stand-in that logs its argv and answers pull and inspect."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / name
    pull = (
        f'echo "{fail_pull}" >&2; exit 1' if fail_pull else 'echo "pulled"; exit 0'
    )
    script.write_text(
        "#!/bin/sh\n"
        f'echo "{name} $*" >> "{log}"\n'
        f'if [ "$1" = pull ]; then {pull}; fi\n'
        f"if [ \"$1\" = image ]; then echo '[\"vllm/vllm-openai@{DIGEST}\"]'; exit 0; fi\n"
        "exit 0\n"
    )
    script.chmod(0o755)


def test_no_runtime_on_path_names_both_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ContainerRuntimeMissing, match=r"podman or docker.*install podman"):
        find_runtime()
    with pytest.raises(ContainerRuntimeMissing, match="docker is not on PATH"):
        find_runtime("docker")


def test_podman_is_preferred_over_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    fake_cli(bin_dir, "docker", tmp_path / "log")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_runtime()[0] == "docker"
    fake_cli(bin_dir, "podman", tmp_path / "log")
    assert find_runtime()[0] == "podman"


def test_gpu_device_masks_per_runtime() -> None:
    assert gpu_args("docker", [0, 2]) == ["--gpus", "device=0,2"]
    assert gpu_args("podman", [1]) == ["--device", "nvidia.com/gpu=1"]
    assert gpu_args("podman", []) == []


def test_run_command_maps_the_port_mounts_the_model_and_masks_gpus(tmp_path: Path) -> None:
    argv = run_argv(
        "/usr/bin/podman", "podman", image=IMAGE, name="rh-m", host_port=18000,
        container_port=8000, model_dir=tmp_path, gpu_ids=[0], engine_args=["--model", "/models"],
    )
    assert argv == [
        "/usr/bin/podman", "run", "--rm", "--name", "rh-m", "-p", "127.0.0.1:18000:8000",
        "-v", f"{tmp_path}:/models:ro", "--device", "nvidia.com/gpu=0", IMAGE,
        "--model", "/models",
    ]


def test_install_pulls_by_digest_and_stamps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "cli.log"
    fake_cli(tmp_path / "bin", "podman", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    node = make_node(tmp_path, gpus=2)
    cfg = {"install_mode": "container", "image": IMAGE, "max_model_len": 4096}
    record = vllm.install(vllm.plan_install(cfg, node), settings=node.settings)
    assert record.engine_version == DIGEST
    assert record.image == IMAGE
    assert f"podman pull {IMAGE}" in log.read_text()
    assert vllm.check_ready(node, cfg).ready

    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    prepared = vllm.prepare(model_dir, cfg, node, port=18001)
    assert Path(prepared.bin).name == "podman"
    args = prepared.args
    assert args[:2] == ["run", "--rm"]
    assert "127.0.0.1:18001:8000" in args and f"{model_dir}:/models:ro" in args
    assert args[args.index(IMAGE) + 1 :][:2] == ["--model", "/models"]
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert prepared.stop_argv and prepared.stop_argv[1] == "stop"
    assert prepared.health_path == "/health" and prepared.version_path == "/version"


def test_a_pull_that_fails_says_which_runtime_to_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cli(tmp_path / "bin", "docker", tmp_path / "log",
             fail_pull="Cannot connect to the Docker daemon")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    node = make_node(tmp_path, gpus=1)
    plan = vllm.plan_install({"install_mode": "container", "image": IMAGE}, node)
    with pytest.raises(InstallError, match=r"(?s)Docker daemon.*Is the docker service running"):
        vllm.install(plan, settings=node.settings)
    assert not plan.install_dir.exists()


def test_vllm_package_command_uses_vllm_serve_with_the_memory_knobs(tmp_path: Path) -> None:
    node = make_node(tmp_path, gpus=2)
    cfg = {"gpu_memory_utilization": 0.8, "max_model_len": 2048, "tensor_parallel_size": 2,
           "extra_flags": ["--dtype", "half"]}
    plan = vllm.plan_install(cfg, node)
    python = plan.install_dir / "env" / "bin" / "python"
    record = InstallRecord(provider="vllm", mode="package", engine_version="0.9.1+cuda",
                           cache_key=plan.cache_key, install_dir=str(plan.install_dir),
                           plan=plan, python=str(python), gpu_backend="cuda")
    model = tmp_path / "model"
    model.mkdir()
    prepared = vllm.prepare(model, cfg, node, port=18002, record=record)
    assert prepared.bin == str(python.parent / "vllm")
    assert prepared.args[:6] == ["serve", str(model), "--host", "127.0.0.1", "--port", "18002"]
    pairs = dict(zip(prepared.args[6::2], prepared.args[7::2], strict=False))
    assert pairs["--gpu-memory-utilization"] == "0.8"
    assert pairs["--max-model-len"] == "2048"
    assert pairs["--tensor-parallel-size"] == "2"
    assert pairs["--dtype"] == "half"
    assert prepared.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_vllm_prepare_fails_fast_on_a_cpu_node(tmp_path: Path) -> None:
    with pytest.raises(GpuUnavailable, match="CUDA GPU"):
        vllm.prepare(tmp_path, None, make_node(tmp_path))


def test_plan_round_trips_through_its_record(tmp_path: Path) -> None:
    plan = vllm.plan_install({"install_mode": "container", "image": IMAGE},
                             make_node(tmp_path, gpus=1))
    assert InstallPlan.model_validate_json(json.dumps(plan.model_dump())) == plan
