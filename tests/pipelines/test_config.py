"""YAML configs are checked at load: readable errors that name the file and the key."""

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.encode import EncodeConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_valid_config_with_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "dataset: {format: series, path: s.csv, lookback: 48}\nencoder: {kind: raw}\n")
    config = load_config(path, EncodeConfig, {"run.actors": 2})
    assert config.dataset.lookback == 48 and config.dataset.horizon == 24 and config.run.actors == 2
    assert config.cache.shard_size == 256 and config.limits.max_audio_seconds == 30.0


@pytest.mark.parametrize("text, message", [
    ("dataset: {format: parquet, path: x}\nencoder: {kind: raw}", "dataset.format: must be one of"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {batch_sise: 4}",
     "run: unknown key 'batch_sise' \\(did you mean 'batch_size'\\?\\)"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {actors: two}", "run.actors: expected int, got 'two'"),
    ("dataset: {format: series, path: x}", "encoder: required"),
    ("dataset: {format: series, path: x}\nencoder: {kind: clip}", "encoder.model_dir is required"),
    ("dataset: {format: series, path: x, fractions: [0.5, 0.5]}\nencoder: {kind: raw}", "fractions must be three"),
    ("dataset: [", "not valid YAML"),
])
def test_bad_configs_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text), EncodeConfig)
    assert str(info.value).startswith(str(tmp_path / "c.yaml"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml", EncodeConfig)
