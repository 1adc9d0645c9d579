"""`modrwkv eval`: a full run (Ray Data inference, MLflow server) whose metrics and per-sample table are then
found through MLflow's REST API, and a run in this process with neither Ray nor MLflow. Each task's scoring is
tested in test_eval_tasks.py."""

import json
import os
import sys
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from modrwkv import RWKV7Config
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.wavenet import WaveNetConfig
from pipelines.config import from_dict
from pipelines.encode import EncodeConfig, run_encode
from pipelines.environment import cpu_description, package_version
from pipelines.evaluate import EvalConfig, run_eval
from pipelines.metrics.choice import extract_choice
from preprocessing.cache.entry import FeatureCache
from tests.conftest import random_backbone
from tests.tiny_models import tiny_digits_cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    image_cache = tiny_digits_cache(root, "test", 6, shard_size=3)
    (root / "s.csv").write_text("v\n" + "\n".join(f"{np.sin(i / 2) + 0.01 * i:.4f}" for i in range(80)) + "\n")
    series_cache = run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "series", "path": str(root / "s.csv"), "lookback": 16, "horizon": 4, "stride": 4,
                    "split": "test", "fractions": [0.5, 0.0, 0.5]},
        "encoder": {"kind": "raw"}, "cache": {"root": str(root / "cache")}})).uri
    backbone = RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16)
    config = ModRWKVConfig(backbone, {"image": ProjectorConfig(32, 32, 3, 2, 2), "series": ProjectorConfig(8, 32, 0, 0, 2)},
                           forecast_horizon=4, series_encoder=WaveNetConfig(hidden=8, layers=2))
    ModRWKV(config, random_backbone(backbone)).save_pretrained(root / "model")
    return root, image_cache, series_cache


def get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url).read())


def eval_config(root, cache: str, task: str, **settings) -> EvalConfig:
    return from_dict(EvalConfig, {"checkpoint": str(root / "model"), "task": task, "cache": cache,
                                  "out_dir": str(root / settings.pop("out", "out")), **settings})


def cache_order(uri: str) -> list[str]:
    """The cache's sample keys, shard after shard: the order predictions are written in."""
    cache = FeatureCache(uri)
    return [s.key for i in range(len(cache.shards)) for s in cache.read_shard(i)]


