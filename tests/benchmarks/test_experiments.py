"""benchmarks/experiments.py: every registered experiment resolves (its configs load and validate with each arm's
overrides, its suite exists, RESULTS.md names its command), and the forecast skip runs end to end as a script on
tiny CO2-shaped caches and a tiny backbone built here, a few steps a phase, scored on val and on the train split."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.experiments import EXPERIMENTS, SUITES, resolve
from modrwkv import RWKV7Config
from pipelines.config import load_config
from pipelines.encode import EncodeConfig, run_encode
from pipelines.metrics.ceilings import cache_samples, ridge_forecast_mse
from tests.conftest import random_backbone

ROOT = Path(__file__).resolve().parents[2]
CO2_ENCODES = tuple(f"configs/demo/encode_co2_{split}.yaml" for split in ("train", "val", "test"))


def test_every_experiment_resolves_and_results_names_its_command():
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for experiment in EXPERIMENTS.values():
        assert experiment.suite in SUITES, experiment.name
        assert len(experiment.arms) >= 2 and len({a.name for a in experiment.arms}) == len(experiment.arms)
        assert all(arm.quoted for arm in experiment.arms), experiment.name
        resolve(experiment)
        for line in experiment.results:
            assert f"- **{line}" in results, (experiment.name, line)
        assert f"`python benchmarks/experiments.py {experiment.name}`" in results, experiment.name


def test_an_arm_that_encodes_the_test_split_otherwise_than_val_is_refused():
    """The arms are compared on val and the choice scored on test: both must hold the same features."""
    import dataclasses

    import pytest

    from benchmarks.experiments import Arm
    from pipelines.config import ConfigError

    precision = EXPERIMENTS["feature-precision"]
    int8 = {f"configs/demo/encode_{task}_{split}.yaml": {"cache.precision": "int8"}
            for task in ("digits", "speech", "co2") for split in ("train", "test")}  # val left in fp16
    broken = dataclasses.replace(precision, arms=(precision.arms[0], Arm("int8", encode=int8, quoted="new")))
    with pytest.raises(ConfigError, match="encode_digits_test.yaml and configs/demo/encode_digits_val.yaml differ"):
        resolve(broken)


def tiny_co2_caches(root: Path) -> dict[str, str]:
    """The demo's CO2 encode configs on a made-up weekly series (700 weeks: a trend, a yearly cycle, noise), its
    raw windows as features instead of Fracast's: encode YAML -> cache entry."""
    weeks = np.arange(700)
    co2 = 330 + 0.03 * weeks + 3 * np.sin(2 * np.pi * weeks / 52) + np.random.default_rng(0).normal(0, 0.3, 700)
    (root / "co2.csv").write_text("co2\n" + "\n".join(f"{v:.3f}" for v in co2) + "\n")
    overrides = {"dataset.path": str(root / "co2.csv"), "encoder.kind": "raw", "encoder.model_dir": None,
                 "cache.root": str(root / "cache")}
    return {yaml: run_encode(load_config(ROOT / yaml, EncodeConfig, overrides)).uri for yaml in CO2_ENCODES}


@pytest.fixture(scope="module")
def tiny_co2(tmp_path_factory) -> Path:
    """caches.json (the CO2 encode YAMLs' tiny entries) and a tiny backbone, in one folder."""
    root = tmp_path_factory.mktemp("tiny_co2")
    (root / "caches.json").write_text(json.dumps(tiny_co2_caches(root)))
    random_backbone(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16)).save_pretrained(
        root / "backbone")
    return root


def forecast_skip(tiny_co2: Path, out: Path, *args: str) -> None:
    """The forecast-skip experiment, 2 steps a phase on the tiny caches and backbone."""
    subprocess.run([sys.executable, "benchmarks/experiments.py", "forecast-skip", "--seeds", "0", "--steps", "2",
                    "--caches", str(tiny_co2 / "caches.json"), "--set", f"model.backbone.path={tiny_co2 / 'backbone'}",
                    "--out", str(out), *args], cwd=ROOT, check=True, capture_output=True, text=True)


def test_the_forecast_skip_runs_end_to_end_in_a_few_steps(tiny_co2, tmp_path):
    out = tmp_path / "out"
    forecast_skip(tiny_co2, out, "--arms", "head-alone", "skip")

    report = json.loads((out / "forecast-skip.json").read_text())
    rows = {row["arm"]: row for row in report["results"]}
    assert list(rows) == ["head-alone", "skip"]
    for row in rows.values():
        assert (row["task"], row["metric"]) == ("CO2 forecast", "mse") and len(row["model"]) == 1
        assert row["ceiling"] > 0 and row["baseline"] > 0 and row["quoted"]
    assert "2 steps a phase" in report["machine"]
    assert f"every arm with --set model.backbone.path={tiny_co2 / 'backbone'}" in report["machine"]
    assert "the val split" in report["machine"]
    table = (out / "forecast-skip.md").read_text()
    assert "| skip | CO2 forecast | mse |" in table and "Forecast head alone vs head + lookback skip" in table
    assert "Scored on the val split" in table
    assert (out / "train" / "demo-forecast-skip-skip-s0" / "phase2" / "model").is_dir()


def test_the_train_split_scores_the_windows_the_arm_trained_on(tiny_co2, tmp_path):
    forecast_skip(tiny_co2, tmp_path, "--arms", "skip", "--split", "train")

    report = json.loads((tmp_path / "forecast-skip.json").read_text())
    assert "the train split" in report["machine"]
    assert "the questions the arms trained on: a diagnostic of fit" in (tmp_path / "forecast-skip.md").read_text()
    (predictions,) = (tmp_path / "train" / "demo-forecast-skip-skip-s0" / "eval" / "eval_co2-train").glob("*.jsonl")
    train_entry = json.loads((tiny_co2 / "caches.json").read_text())["configs/demo/encode_co2_train.yaml"]
    written = json.loads((Path(train_entry) / "manifest.json").read_text())["counts"]["written"]
    assert len(predictions.read_text().splitlines()) == written  # every training window, each once
    (row,) = report["results"]
    windows = cache_samples(train_entry)
    assert row["ceiling"] == ridge_forecast_mse(windows, windows)  # ridge, too, fit and scored on them
