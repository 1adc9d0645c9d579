"""Every shipped YAML loads against its job's schema (typos and wrong types fail here, not on a cluster)."""

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.encode import EncodeConfig
from pipelines.evaluate import EvalConfig
from pipelines.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"encode": EncodeConfig, "train": TrainConfig, "eval": EvalConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_validate(path):
    load_config(path, SCHEMAS[path.stem.split("_")[0]])
