"""ray_cluster.yaml against Ray's own cluster-launcher schema (what `ray up` checks before it starts anything)."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_is_valid(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    gpu_types = {name: t for name, t in prepared["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] for t in gpu_types.values())
    assert any("-c ~/modrwkv/constraints.txt -e ~/modrwkv" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("where", ["top", "node_type"])
def test_unknown_key_is_rejected(config, where):
    bad = copy.deepcopy(config)
    (bad if where == "top" else bad["available_node_types"]["gpu_a10g"])["gpus_per_node"] = 1
    with pytest.raises(Exception, match="gpus_per_node"):
        validate_config(prepare_config(bad))