def read_predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_in_this_process_needs_neither_ray_nor_mlflow(trained, monkeypatch):
    root, image_cache, series_cache = trained
    for name in ("ray", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # importing either now fails
    vqa = run_eval(eval_config(root, image_cache, "vqa", out="here", max_new_tokens=3, actors=0, track=False))
    assert vqa.run_id is None
    predictions = read_predictions(vqa.predictions)
    assert [p["key"] for p in predictions] == cache_order(image_cache)
    assert sorted(p["key"] for p in predictions) == [f"digit-{i:04d}" for i in range(1791, 1797)]
    expected = np.mean([p["prediction"].strip(".").lower() == p["reference"] for p in predictions])
    assert vqa.metrics["accuracy"] == pytest.approx(expected)
    assert vqa.coverage == {"rows_predicted": 6, "rejected_at_encode": 0,
                            "rows_truncated": sum(not p["stopped"] for p in predictions)}
    assert (root / "here" / "confusion_matrix.png").is_file()
    forecast = run_eval(eval_config(root, series_cache, "forecast", out="here", season=4, actors=0, track=False))
    # the cache's windows carry their series' training scale: the benchmark tables' standardized errors too
    assert {"mse", "mae", "mse_normalized", "mae_normalized", "mse_standardized", "mae_standardized",
            "mase"} == set(forecast.metrics)
    # windows are forecast 16 at a time by default: as one at a time, to float32 rounding
    one_by_one = run_eval(eval_config(root, series_cache, "forecast", out="single", season=4, actors=0, track=False,
                                      batch_size=1))
    batched, single = read_predictions(forecast.predictions), read_predictions(one_by_one.predictions)
    assert [r["key"] for r in batched] == [r["key"] for r in single] == cache_order(series_cache)
    np.testing.assert_allclose([r["prediction"] for r in batched], [r["prediction"] for r in single], atol=1e-5)
    assert forecast.metrics == pytest.approx(one_by_one.metrics, rel=1e-4)
    # the lookback (720 values a window at the paper's length) stays in the cache: the file holds the forecast
    assert set(batched[0]) == {"key", "language", "prediction", "reference", "mean", "std", "train_std"}


def test_multiple_choice_records_are_scored_by_the_option_each_reply_names(trained):
    """The digits as multiple-choice questions (each record's `options`, its answer a letter), from the records
    through the cache to the scores: `choice_accuracy` is the share of predictions naming the right option, by
    letter or text, recomputed here from the predictions file; replies naming none are counted."""
    root, _, _ = trained
    records = json.loads((root / "digits" / "test.json").read_text())
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for n, record in enumerate(records):
        right = record["conversations"][1]["value"]
        options = [w for w in words if w != right][n % 7: n % 7 + 3]
        options.insert(n % 4, right)
        record["options"] = options
        listed = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
        record["conversations"] = [{"from": "human", "value": f"<image>\nWhat digit is this?\n{listed}"},
                                   {"from": "gpt", "value": "ABCD"[n % 4]}]
    (root / "digits" / "choice.json").write_text(json.dumps(records))
    cache = run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "llava", "path": str(root / "digits" / "choice.json")},
        "encoder": {"kind": "clip", "model_dir": str(root / "clip")}, "cache": {"root": str(root / "cache")}})).uri
    result = run_eval(eval_config(root, cache, "vqa", out="choice", max_new_tokens=3, actors=0, track=False))
    rows = read_predictions(result.predictions)
    assert len(rows) == 6 and all(len(r["options"]) == 4 for r in rows)
    named = [extract_choice(r["prediction"], r["options"]) for r in rows]
    assert result.metrics["choice_accuracy"] == pytest.approx(np.mean([n == r["reference"] for n, r in
                                                                       zip(named, rows)]))
    assert result.metrics["choice_unparsed"] == named.count(None)
    assert result.baselines["choice_accuracy"] == pytest.approx(max(map([r["reference"] for r in rows].count,
                                                                        "ABCD")) / 6)


def test_the_test_samples_the_encode_rejected_are_counted_beside_the_scores(trained, capsys):
    """A series whose first 40 steps are flat: the windows with a flat lookback before a moving target are rejected
    at encode, so the scores cover fewer windows than the test split holds, which the evaluation says."""
    root, _, _ = trained
    values = [0.0] * 40 + [np.sin(i / 2) for i in range(40)]
    (root / "flat.csv").write_text("v\n" + "\n".join(f"{v:.4f}" for v in values) + "\n")
    cache = run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "series", "path": str(root / "flat.csv"), "lookback": 16, "horizon": 4, "stride": 4,
                    "split": "test", "fractions": [0.0, 0.0, 1.0]},
        "encoder": {"kind": "raw"}, "cache": {"root": str(root / "cache")}})).uri
    counts = FeatureCache(cache).manifest["counts"]
    assert counts["rejected"] > 0
    forecast = run_eval(eval_config(root, cache, "forecast", out="flat", season=4, actors=0, track=False))
    assert forecast.coverage == {"rows_predicted": counts["written"], "rejected_at_encode": counts["rejected"],
                                 "rows_truncated": 0}
    assert (f"the encode rejected {counts['rejected']} of the {counts['read']} test samples it read "
            f"(see {cache}/rejects.jsonl): {counts['written']} were predicted") in capsys.readouterr().out


