"""Trained models in MLflow: each phase's final model a logged model of its run (datasets, step, encoders), the
registry, evaluation scores on the model they scored, `models:/...` wherever a model folder is taken, and the
served model answering over HTTP as `modrwkv chat` does."""

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
from mlflow import MlflowClient
from PIL import Image

from modrwkv import RWKV7Config
from modrwkv.model_folder import read_encoders_record
from modrwkv.multimodal import ModRWKV
from pipelines.cli import main
from pipelines.config import ConfigError, from_dict
from pipelines.encode import EncodeConfig, run_encode
from pipelines.eval_tasks import TASKS
from pipelines.evaluate import EvalConfig, Predictor, run_eval
from pipelines.lmms_eval_model import ModRWKVEvalModel
from pipelines.logged_models import local_model, logged_model_name, model_id_of, register
from preprocessing import local_copy
from preprocessing.cache.key import hash_model_dir
from pipelines.train_config import TrainConfig
from pipelines.train_local import run_single_process
from tests.conftest import random_backbone
from tests.tiny_models import save_tiny_whisper, tiny_digits_cache

ROOT = Path(__file__).resolve().parents[2]


def wav_bytes(seconds: float, hz: float = 440.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def caches(root: Path) -> dict[str, str]:
    """Tiny digits (tiny CLIP), tones (tiny Whisper) and a sine series (raw, for a WaveNet), each a train cache."""
    found = {"image": tiny_digits_cache(root, "train", 16, shard_size=8)}
    audio = root / "audio"
    audio.mkdir()
    for i in range(6):
        (audio / f"tone{i}.wav").write_bytes(wav_bytes(0.4, 200 + 100 * i))
    (audio / "asr.jsonl").write_text("".join(json.dumps({"audio": f"tone{i}.wav", "text": f"tone {i}"}) + "\n"
                                             for i in range(6)))
    found["audio"] = run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "asr_jsonl", "path": str(audio / "asr.jsonl")},
        "encoder": {"kind": "whisper", "model_dir": str(save_tiny_whisper(root / "whisper"))},
        "cache": {"root": str(root / "cache")}})).uri
    (root / "s.csv").write_text("v\n" + "\n".join(f"{np.sin(i / 3) + 0.01 * i:.4f}" for i in range(120)) + "\n")
    found["series"] = run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "series", "path": str(root / "s.csv"), "lookback": 16, "horizon": 4, "stride": 4,
                    "split": "train", "fractions": [1.0, 0.0, 0.0]},
        "encoder": {"kind": "raw"}, "cache": {"root": str(root / "cache")}})).uri
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Phase I (its step-2 checkpoint kept as a logged model too) then II in one process, tracked in a SQLite
    store, phase II registered as "tiny"."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root}/mlflow.db"
    used = caches(root)
    backbone = RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16)
    random_backbone(backbone).save_pretrained(root / "backbone")
    config = from_dict(TrainConfig, {
        "name": "tiny", "caches": list(used.values()), "output_dir": str(root / "runs"), "max_length": 96,
        "packing": False,
        "model": {"backbone": {"path": str(root / "backbone")}, "wavenet": {"hidden": 8, "layers": 2},
                  "projectors": {"image": {"kernel": 3, "stride": 2}, "audio": {"kernel": 3, "stride": 2},
                                 "series": {"kernel": 0, "stride": 0}}},
        "phase1": {"lr": 3e-3, "steps": 3, "global_batch": 4, "micro_batch": 4, "checkpoint_every": 2},
        "phase2": {"lr": 1e-3, "steps": 2, "global_batch": 4, "micro_batch": 4},
        "scaling": {"workers": 1},
        "tracking": {"tracking_uri": uri, "experiment": "logged", "register_as": "tiny", "log_checkpoints": True}})
    folders = [run_single_process(config, phase, device="cpu")[0] for phase in (1, 2)]
    return root, uri, used, folders


def logged_models(client: MlflowClient, folder: Path):
    run_id = json.loads((folder / "backbone_source.json").read_text())["run_id"]
    experiment = client.get_run(run_id).info.experiment_id
    return run_id, client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")


