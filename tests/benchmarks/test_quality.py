"""benchmarks/quality.py's table cells (experiments.py prints the same)."""

import json

from benchmarks.quality import fmt, grouped_accuracy


def test_a_cell_shows_mean_and_std_over_seeds_and_no_spread_for_one_seed():
    assert fmt([0.78, 0.77, 0.77]) == "0.773 ± 0.006"  # the sample std (ddof 1); before 2026-12-06 ddof 0
    assert fmt([0.78]) == "0.780 (one seed)"  # not "0.780 ± 0.000": one seed measures no spread
    assert fmt([]) == fmt(None) == "—" and fmt(0.245) == "0.245"


def test_grouped_accuracy_scores_what_evaluation_scores(tmp_path):
    """A sample the model could not take is written with an empty prediction, which evaluation scores wrong; the
    per-type table left it out and divided by fewer samples than the run's accuracy."""
    rows = [{"key": "colour-1", "prediction": "red", "reference": "red"},
            {"key": "colour-2", "prediction": "blue", "reference": "red"},
            {"key": "count-1", "prediction": "3", "reference": "3"},
            {"key": "count-2", "prediction": "", "stopped": True, "reference": "2",
             "skipped": "an item too short for the projector"},
            {"key": "count-3", "language": None, "skipped": "no reference"}]  # no prediction: not scored
    predictions = tmp_path / "predictions_vqa.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert grouped_accuracy(predictions, lambda key: key.split("-")[0]) == {"colour": 0.5, "count": 0.5}


def test_a_phases_own_caches_get_the_variants_encode_overrides(monkeypatch):
    """A variant that trains phase II on other caches: its encode overrides (an int8 store, say) reach them too."""
    import benchmarks.quality as quality
    import pipelines.train_local

    digits = "configs/demo/encode_digits_train.yaml"
    trained = []
    monkeypatch.setattr(quality, "SINGLE_PROCESS", True)
    monkeypatch.setattr(quality, "cache_uri", lambda yaml, overrides=None: f"{yaml} with {overrides}")
    monkeypatch.setattr(pipelines.train_local, "run_single_process", lambda config, phase: trained.append(config))
    variant = quality.Variant(name="int8-digits", train={"phase2.caches": [digits], "phase2.mix": None})
    quality.train_both_phases("configs/demo/train.yaml", 0, "sqlite:///unused.db", variant,
                              {digits: {"cache.precision": "int8"}})
    config = trained[-1]
    assert config.phase2.caches == [f"{digits} with {{'cache.precision': 'int8'}}"]
    assert config.caches[0] == config.phase2.caches[0] and config.phase1.caches is None


def test_each_eval_cache_has_its_val_twin_and_a_suite_scores_the_split_asked(monkeypatch):
    """Arms are compared on val (benchmarks/experiments.py), so that the test split scores only what was chosen: the
    eval configs' caches are the test split's encode YAMLs, and the val split's sits beside each."""
    import pytest

    import benchmarks.quality as quality
    from pipelines.config import load_config
    from pipelines.evaluate import EvalConfig

    for _, evals in quality.SUITE_CONFIGS.values():
        for path in evals:
            test = load_config(path, EvalConfig).cache
            assert quality.split_yaml(test, "test") == test and quality.split_yaml(test, "val").endswith("_val.yaml")
    with pytest.raises(ValueError, match="a test split's encode YAML"):
        quality.split_yaml("configs/demo/encode_co2_train.yaml", "val")
    with pytest.raises(FileNotFoundError, match="no val split beside"):
        quality.split_yaml("configs/paper/encode_etth1_test.yaml", "val")

    scored = []
    monkeypatch.setattr(quality, "cache_uri", lambda yaml, overrides=None: yaml)
    monkeypatch.setattr("pipelines.evaluate.run_eval", lambda config: scored.append(config.cache))
    quality.evaluate("configs/demo/eval_co2.yaml", quality.Path("runs/x/phase2/model"), "sqlite:///unused.db",
                     split="val")
    assert scored == ["configs/demo/encode_co2_val.yaml"]


def test_the_caches_written_for_a_gpu_machine_are_the_demo_suites_train_and_test_ones(tmp_path, monkeypatch):
    """Not the val splits: a lent machine scores the test split, and its carry is capped
    (benchmarks/gpu_rehearsal.sh)."""
    import benchmarks.quality as quality
    import preprocessing.cache.copy

    copied = []
    monkeypatch.setattr(quality, "cache_uri", lambda yaml, overrides=None: yaml)
    monkeypatch.setattr(preprocessing.cache.copy, "copy_entry", lambda uri, root, progress: copied.append(uri) or
                        type("Copied", (), {"uri": str(quality.ROOT / "runs" / "copies" / quality.Path(uri).stem)}))
    quality.write_caches(tmp_path / "caches.json")
    assert sorted(copied) == sorted(f"configs/demo/encode_{task}_{split}.yaml" for task in ("digits", "speech", "co2")
                                    for split in ("train", "test"))
    assert len(json.loads((tmp_path / "caches.json").read_text())) == 6