def test_a_model_or_season_that_cannot_take_the_task_is_refused_before_any_prediction(trained, tmp_path):
    root, image_cache, series_cache = trained
    image_only = ModRWKVConfig(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16),
                               {"image": ProjectorConfig(32, 32, 3, 2, 2)})
    ModRWKV(image_only, random_backbone(image_only.backbone)).save_pretrained(tmp_path / "image-only")
    config = eval_config(root, series_cache, "forecast", season=4, actors=0, track=False)
    with pytest.raises(ValueError, match="the model has no series projector \\(it has image\\); it cannot be"):
        run_eval(replace(config, checkpoint=str(tmp_path / "image-only")))
    with pytest.raises(ValueError, match="season 16: the seasonal-naive period must be 1 or more and shorter than "
                                         "the lookback \\(16 steps"):
        run_eval(replace(config, season=16))
    with pytest.raises(ValueError, match="season 0: "):
        run_eval(replace(config, season=0))
    three = ModRWKVConfig(image_only.backbone, {"series": ProjectorConfig(8, 32, 0, 0, 2)}, forecast_horizon=3,
                          series_encoder=WaveNetConfig(hidden=8, layers=2))
    ModRWKV(three, random_backbone(three.backbone)).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="the model forecasts 3 steps, .*'s windows hold a horizon of 4"):
        run_eval(replace(config, checkpoint=str(tmp_path / "three")))
    longer = replace(three, forecast_horizon=4, forecast_lookback=32)
    ModRWKV(longer, random_backbone(longer.backbone)).save_pretrained(tmp_path / "longer")
    with pytest.raises(ValueError, match="forecast skip reads a lookback of 32 steps, .*'s windows hold 16"):
        run_eval(replace(config, checkpoint=str(tmp_path / "longer")))


