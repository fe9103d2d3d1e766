"""ray_cluster.yaml is a valid Ray cluster-launcher config (Ray's own validation)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_ray_cluster_yaml_passes_ray_validation() -> None:
    config = prepare_config(_load())
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for t in config["available_node_types"] if t != config["head_node_type"]]
    assert workers, "the config has no worker node type"


def test_head_starts_ray_then_the_control_plane_and_setup_installs_roundhouse() -> None:
    config = _load()
    head = " ".join(config["head_start_ray_commands"])
    assert head.index("ray start --head") < head.index("roundhouse up --address auto")
    assert any("pip install" in c and "roundhouse" in c for c in config["setup_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_validation_refuses_a_broken_copy() -> None:
    config = prepare_config(_load())
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "missing"
    try:
        validate_config(broken)
    except ValueError as exc:
        assert "head_node_type" in str(exc)
    else:
        raise AssertionError("validate_config accepted an unknown head_node_type")
