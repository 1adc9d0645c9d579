"""`make demo`'s MLflow server, recorded with those of `modrwkv services up` in one services.json."""

import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import pipelines.demo as demo
from infra.cli import load_services, services_lock, write_services
from infra.mlflow_server import MlflowServer
from infra.process import spawn


def test_the_demo_waits_for_services_up_and_uses_its_mlflow(tmp_path, monkeypatch):
    """A demo started while `up` is starting the services waits for it, then uses its MLflow server; it used to
    start a second one and write a record without `up`'s services, which `down` then could not stop."""
    spawned = []

    def sleeper(state_dir, **kwargs) -> MlflowServer:  # stands in for an MLflow server
        spawned.append(MlflowServer(**spawn("mlflow", [sys.executable, "-c", "import time; time.sleep(120)"],
                                            state_dir), port=1))
        return spawned[-1]

    monkeypatch.setattr(demo, "SERVICES", tmp_path)
    monkeypatch.setattr(demo, "start_mlflow", sleeper)
    found = []
    try:
        with services_lock(tmp_path):  # `up`, part way
            waiting = threading.Thread(target=lambda: found.append(demo.mlflow_server()))
            waiting.start()
            waiting.join(timeout=0.5)  # unlocked, the demo finds no record and starts its own in milliseconds
            write_services(tmp_path, {"mlflow": sleeper(tmp_path)})
        waiting.join(timeout=30)
        assert len(spawned) == 1
        assert [s.pid for s in found] == [spawned[0].pid] == [s.pid for s in load_services(tmp_path).values()]
    finally:
        for service in spawned:
            service.stop()


