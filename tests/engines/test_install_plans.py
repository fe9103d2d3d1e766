"""Install plans: determinism, cache keys, build flags from node facts, GPU fallback,
policy refusals, and the providers' support checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_helpers import make_node

from engines.base import ConfigError
from engines.errors import GpuUnavailable, NotInstalled, PolicyRefused
from engines.node import Node
from engines.plan import InstallRecord
from engines.registry import get_provider

llamacpp = get_provider("llamacpp")
vllm = get_provider("vllm")
openai = get_provider("openai")

BINARY = {"install_mode": "binary", "binary_url": "https://example.org/llama.tgz",
          "binary_sha256": "ab" * 32}


def test_plan_is_deterministic_and_names_every_input(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    a = llamacpp.plan_install(None, node)
    b = llamacpp.plan_install({}, node)
    assert a == b
    assert a.mode == "package"
    assert a.inputs["requirement"] == "llama-cpp-python"
    assert a.inputs["extras"] == ["server"]
    assert a.inputs["build_env"] == {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    assert a.gpu_backend == "cpu"
    assert a.install_dir.parent == Path(node.engine_root) / "llamacpp"
    assert a.cache_key[:16] in a.install_dir.name


@pytest.mark.parametrize(
    "change",
    [{"version": "0.3.35"}, {"cmake_args": "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF"}],
)
def test_cache_key_changes_with_version_and_build_flags(tmp_path: Path, change: dict) -> None:
    node = make_node(tmp_path)
    base = llamacpp.plan_install(None, node)
    changed = llamacpp.plan_install(change, node)
    assert changed.cache_key != base.cache_key
    assert changed.install_dir != base.install_dir


def test_cache_key_ignores_where_the_install_happens(tmp_path: Path) -> None:
    a = llamacpp.plan_install(None, make_node(tmp_path / "a"))
    b = llamacpp.plan_install(None, make_node(tmp_path / "b"))
    assert a.cache_key == b.cache_key
    assert a.install_dir != b.install_dir


def test_gpu_node_with_cuda_toolkit_gets_a_cuda_build(tmp_path: Path) -> None:
    plan = llamacpp.plan_install(None, make_node(tmp_path, gpus=1, cuda_toolkit=True))
    assert plan.gpu_backend == "cuda"
    assert "-DGGML_CUDA=ON" in plan.inputs["build_env"]["CMAKE_ARGS"]


def test_gpu_without_toolkit_builds_for_cpu_and_says_why(tmp_path: Path) -> None:
    plan = llamacpp.plan_install(None, make_node(tmp_path, gpus=1, cuda_toolkit=False))
    assert plan.gpu_backend == "cpu"
    assert any("CUDA toolkit" in n for n in plan.notes)


def test_gpu_request_on_cpu_node_records_the_fallback(tmp_path: Path) -> None:
    plan = llamacpp.plan_install({"n_gpu_layers": -1}, make_node(tmp_path))
    assert plan.cpu_fallback is True
    assert any("CPU fallback" in n for n in plan.notes)


def test_gpu_request_on_cpu_node_fails_fast_without_fallback(tmp_path: Path) -> None:
    with pytest.raises(GpuUnavailable, match=r"has no GPU.*allow_cpu_fallback"):
        llamacpp.plan_install(
            {"server_flags": ["--ngl", "20"], "allow_cpu_fallback": False}, make_node(tmp_path)
        )


def test_binary_mode_needs_url_and_checksum(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="binary_url and binary_sha256"):
        llamacpp.plan_install({"install_mode": "binary"}, make_node(tmp_path))


def test_policy_refuses_package_installs_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(PolicyRefused, match="ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS") as err:
        llamacpp.plan_install(None, make_node(tmp_path, allow_package_installs=False))
    assert err.value.setting == "ROUNDHOUSE_ALLOW_PACKAGE_INSTALLS"


def test_policy_refuses_an_index_not_in_the_allowed_list(tmp_path: Path) -> None:
    with pytest.raises(PolicyRefused, match="ROUNDHOUSE_PACKAGE_INDEXES"):
        llamacpp.plan_install({"index_url": "https://evil.example/simple"}, make_node(tmp_path))
    allowed = make_node(tmp_path, package_indexes=["https://mirror.example/simple"])
    plan = llamacpp.plan_install({"index_url": "https://mirror.example/simple"}, allowed)
    assert plan.inputs["indexes"] == ["https://mirror.example/simple"]


def test_policy_refuses_plain_http_downloads_by_default(tmp_path: Path) -> None:
    cfg = {**BINARY, "binary_url": "http://example.org/llama.tgz"}
    with pytest.raises(PolicyRefused, match="ROUNDHOUSE_ALLOWED_URL_PREFIXES"):
        llamacpp.plan_install(cfg, make_node(tmp_path))
    assert llamacpp.plan_install(BINARY, make_node(tmp_path)).mode == "binary"


def test_policy_refuses_urls_outside_the_allowed_prefixes(tmp_path: Path) -> None:
    node = make_node(tmp_path, allowed_url_prefixes=["https://mirror.example/"])
    with pytest.raises(PolicyRefused, match=re.escape("https://example.org/llama.tgz")):
        llamacpp.plan_install(BINARY, node)


def test_policy_refuses_source_builds_when_disabled(tmp_path: Path) -> None:
    cfg = {"install_mode": "source", "source_repo": str(tmp_path)}
    with pytest.raises(PolicyRefused, match="ROUNDHOUSE_ALLOW_SOURCE_BUILDS"):
        llamacpp.plan_install(cfg, make_node(tmp_path, allow_source_builds=False))


def test_policy_refuses_container_pulls_when_disabled(tmp_path: Path) -> None:
    cfg = {"install_mode": "container", "image": "vllm/vllm-openai@sha256:" + "a" * 64}
    node = make_node(tmp_path, gpus=1, allow_container_pulls=False)
    with pytest.raises(PolicyRefused, match="ROUNDHOUSE_ALLOW_CONTAINER_PULLS"):
        vllm.plan_install(cfg, node)


def test_vllm_refuses_a_node_without_gpu(tmp_path: Path) -> None:
    assert not vllm.is_supported(make_node(tmp_path).facts).supported
    with pytest.raises(GpuUnavailable, match="CUDA GPU"):
        vllm.plan_install(None, make_node(tmp_path))


def test_vllm_container_image_must_be_pinned_by_digest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pinned by digest"):
        vllm.plan_install(
            {"install_mode": "container", "image": "vllm/vllm-openai:latest"},
            make_node(tmp_path, gpus=1),
        )


def test_vllm_package_plan_pins_the_version(tmp_path: Path) -> None:
    plan = vllm.plan_install({"version": "0.9.1"}, make_node(tmp_path, gpus=2))
    assert plan.inputs["requirement"] == "vllm" and plan.inputs["version"] == "0.9.1"
    assert plan.gpu_backend == "cuda"


def test_openai_plan_is_remote_and_never_holds_the_key(tmp_path: Path) -> None:
    cfg = {"base_url": "https://api.example/v1", "api_key": "sk-secret-123"}
    plan = openai.plan_install(cfg, make_node(tmp_path))
    assert plan.mode == "remote"
    assert "sk-secret-123" not in plan.model_dump_json()
    record = openai.install(plan, settings=make_node(tmp_path).settings)
    assert record.mode == "remote" and "sk-secret-123" not in record.model_dump_json()


def _binary_record(node: Node) -> InstallRecord:
    plan = llamacpp.plan_install(BINARY, node)
    return InstallRecord(provider="llamacpp", mode="binary", engine_version="sha256:x",
                         cache_key=plan.cache_key, install_dir=str(plan.install_dir),
                         plan=plan, bin="/usr/bin/true")


def test_prepare_on_a_cpu_node_records_the_cpu_fallback(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    cfg = {**BINARY, "n_gpu_layers": -1}
    prepared = llamacpp.prepare(model, cfg, node, record=_binary_record(node))
    assert prepared.cpu_fallback is True
    assert prepared.args[prepared.args.index("--n-gpu-layers") + 1] == "0"
    assert any("CPU" in n for n in prepared.notes)
    assert prepared.gpu_ids == []


def test_prepare_fails_fast_when_a_gpu_is_required_but_absent(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    cfg = {**BINARY, "n_gpu_layers": 10, "allow_cpu_fallback": False}
    with pytest.raises(GpuUnavailable, match="10 GPU layers"):
        llamacpp.prepare(model, cfg, node, record=_binary_record(node))


def test_prepare_on_a_gpu_node_offloads_and_masks_devices(tmp_path: Path) -> None:
    node = make_node(tmp_path, gpus=2)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    prepared = llamacpp.prepare(model, {**BINARY, "server_flags": ["--ngl", "99"]}, node,
                                record=_binary_record(node), port=18123)
    assert prepared.args[:6] == ["--model", str(model), "--host", "127.0.0.1", "--port", "18123"]
    assert prepared.args[prepared.args.index("--n-gpu-layers") + 1] == "99"
    assert prepared.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert prepared.metrics_path == "/metrics" and prepared.health_path == "/health"


def test_prepare_without_an_install_says_how_to_install(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(NotInstalled, match="python -m engines install llamacpp --mode package"):
        llamacpp.prepare(model, None, make_node(tmp_path))


def test_prepare_makes_a_relative_model_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    prepared = llamacpp.prepare("m.gguf", BINARY, node, record=_binary_record(node))
    assert prepared.args[1] == str(tmp_path / "m.gguf")  # engines run in the runtime dir
    assert prepared.model.id == "m"
