"""benchmarks/quality.py's table cells (experiments.py prints the same)."""

import json

from benchmarks.quality import fmt, grouped_accuracy


def test_a_cell_shows_mean_and_std_over_seeds_and_no_spread_for_one_seed():
    assert fmt([0.78, 0.77, 0.77]) == "0.773 ± 0.006"  # the sample std (ddof 1); before 2026-12-06 ddof 0
    assert fmt([0.78]) == "0.780 (one seed)"  # not "0.780 ± 0.000": one seed measures no spread
    assert fmt([]) == fmt(None) == "—" and fmt(0.245) == "0.245"


def test_grouped_accuracy_leaves_out_the_samples_evaluation_skipped(tmp_path):
    rows = [{"key": "colour-1", "prediction": "red", "reference": "red"},
            {"key": "colour-2", "prediction": "blue", "reference": "red"},
            {"key": "count-1", "prediction": "3", "reference": "3"},
            {"key": "count-2", "language": None, "skipped": "an item too short for the projector"}]
    predictions = tmp_path / "predictions_vqa.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert grouped_accuracy(predictions, lambda key: key.split("-")[0]) == {"colour": 0.5, "count": 1.0}


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