def test_each_phase_is_a_logged_model_with_its_datasets_and_phase_two_is_registered(trained, monkeypatch):
    root, uri, used, (phase1, phase2) = trained
    client = MlflowClient(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(local_copy.ROOT_ENV, str(root / "node-copies"))  # where models:/... are downloaded
    for phase, folder, steps in ((1, phase1, 3), (2, phase2, 2)):
        run_id, found = logged_models(client, folder)
        # by the step of its training metrics (an evaluation of it, another test's, logs at step 0)
        by_step = {next(iter({m.step for m in model.metrics if m.key.startswith("samples/")})): model
                   for model in found}
        assert sorted(by_step) == ([2, 3] if phase == 1 else [2])  # phase I's checkpoint, then each final model
        model = by_step[steps]
        assert model.tags["modrwkv.phase"] == str(phase) and model.model_type == "modrwkv"
        assert model_id_of(uri, str(folder)) == model.model_id
        # the caches it trained on are its datasets, through a metric each
        samples = {m.dataset_name: m.value for m in model.metrics if m.key == f"samples/{m.dataset_name}"}
        assert samples == {u.rsplit("/", 1)[-1]: written(u) for u in used.values()}
        assert {m.step for m in model.metrics if m.key.startswith("samples/")} == {steps}
        outputs = client.get_run(run_id).outputs.model_outputs
        assert sorted((o.step, o.model_id) for o in outputs) == sorted((s, m.model_id) for s, m in by_step.items())
        downloaded = local_model(f"models:/{model.model_id}")
        assert downloaded.model_dir.is_relative_to(root / "node-copies")
        assert sorted(p.name for p in downloaded.model_dir.iterdir()) == sorted(p.name for p in folder.iterdir())
        # phase I's adapter-only folder finds its backbone by path: it carries no encoders; phase II all it needs
        if phase == 1:
            assert downloaded.encoder_dirs == {}
            checkpoint = local_model(f"models:/{by_step[2].model_id}")  # the checkpoint loads: adapter + records
            kept = folder.parent / "checkpoints" / "step-000002"
            assert model_id_of(uri, str(kept)) == by_step[2].model_id
            assert ModRWKV.from_pretrained(checkpoint.model_dir).config == ModRWKV.from_pretrained(kept).config
        else:
            assert sorted(downloaded.encoder_dirs) == ["audio", "image"]
            assert hash_model_dir(downloaded.encoder_dirs["audio"]) == hash_model_dir(root / "whisper")
    # once a node, beside its other copies (`modrwkv cache local` lists and prunes them): the three fetched above
    copies = local_copy.node_folders()
    assert len(copies) == 3 and all(f.source.startswith("models:/m-") for f in copies)
    (version,) = client.search_model_versions("name = 'tiny'")
    assert version.source == f"models:/{model_id_of(uri, str(phase2))}" and int(version.version) == 1
    with pytest.raises(ValueError, match="models:/tiny: a registered model needs its version or alias"):
        model_id_of(uri, "models:/tiny")  # read as a logged model's id: "Logged model with ID 'tiny' not found"


def written(cache_uri: str) -> float:
    return float(json.loads((Path(cache_uri) / "manifest.json").read_text())["counts"]["written"])


PHASE = {"lr": 1e-3, "steps": 1, "global_batch": 8}


def test_register_as_flags_reach_the_configs():
    from pipelines.cli import build_parser
    from pipelines.train_config import train_overrides

    args = build_parser().parse_args(["train", "--config", "x.yaml", "--phase", "2", "--register-as", "mine",
                                      "--set", "phase2.steps=3"])
    assert train_overrides(args) == {"phase2.steps": 3, "tracking.register_as": "mine"}
    args = build_parser().parse_args(["train", "--config", "x.yaml", "--phase", "2"])
    assert train_overrides(args) == {}
    args = build_parser().parse_args(["eval", "--checkpoint", "models:/mine/1", "--register-as", "best"])
    assert (args.checkpoint, args.register_as) == ("models:/mine/1", "best")
    for schema, settings in ((TrainConfig, {"tracking": {"register_as": "a/b"}}),
                             (EvalConfig, {"checkpoint": "m", "task": "vqa", "cache": "c", "register_as": "x@y"})):
        with pytest.raises(ConfigError, match="register_as"):  # refused at load, not after training
            from_dict(schema, {**({"name": "n", "model": {"backbone": {"path": "b"}}, "phase1": PHASE,
                                   "phase2": PHASE} if schema is TrainConfig else {}), **settings})
    assert logged_model_name("modrwkv-vision-1.5b-phase1") == "modrwkv-vision-1-5b-phase1-model"


def digit_png(root: Path) -> Path:
    """A test digit, as the demo's data has it."""
    return sorted((root / "digits" / "images").glob("*.png"))[0]


def chat(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(["chat", *args]) == 0
    return capsys.readouterr().out


def test_eval_scores_the_logged_model_and_models_uris_work_where_folders_do(trained, monkeypatch, capsys):
    root, uri, used, (_, phase2) = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(local_copy.ROOT_ENV, str(root / "this-node"))
    monkeypatch.chdir(root)
    client = MlflowClient(uri)
    test_cache = tiny_digits_cache(root / "test", "test", 4, shard_size=4)
    config = {"task": "vqa", "cache": test_cache, "max_new_tokens": 3, "actors": 0, "tracking_uri": uri}
    scored = run_eval(from_dict(EvalConfig, {**config, "checkpoint": str(phase2), "out_dir": str(root / "e1")}))
    model_id = model_id_of(uri, str(phase2))
    (model,) = client.search_logged_models([client.get_run(scored.run_id).info.experiment_id],
                                           filter_string="metrics.accuracy >= 0", order_by=[
                                               {"field_name": "metrics.accuracy", "ascending": False}])
    assert model.model_id == model_id
    (accuracy,) = [m for m in model.metrics if m.key == "accuracy"]
    assert accuracy.value == scored.metrics["accuracy"] and accuracy.dataset_name == test_cache.rsplit("/", 1)[-1]
    eval_run = client.get_run(scored.run_id)
    assert [m.model_id for m in eval_run.inputs.model_inputs] == [model_id]  # the eval run names what it scored
    (version,) = client.search_model_versions("name = 'tiny'")  # its registered version carries the scores
    assert float(version.tags[f"eval.{accuracy.dataset_name}.accuracy"]) == pytest.approx(accuracy.value)

    # the registered version in place of the folder: eval (registering what it scored under another name), chat
    again = run_eval(from_dict(EvalConfig, {**config, "checkpoint": "models:/tiny/1", "out_dir": str(root / "e2"),
                                            "register_as": "tiny-scored"}))
    (scored_version,) = client.search_model_versions("name = 'tiny-scored'")
    assert scored_version.source == f"models:/{model_id}"
    assert scored_version.tags[f"eval.{accuracy.dataset_name}.accuracy"] == version.tags[
        f"eval.{accuracy.dataset_name}.accuracy"]
    assert again.predictions.read_text() == scored.predictions.read_text()
    # a prediction actor on another node: it downloads the model itself
    monkeypatch.setenv(local_copy.ROOT_ENV, str(root / "another-node"))
    task = TASKS["vqa"].from_config(from_dict(EvalConfig, {**config, "checkpoint": "models:/tiny/1"}))
    actor = Predictor("models:/tiny/1", test_cache, task, tracking_uri=uri)
    (rows,) = actor({"shard": [0]})["rows"]  # the cache's one shard
    assert json.loads(rows) == [json.loads(line) for line in scored.predictions.read_text().splitlines()]  # its order
    assert [f.source for f in local_copy.node_folders()] == [f"models:/{model_id}"]
    monkeypatch.setenv(local_copy.ROOT_ENV, str(root / "this-node"))
    assert client.get_run(again.run_id).data.tags["mlflow.parentRunId"] == eval_run.data.tags["mlflow.parentRunId"]
    question = ["--image", str(digit_png(root)), "--question", "What digit is this?"]
    by_folder = chat(["--model", str(phase2), "--encoder-dir", str(root / "clip"), *question], capsys)
    assert chat(["--model", "models:/tiny/1", *question], capsys) == by_folder  # the encoder it carries
    client.set_registered_model_alias("tiny", "serving", 1)
    assert chat(["--model", "models:/tiny@serving", *question], capsys) == by_folder
    assert main(["export", "--to", "hf", "models:/tiny/1", str(root / "hf")]) == 0  # the export takes one too
    assert json.loads((root / "hf" / "config.json").read_text())["encoders"]["image"]["kind"] == "clip"
    wrapper = ModRWKVEvalModel("models:/tiny/1", device="cpu")  # lmms-eval's: with the image encoder it carries
    assert wrapper.encoder.kind == "clip" and hash_model_dir(wrapper.encoder.model_dir) == hash_model_dir(root / "clip")
    with pytest.raises(Exception, match="tiny"):
        local_model("models:/tiny/7")


def test_latest_names_the_newest_registered_version_as_in_mlflow(trained):
    root, uri, _, (phase1, _) = trained
    _, models = logged_models(MlflowClient(uri), phase1)  # phase I's step-2 checkpoint and its final model
    older, newer = sorted(models, key=lambda m: m.creation_timestamp)
    for model in (older, newer):
        register(uri, model.model_id, "tiny-phase1")  # versions 1 and 2
    assert model_id_of(uri, "models:/tiny-phase1/latest") == newer.model_id
    assert model_id_of(uri, "models:/tiny-phase1/Latest") == newer.model_id  # MLflow reads it in any case
    assert model_id_of(uri, "models:/tiny-phase1/1") == older.model_id


def post(url: str, rows: list[dict]) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps({"dataframe_records": rows}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_the_served_model_answers_each_modality_as_chat_does_and_refuses_bad_requests(trained, tmp_path, monkeypatch,
                                                                                      capsys):
    from infra.model_server import start_model_server

    root, uri, _, (_, phase2) = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    image, clip = digit_png(root), root / "audio" / "tone2.wav"
    series = [float(np.sin(i / 3) + 0.01 * i) for i in range(16)]
    (tmp_path / "series.csv").write_text("\n".join(map(str, series)) + "\n")
    expected = {}
    for modality, path, question in (("image", image, "What digit is this?"), ("audio", clip, "Transcribe.")):
        out = chat(["--model", "models:/tiny/1", f"--{modality}", str(path), "--question", question], capsys)
        expected[modality] = out.split("Assistant: ", 1)[1].strip()
    out = chat(["--model", "models:/tiny/1", "--series", str(tmp_path / "series.csv"), "--question", "Forecast."],
               capsys)
    forecast = [float(v) for v in out.split("Forecast: ", 1)[1].split(", ")]
    # the model records its windows' length: a longer history is cut to its last 16 values, as chat cuts it
    assert read_encoders_record(phase2)["series"]["lookback"] == 16

    with start_model_server("models:/tiny/1", tmp_path / "server", env={"MLFLOW_TRACKING_URI": uri}) as server:
        status, body = post(server.url, [
            {"question": "What digit is this?", "image": b64(image.read_bytes())},
            {"question": "Transcribe.", "audio": b64(clip.read_bytes())},
            {"question": "Forecast.", "series": [9.0] * 30 + series}])
        assert status == 200, body
        answers = body["predictions"]
        assert [answers[0], answers[1]] == [{"answer": expected["image"]}, {"answer": expected["audio"]}]
        assert len(answers[2]["forecast"]) == len(forecast) == 4
        assert answers[2]["forecast"] == pytest.approx(forecast, rel=1e-5)

        huge = io.BytesIO()
        Image.new("1", (9000, 9000)).save(huge, format="PNG")  # 81M pixels in a few kB: over the pixel limit
        for row, reason in (
                ({"question": "What is it?", "image": b64(b"not an image at all")}, "not a readable image"),
                ({"question": "What is it?", "image": b64(huge.getvalue())}, "over the limit"),
                ({"question": "Both?", "image": b64(image.read_bytes()), "series": series}, "exactly one of"),
                ({"question": "Play it.", "video": "AAAA"}, "unknown fields ['video']"),
                ({"question": "", "image": b64(image.read_bytes())}, "no question"),
                ({"question": "Forecast.", "series": [True] * 16}, "series must be a list of numbers"),
                ({"question": "Forecast.", "series": [0.5] * 100_001}, "100001 values, over the limit of 100000")):
            status, body = post(server.url, [row])
            assert status == 400 and reason in body["message"], (row.keys(), status, body)
        status, body = post(server.url, [{"question": "What digit is this?", "image": b64(image.read_bytes())}])
        assert status == 200 and body["predictions"] == [{"answer": expected["image"]}]  # still serving
    assert not server.alive()


def test_the_served_model_takes_each_of_mlflows_request_formats(trained, monkeypatch):
    """MLflow's scoring app (what `mlflow models serve` runs, without its server process) around the logged model:
    the same rows in each of MLflow's request formats get the answers dataframe_records gets (strings arrive as 0-d
    numpy arrays, a series as a 1-d one); a request that is not rows is refused with the formats a request takes."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from pipelines import serving

    root, uri, _, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    served = TestClient(scoring_server.init(mlflow.pyfunc.load_model("models:/tiny/1")))
    image = b64(digit_png(root).read_bytes())
    series = [float(np.sin(i / 3) + 0.01 * i) for i in range(16)]
    for rows in ([{"question": "What digit is this?", "image": image}, {"question": "Which digit?", "image": image}],
                 [{"question": "Forecast.", "series": series}]):
        fields = list(rows[0])
        expected = served.post("/invocations", json={"dataframe_records": rows}).json()
        assert len(expected["predictions"]) == len(rows), expected
        bodies = [{"dataframe_split": {"columns": fields, "data": [[row[f] for f in fields] for row in rows]}},
                  {"inputs": rows}, {"instances": rows}, {"inputs": {f: [row[f] for row in rows] for f in fields}}]
        for body in bodies + ([{"inputs": rows[0]}] if len(rows) == 1 else []):  # a mapping of one row's fields
            response = served.post("/invocations", json=body)
            assert (response.status_code, response.json()) == (200, expected), body
    for body, reason in (({"inputs": "What digit is this?"}, "a request holds dataframe_records, dataframe_split"),
                         ({"inputs": {"question": ["a", "b"], "image": [image]}}, "columns of different lengths")):
        response = served.post("/invocations", json=body)
        assert response.status_code == 400 and reason in response.json()["message"], response.json()

    # a bad last row: refused before any row is answered, and its reply is the reason alone (MLflow's server put the
    # whole request before it: a refused medium of megabytes went back to the client)
    answered = []
    monkeypatch.setattr(serving, "answer", lambda *args: answered.append(args) or {"answer": ""})
    rows = [{"question": "What digit is this?", "image": image}, {"question": "Which?", "image": "A" * 2**20 + "!"}]
    for body in ({"inputs": rows}, {"instances": rows}, {"dataframe_records": rows}):
        response = served.post("/invocations", json=body)
        assert (response.status_code, response.json()["message"]) == (
            400, "row 1: image is not valid base64 (Only base64 data is allowed)"), body.keys()
    # base64 of what is no image: found when decoded, still before any row is answered
    rows[1]["image"] = b64(b"GIF89a, but no more")
    response = served.post("/invocations", json={"inputs": rows})
    assert response.status_code == 400 and response.json()["message"].startswith("row 1: "), response.json()
    assert not answered


def test_the_served_model_loads_its_encoders_at_start_and_tells_its_failures_from_the_requests(trained, monkeypatch):
    """Its encoders are built before the first request (a server answering /ping is ready); a request of too many
    rows is refused before any is answered; a medium whose encoder the logged model lacks is the server's 501, not
    the client's 400; an error of the server's own is a 500."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    import pipelines.serving as serving

    root, uri, _, (phase1, _) = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pyfunc.load_model("models:/tiny/1")
    assert sorted(loaded.unwrap_python_model().media.built) == ["audio", "image"]
    served = TestClient(scoring_server.init(loaded))
    row = {"question": "What digit is this?", "image": b64(digit_png(root).read_bytes())}
    response = served.post("/invocations", json={"dataframe_records": [row] * 65})
    assert response.status_code == 400 and "65 rows, over the limit of 64" in response.json()["message"]

    def fails(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(serving, "answer", fails)
    response = served.post("/invocations", json={"dataframe_records": [row]})
    assert response.status_code == 500 and "RuntimeError: CUDA out of memory" in response.json()["message"]
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _, found = logged_models(MlflowClient(uri), phase1)
    adapter_only = TestClient(scoring_server.init(mlflow.pyfunc.load_model(f"models:/{found[0].model_id}")))
    response = adapter_only.post("/invocations", json={"dataframe_records": [row]})
    assert response.status_code == 501 and "no image encoder" in response.json()["message"], response.json()


def test_a_modality_the_model_was_not_trained_on_is_refused_with_the_reason():
    from modrwkv.multimodal import ModRWKVConfig, ProjectorConfig
    from pipelines.serving import checked_row

    backbone = RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16)
    model = ModRWKV(ModRWKVConfig(backbone, {"image": ProjectorConfig(32, 32)}), random_backbone(backbone))
    with pytest.raises(ValueError, match=r"row 3: this model takes \['image'\], not audio"):
        checked_row(model, {"question": "Transcribe.", "audio": b64(wav_bytes(0.2))}, "row 3")