def test_the_demo_trains_on_the_assets_it_built_under_out(tmp_path, monkeypatch, capsys):
    """`modrwkv demo --out DIR` builds the data, encoders and backbone in DIR; the encodes, the training and the
    evaluations read them from there. They read configs/demo's runs/demo paths whatever --out said: missing there,
    or another run's assets, silently."""
    out = tmp_path / "elsewhere"
    seen = {"encode": [], "eval": []}

    class Ran:  # what the jobs return, as far as the demo reads it
        def __init__(self, **fields):
            self.__dict__.update({"reused": True, "seconds": 0.0, "baselines": {}, "metrics": {}, "run_id": "r",
                                  "model_id": "m", **fields})

    def encode(config):
        seen["encode"].append(config)
        return Ran(uri=str(tmp_path / "cache" / f"{Path(config.dataset.path).name}-{config.dataset.split}"))

    def train(config, phase):
        seen["train"] = config
        return Ran()

    scores = {"vqa": ({"accuracy": 0.8, "vqa_accuracy": 0.7}, {"accuracy": 0.1, "vqa_accuracy": 0.1}),
              "asr": ({"wer_en": 0.0, "cer_zh": 0.05}, {"wer_en": 1.0, "cer_zh": 1.0}),
              "forecast": ({"mse": 0.3, "mase": 0.29, "mae": 0.4}, {"mse": 3.4, "mase": 1.0, "mae": 1.5})}

    def evaluate(config):
        seen["eval"].append(config)
        metrics, baselines = scores[config.task]
        return Ran(metrics=metrics, baselines=baselines)

    monkeypatch.setattr(demo, "mlflow_server", lambda: SimpleNamespace(tracking_uri="sqlite:///unused.db"))
    monkeypatch.setattr(demo, "prepare_assets", lambda where: None)
    monkeypatch.setattr(demo.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(demo.ray, "shutdown", lambda: None)
    monkeypatch.setattr(demo, "run_encode", encode)
    monkeypatch.setattr(demo, "run_train", train)
    monkeypatch.setattr(demo, "run_eval", evaluate)
    monkeypatch.setattr(demo, "ceilings", lambda caches: {"accuracy": 0.83, "mse": 0.26})
    monkeypatch.setattr(demo, "registered_version", lambda uri, model_id: "models:/modrwkv-demo/1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unused")  # the demo sets it; monkeypatch puts it back
    out.mkdir()
    summary = demo.run_demo(out)

    assert len(seen["encode"]) == 6  # not the val splits, which only benchmarks/experiments.py scores
    assert not any("val" in (Path(c.dataset.path).stem, c.dataset.split) for c in seen["encode"])
    for config in seen["encode"]:
        assert Path(config.dataset.path).is_relative_to(out) and Path(config.encoder.model_dir).is_relative_to(out)
    assert Path(seen["train"].model.backbone.path) == out / "backbone"
    encoded = {str(tmp_path / "cache" / f"{Path(c.dataset.path).name}-{c.dataset.split}") for c in seen["encode"]}
    assert len(seen["train"].caches) == 3 and set(seen["train"].caches) <= encoded  # the training splits'
    assert not any("test" in Path(c).name for c in seen["train"].caches)
    assert len(seen["eval"]) == 3 and all(c.cache in encoded and "test" in Path(c.cache).name for c in seen["eval"])
    # each task's table rows: its score beside its ceiling (where one exists) and its baseline
    assert [tuple(row[1:]) for row in summary["table"]] == [
        ("accuracy", 0.8, 0.83, 0.1), ("wer_en", 0.0, None, 1.0), ("cer_zh", 0.05, None, 1.0),
        ("mse", 0.3, 0.26, 3.4), ("mase", 0.29, None, 1.0)]
    printed = capsys.readouterr().out
    assert "accuracy      0.8000    0.8300    0.1000  linear probe on the features; the majority answer" in printed


def test_the_registered_version_is_the_one_holding_the_model_or_a_clear_error(monkeypatch):
    import mlflow

    versions = []

    class Client:
        def __init__(self, uri):
            pass

        def search_model_versions(self, query):
            return versions

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    with pytest.raises(RuntimeError, match="0 versions of modrwkv-demo hold the logged model m-1"):
        demo.registered_version("http://127.0.0.1:5000", "m-1")  # "not enough values to unpack" before
    versions += [SimpleNamespace(name="other", version="4"), SimpleNamespace(name=demo.REGISTERED_NAME, version="2")]
    assert demo.registered_version("http://127.0.0.1:5000", "m-1") == "models:/modrwkv-demo/2"


def test_a_data_build_cut_short_is_finished_on_the_next_start(tmp_path, monkeypatch):
    """The digits alone stood for the whole data: a build stopped in the speech (Ctrl-C) or a digits folder made by
    hand left the speech and series missing for good, and training failed on a CSV that was never written."""
    built = []
    for name in demo.BUILDERS:
        monkeypatch.setitem(demo.BUILDERS, name, lambda out, name=name: built.append(name))
    monkeypatch.setattr(demo, "ENCODERS", ())
    monkeypatch.setattr(demo, "pretrained_backbone", lambda *args, **kwargs: None)
    data = tmp_path / "data"
    (data / "digits").mkdir(parents=True)
    for split, n in (("train", 256), ("val", 100), ("test", 100)):  # `DIGITS_SIZES`: a build of today's
        (data / "digits" / f"{split}.json").write_text(json.dumps([{}] * n))
    (data / "series").mkdir()
    (data / "series" / "co2.csv").write_text("week,co2\n")  # one of the three series files
    demo.prepare_assets(tmp_path)
    assert built == ["speech", "series"]
    (data / "digits" / "val.json").unlink()  # digits built before the val split
    built.clear()
    demo.prepare_assets(tmp_path)
    assert built == ["digits", "speech", "series"]
    (data / "digits" / "val.json").write_text(json.dumps([{}] * 100))
    (data / "digits" / "test.json").write_text(json.dumps([{}] * 24))  # a smaller build than today's sizes
    built.clear()
    demo.prepare_assets(tmp_path)
    assert built == ["digits", "speech", "series"]


def test_the_demo_trains_a_phases_own_caches_as_encoded_too():
    """A train config whose phase names caches of its own: those YAMLs, too, become the entries just encoded."""
    from pipelines.config import from_dict
    from pipelines.train_config import TrainConfig

    phase = {"lr": 1e-3, "steps": 1, "global_batch": 16}
    train = from_dict(TrainConfig, {"name": "x", "caches": ["configs/demo/a.yaml"], "model": {"backbone": {"path": "b"}},
                                    "phase1": phase,
                                    "phase2": {**phase, "caches": ["configs/demo/a.yaml", "configs/demo/b.yaml"]}})
    caches = {"a": "/cache/a-entry", "b": "/cache/b-entry"}
    reading = train.with_caches(lambda c: caches[Path(c).stem])  # as run_demo calls it
    assert reading.caches == ["/cache/a-entry"] and reading.phase1.caches is None
    assert reading.phase_caches(reading.phase2) == ["/cache/a-entry", "/cache/b-entry"]


def test_an_encoder_export_cut_short_is_made_again_and_the_demo_refuses_another_folder(tmp_path, monkeypatch):
    """An export writes its config.json first: one cut short (Ctrl-C) was taken for done by every later start, whose
    encode then failed. Run from outside the repository, the demo made minutes of data and a backbone there before
    it failed on configs/demo; it now stops first."""
    import pytest

    monkeypatch.setattr(demo, "missing_datasets", lambda out: [])
    monkeypatch.setattr(demo, "pretrained_backbone", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "ENCODERS", ("fracast",))

    def cut_short(name, folder):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "export_encoder", cut_short)
    with pytest.raises(KeyboardInterrupt):
        demo.prepare_assets(tmp_path)
    assert not (tmp_path / "encoders" / "fracast").exists()
    exported = []
    monkeypatch.setattr(demo, "export_encoder", lambda name, folder: exported.append(name) or folder.mkdir())
    demo.prepare_assets(tmp_path)
    assert exported == ["fracast"] and (tmp_path / "encoders" / "fracast").is_dir()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "mlflow_server", lambda: pytest.fail("started before the configs were found"))
    with pytest.raises(ValueError, match="no configs/demo here .*: run the demo from the repository's root folder"):
        demo.run_demo(tmp_path / "out")


