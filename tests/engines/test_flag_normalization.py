"""llama.cpp flag normalization, defaults and the mapping to llama-cpp-python's server."""

from __future__ import annotations

import pytest

from engines.base import ConfigError
from engines.launch import (
    force_cpu,
    llamacpp_python_args,
    normalize_llamacpp_flags,
    parse_flags,
    with_llamacpp_defaults,
)


@pytest.mark.parametrize("alias", ["--ngl", "-ngl", "--gpu-layers", "--n-gpu-layers"])
def test_gpu_layer_aliases_become_n_gpu_layers(alias: str) -> None:
    assert normalize_llamacpp_flags([alias, "12"]) == ["--n-gpu-layers", "12"]


def test_equals_form_is_split_and_last_repeat_wins() -> None:
    flags = ["--ctx-size=1024", "--ngl", "4", "-c", "4096", "--gpu-layers=8"]
    assert normalize_llamacpp_flags(flags) == ["--ctx-size", "4096", "--n-gpu-layers", "8"]


def test_negative_numbers_are_values_not_flags() -> None:
    assert parse_flags(["--n-gpu-layers", "-1", "--metrics"]) == [
        ("--n-gpu-layers", "-1"),
        ("--metrics", None),
    ]


def test_stray_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no flag before it"):
        normalize_llamacpp_flags(["8"])


@pytest.mark.parametrize("flag", ["--port", "--host", "-m", "--model"])
def test_flags_owned_by_roundhouse_are_refused(flag: str) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        normalize_llamacpp_flags([flag, "x"])


def test_defaults_turn_metrics_on_and_web_ui_off_and_user_flags_win() -> None:
    flags = with_llamacpp_defaults(
        ["--ngl", "10", "--parallel", "2"], n_gpu_layers=0, ctx_size=2048, threads=1, alias="m"
    )
    pairs = dict(parse_flags(flags))
    assert pairs["--n-gpu-layers"] == "10"
    assert pairs["--ctx-size"] == "2048"
    assert pairs["--threads"] == "1"
    assert pairs["--alias"] == "m"
    assert "--metrics" in pairs and "--no-webui" in pairs
    assert pairs["--parallel"] == "2"


def test_asking_for_the_web_ui_drops_the_no_webui_default() -> None:
    flags = with_llamacpp_defaults(["--webui"], n_gpu_layers=0, ctx_size=1, threads=1, alias="m")
    assert "--no-webui" not in flags


def test_force_cpu_sets_zero_gpu_layers() -> None:
    assert dict(parse_flags(force_cpu(["--n-gpu-layers", "-1", "--metrics"]))) == {
        "--n-gpu-layers": "0",
        "--metrics": None,
    }


def test_llama_cpp_python_mapping_renames_options_and_drops_unsupported() -> None:
    args, notes = llamacpp_python_args(
        ["--n-gpu-layers", "0", "--ctx-size", "512", "--threads", "1", "--alias", "m",
         "--metrics", "--no-webui", "--no-mmap", "--flash-attn", "off", "--n_batch", "64"]
    )
    assert args == [
        "--n_gpu_layers", "0", "--n_ctx", "512", "--n_threads", "1", "--model_alias", "m",
        "--use_mmap", "false", "--flash_attn", "false", "--n_batch", "64",
    ]
    assert any("--metrics" in n and "/metrics" in n for n in notes)
    assert any("--no-webui" in n for n in notes)


def test_llama_cpp_python_mapping_refuses_unknown_flags_with_the_alternatives() -> None:
    with pytest.raises(ConfigError, match="no equivalent in llama-cpp-python") as err:
        llamacpp_python_args(["--spec-replace", "a"])
    assert "--ctx-size" in str(err.value)