def test_an_eval_job_on_a_cluster_refuses_a_tracking_store_in_a_file_before_it_predicts(trained, tmp_path,
                                                                                         monkeypatch):
    """Submitted to a cluster, the job runs in a temporary copy of its working directory: its run and scores went
    into the default SQLite file there, lost with it, where training refuses such a store."""
    root, image_cache, _ = trained
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` gives the entrypoint
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no services recorded here: the default store is a file
    config = eval_config(root, image_cache, "vqa", actors=0, out="on-a-cluster")
    with pytest.raises(ValueError, match="is a store in a file on this machine, which the workers of the Ray cluster "
                                         "at 10.0.0.1:6379 cannot reach"):
        run_eval(config)
    assert not (root / "on-a-cluster").exists()  # nothing predicted


def test_eval_counts_the_samples_it_skips_and_names_them_with_their_reason(trained, capsys):
    """A cache with an image of 2 feature vectors, fewer than the projector's compression kernel 3: not a failed run;
    that one is counted (`rows_skipped`), named with its reason in the predictions and scored as unanswered (wrong):
    the accuracy is over all three, and its line says so."""
    from modrwkv.conversation import Sample, Turn
    from pipelines.metrics.vqa import normalize_answer
    from tests.cache_entries import write_entry

    root, _, _ = trained
    turns = [Turn("user", "<image>\nWhat digit is this?"), Turn("assistant", "seven")]
    samples = [Sample(key, "image", turns, items=[np.ones((n, 32), np.float16)]) for key, n in zip("abc", (17, 2, 17))]
    write_entry(str(root / "short" / "entry"), [samples])
    vqa = run_eval(eval_config(root, str(root / "short" / "entry"), "vqa", out="short", max_new_tokens=3, actors=0,
                               track=False))
    assert vqa.metrics["rows_skipped"] == 1 and vqa.coverage["rows_predicted"] == 2
    predictions = read_predictions(vqa.predictions)
    assert [p["key"] for p in predictions] == ["a", "b", "c"] and "prediction" in predictions[0]
    assert predictions[1] == {"key": "b", "language": None, "skipped": "sample b: its image item 0 has 2 feature "
                                                                     "vectors, none left after the projector's "
                                                                     "compression (kernel 3)",
                              "prediction": "", "stopped": True, "reference": "seven"}
    right = sum(normalize_answer(p["prediction"]) == "7" for p in predictions)
    assert vqa.metrics["accuracy"] == pytest.approx(right / 3)  # b counted, as wrong
    assert "eval vqa on 3 samples: accuracy" in capsys.readouterr().out


def test_an_eval_run_whose_logging_fails_ends_failed_not_running(trained, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    root, image_cache, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def unreachable(*args, **kwargs):  # the artifact store behind the server is down, after the run was created
        raise ConnectionError("artifact store unreachable")

    monkeypatch.setattr(MlflowClient, "log_artifact", unreachable)
    with pytest.raises(ConnectionError):
        run_eval(eval_config(root, image_cache, "vqa", out="failing", max_new_tokens=3, actors=0, tracking_uri=uri))
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "eval-vqa" and run.info.status == "FAILED" and run.info.end_time is not None
    # the scores were printed before MLflow was reached: every prediction's work is kept
    assert "eval vqa on 6 samples: accuracy " in capsys.readouterr().out


def test_a_model_trained_against_another_tracking_server_is_evaluated_into_a_run_of_its_own(trained, tmp_path):
    """The folder records the run that trained it; on another server (the cluster's, or quality.py's SQLite store)
    that run is not found, and the eval failed after every prediction, in the logged-model lookup."""
    import shutil

    from mlflow import MlflowClient

    root, image_cache, _ = trained
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    elsewhere = "f" * 32
    (folder / "backbone_source.json").write_text(json.dumps({"path": str(folder), "run_id": elsewhere, "phase": 2}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = replace(eval_config(root, image_cache, "vqa", out="other-server", max_new_tokens=3, actors=0,
                                 tracking_uri=uri, experiment="here"), checkpoint=str(folder))
    with pytest.warns(UserWarning, match=f"run {elsewhere} is not on sqlite:///"):
        result = run_eval(config)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags
    assert client.get_experiment(run.info.experiment_id).name == "here"
    assert run.data.metrics["accuracy"] == result.metrics["accuracy"]
    # another model evaluated into the same out_dir: the first run's predictions, which its tag names, are kept
    other = run_eval(replace(config, checkpoint=str(root / "model"), track=False))
    assert other.predictions.parent == result.predictions.parent and other.predictions != result.predictions
    assert run.data.tags["predictions"].startswith(str(result.predictions)) and result.predictions.is_file()
    assert run_eval(replace(config, track=False)).predictions == result.predictions  # the same eval: its own file
    weights = next(folder.glob("*.safetensors"))  # the folder trained again: another model, another file
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert run_eval(replace(config, track=False)).predictions != result.predictions
    with pytest.raises(Exception, match="not found"):  # a parent asked for by id must exist
        run_eval(replace(config, parent_run_id=elsewhere))


@pytest.mark.slow
def test_eval_logs_metrics_and_a_table_to_the_mlflow_server(trained, ray_local, mlflow_server):
    root, image_cache, series_cache = trained
    uri = mlflow_server.tracking_uri
    vqa = run_eval(eval_config(root, image_cache, "vqa", max_new_tokens=3, tracking_uri=uri, experiment="eval-test",
                               actors=2))
    predictions = read_predictions(vqa.predictions)
    here = run_eval(eval_config(root, image_cache, "vqa", out="here", max_new_tokens=3, actors=0, track=False))
    # Ray Data's actors predict what this process does, in the cache's order whichever actor finishes first
    assert read_predictions(here.predictions) == predictions
    assert [p["key"] for p in predictions] == cache_order(image_cache)
    assert sorted(p["key"] for p in predictions) == [f"digit-{i:04d}" for i in range(1791, 1797)]
    expected = np.mean([p["prediction"].strip(".").lower() == p["reference"] for p in predictions])
    assert vqa.metrics["accuracy"] == pytest.approx(expected)

    run = get(f"{uri}/api/2.0/mlflow/runs/get?run_id={vqa.run_id}")["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["accuracy"] == pytest.approx(vqa.metrics["accuracy"])
    assert metrics["baseline_accuracy"] == pytest.approx(vqa.baselines["accuracy"])
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["env.numpy"] == np.__version__ and tags["env.cpu"] == cpu_description()  # what scored, where
    # and where the actors predicted: here, two on this machine's CPU
    assert (tags["env.predictors.device"], tags["env.predictors.cpu"]) == ("cpu", cpu_description())
    assert tags["env.predictors.torch"] == package_version("torch") and "env.predictors.gpu" not in tags
    files = {f["path"] for f in get(f"{uri}/api/2.0/mlflow/artifacts/list?run_id={vqa.run_id}")["files"]}
    assert {"eval_vqa.json", vqa.predictions.name, "confusion_matrix.png"} <= files
    assert tags["predictions"] == f"{vqa.predictions} (and an artifact of this run)"  # out_dir is local here
    artifact_uri = run["info"]["artifact_uri"]  # mlflow-artifacts:/<experiment>/<run>/artifacts
    path = artifact_uri.split("mlflow-artifacts:/", 1)[1]
    table = get(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{path}/eval_vqa.json")
    assert table["columns"][:4] == ["key", "reference", "prediction", "stopped"] and len(table["data"]) == 6
    params = {p["key"]: p["value"] for p in run["data"]["params"]}  # what decided the scores
    assert (params["task"], params["quantize"], params["max_new_tokens"], params["batch_size"]) == ("vqa", "none", "3",
                                                                                                    "16")
    # a quantized model's scores never pass for the model's own
    int8 = run_eval(eval_config(root, image_cache, "vqa", out="int8", max_new_tokens=3, actors=0, quantize="int8",
                                tracking_uri=uri, experiment="eval-test"))
    run = get(f"{uri}/api/2.0/mlflow/runs/get?run_id={int8.run_id}")["run"]
    logged = {m["key"] for m in run["data"]["metrics"]}
    assert "accuracy_int8" in logged and "accuracy" not in logged and "baseline_accuracy" in logged

    forecast = run_eval(from_dict(EvalConfig, {"checkpoint": str(root / "model"), "task": "forecast", "cache": series_cache,
                                               "out_dir": str(root / "out"), "season": 4, "tracking_uri": uri,
                                               "experiment": "eval-test", "table_rows": 3,
                                               "predictions_artifact_mb": 0.001}))
    # the cache's windows carry their series' training scale: the benchmark tables' standardized errors too
    assert {"mse", "mae", "mse_normalized", "mae_normalized", "mse_standardized", "mae_standardized",
            "mase"} == set(forecast.metrics) == set(forecast.baselines)
    files = {f["path"] for f in get(f"{uri}/api/2.0/mlflow/artifacts/list?run_id={forecast.run_id}")["files"]}
    assert "forecast_vs_truth.png" in files and forecast.predictions.name not in files  # over 1 kB: named only
    # a test set of millions of windows: the table holds `table_rows` of them, and says so; the file holds all
    run = get(f"{uri}/api/2.0/mlflow/runs/get?run_id={forecast.run_id}")["run"]
    path = run["info"]["artifact_uri"].split("mlflow-artifacts:/", 1)[1]
    table = get(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{path}/eval_forecast.json")
    predicted = {r["key"]: r for r in read_predictions(forecast.predictions)}
    keys = [row[table["columns"].index("key")] for row in table["data"]]
    assert len(keys) == 3 and keys == sorted(keys) and set(keys) < set(predicted)
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["table"].startswith(f"3 of the {len(predicted)} predicted rows")
    assert tags["predictions"].startswith(f"{forecast.predictions} (") and "not an artifact" in tags["predictions"]

    with pytest.raises(ValueError, match="a image cache cannot be evaluated as forecast"):
        run_eval(from_dict(EvalConfig, {"checkpoint": str(root / "model"), "task": "forecast", "cache": image_cache}))