def test_the_demo_backbone_is_made_again_when_its_recipe_changed(tmp_path, monkeypatch):
    """A backbone folder was reused whatever made it: after TINY, the steps or the code that trains it changed, the
    demo ran on the old one."""
    from pipelines import demo_backbone
    from pipelines.demo_backbone import pretrained_backbone, recipe

    folder = tmp_path / "backbone"
    pretrained_backbone(folder, steps=1, say=lambda _: None)
    made = (folder / "model.safetensors").stat().st_mtime_ns
    assert json.loads((folder / "recipe.json").read_text()) == recipe(1)
    pretrained_backbone(folder, steps=1, say=lambda _: None)
    assert (folder / "model.safetensors").stat().st_mtime_ns == made  # the same recipe: reused
    pretrained_backbone(folder, steps=2, say=lambda _: None)
    assert json.loads((folder / "recipe.json").read_text()) == recipe(2)
    assert (folder / "model.safetensors").stat().st_mtime_ns != made
    made = (folder / "model.safetensors").stat().st_mtime_ns
    # the code that makes it changed (here, a module of its recipe read as another): made again
    monkeypatch.setattr(demo_backbone, "RECIPE_MODULES", ("pipelines.text_pretrain",))
    pretrained_backbone(folder, steps=2, say=lambda _: None)
    assert (folder / "model.safetensors").stat().st_mtime_ns != made
    monkeypatch.undo()
    # the chat template, the tokenizer and the optimizer step are its recipe too (a change to the template's turns
    # once left a backbone trained on the old layout in use)
    before = recipe(2)
    for module in ("modrwkv.conversation", "modrwkv.tokenizer", "pipelines.trainer"):
        with monkeypatch.context() as patched:
            patched.setattr(sys.modules[module], "__file__", demo_backbone.__file__)
            assert recipe(2) != before, module
