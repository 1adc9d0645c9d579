"""The paper's recipes rehearsed the way a user runs them on a cluster: the shipped YAML files themselves,
shrunk with `--set`, submitted with `ray job submit` (the `python -m pipelines.*` job commands) to a Ray head,
with a tiny random RWKV-7 written as an RWKV-LM `.pth`, data in S3 and MLflow on its server. Vision: LLaVA-format
data mixing image, text-only and over-long samples, a tiny SigLIP2, weights and outputs in local folders. Audio: a
LibriSpeech-format tree with over-long transcripts, a tiny Whisper, and as the shipped recipe has it, no shared
folder: the encoder's and backbone's weights, the training outputs and the evaluation's in S3 too. Series: a
GIFT-Eval-layout tree of Arrow files (with a series too short for a window) to train a WaveNet on, then zero-shot on
an ETTh1-format file's test split. Each passes only if its encodes, phase I, phase II and the evaluation finish and
MLflow holds the runs FINISHED."""

import io
import json
import re
import shlex
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from infra.jobs import run_job
from infra.s3_server import s3_client
from modrwkv import RWKV7Config
from pipelines.config import load_config, parse_overrides, to_dict
from pipelines.encode_config import EncodeConfig
from tests.conftest import random_backbone
from tests.mixed_llava import mixed_llava
from tests.services import BUCKET
from tests.tiny_models import save_tiny_whisper

REPO = Path(__file__).resolve().parents[2]
PAPER = "configs/paper"


def llava_data_in_s3(tmp_path: Path, s3) -> str:
    """24 digit images, 4 text-only conversations and 2 image samples far over the context length."""
    mixed = mixed_llava(tmp_path / "digits")
    s3.put_object(Bucket=BUCKET, Key="rehearsal/llava/mixed.json", Body=mixed.read_bytes())
    for image in (tmp_path / "digits" / "images").iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"rehearsal/llava/images/{image.name}", Body=image.read_bytes())
    return f"s3://{BUCKET}/rehearsal/llava"


def librispeech_in_s3(s3, n: int = 12, n_long: int = 2) -> str:
    """A LibriSpeech-format tree (speaker/chapter/*.flac and a *.trans.txt): `n` short tone clips read as digit
    words, and `n_long` clips whose transcripts are far over a small context length."""
    words = ["ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"]
    folder, lines = "rehearsal/LibriSpeech/train/19/198", []
    for i in range(n + n_long):
        utterance = f"19-198-{i:04d}"
        seconds = 0.4 + 0.1 * (i % 5)
        wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 10)) * np.arange(int(16000 * seconds)) / 16000)
        flac = io.BytesIO()
        soundfile.write(flac, wave.astype(np.float32), 16000, format="FLAC")
        s3.put_object(Bucket=BUCKET, Key=f"{folder}/{utterance}.flac", Body=flac.getvalue())
        lines.append(f"{utterance} {words[i % 10] if i < n else ' '.join(words * 12)}")
    s3.put_object(Bucket=BUCKET, Key=f"{folder}/19-198.trans.txt", Body="\n".join(lines).encode())
    return f"s3://{BUCKET}/rehearsal/LibriSpeech/train"


def tiny_pth_backbone(tmp_path: Path) -> Path:
    backbone = tmp_path / "rwkv7.pth"  # RWKV-LM's checkpoint format: a plain state dict
    tiny = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)
    torch.save(random_backbone(tiny).state_dict(), backbone)
    return backbone


def shrunk(backbone: str, output_dir: str, tracking_uri: str, *caches: str, steps: int = 3) -> list[str]:
    """The overrides that fit a paper recipe to 2 CPU workers, `steps` a phase and a 96-token context."""
    overrides = [f"model.backbone.path={backbone}", f"output_dir={output_dir}", "max_length=96",
                 "scaling.workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
                 f"tracking.tracking_uri={tracking_uri}", "tracking.system_metrics_every_s=1"]
    for phase in (1, 2):
        overrides += [f"phase{phase}.steps={steps}", f"phase{phase}.global_batch=4", f"phase{phase}.micro_batch=2",
                      f"phase{phase}.warmup_steps=1", f"phase{phase}.checkpoint_every=0",
                      f"phase{phase}.caches=[{','.join(caches)}]"]
    return overrides


def check_runs(client, experiment_name: str, caches: list[str], over_length: int = 2) -> dict:
    """The phases' and the evaluation's runs; `over_length`: the caches' samples over the shrunk context."""
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    runs = {r.data.tags.get("phase", "eval"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"1", "2", "eval"}
    assert all(r.info.status == "FINISHED" and r.info.end_time for r in runs.values())
    for phase in ("1", "2"):
        sources = [used.dataset.source for used in runs[phase].inputs.dataset_inputs]
        assert len(sources) == len(caches) and all(any(cache in source for source in sources) for cache in caches)
        skipped = runs[phase].data.metrics["skipped_over_length"]
        assert skipped >= 1 if over_length else skipped == 0  # the long samples, skipped and counted
        assert runs[phase].data.metrics["over_length_in_caches"] == over_length  # and known from the manifest
        assert "system/cpu_utilization_percentage" in runs[phase].data.metrics
    return runs


def caches_in_s3(s3, cache_root: str) -> list[str]:
    return sorted(f"{cache_root}/{key.split('/')[0]}" for key in keys(s3, cache_root) if key.endswith("manifest.json"))


def cache_in_s3(s3, cache_root: str) -> str:
    (entry,) = caches_in_s3(s3, cache_root)  # the same data and encoder twice: one cache, found the second time
    return entry


def normalization(model: Path, modality: str) -> list[str]:
    """The feature-statistics buffers a trained model's projector holds."""
    prefix = f"projectors.{modality}.feature_"
    return [k.removeprefix(f"projectors.{modality}.") for k in load_file(model / "model.safetensors")
            if k.startswith(prefix)]


def job(head, env, command: str, *overrides: str) -> str:
    """The job's logs, once it succeeded."""
    entrypoint = command + "".join(f" --set {shlex.quote(o)}" for o in overrides)
    result = run_job(head.dashboard_url, entrypoint, working_dir=REPO, env_vars=env, headers=head.auth_headers(),
                     timeout=900)
    assert result.status == "SUCCEEDED", f"{entrypoint}\n{result.logs[-4000:]}"
    return result.logs


@pytest.mark.slow
def test_paper_vision_recipe_on_a_ray_head(ray_head, mlflow_server, s3_server, tmp_path):
    s3 = s3_client(s3_server.endpoint_url)
    data = llava_data_in_s3(tmp_path, s3)
    torch.manual_seed(0)
    siglip2 = Siglip2VisionConfig(patch_size=8, num_patches=16, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2)
    Siglip2VisionModel(siglip2).save_pretrained(tmp_path / "siglip2")
    backbone = tiny_pth_backbone(tmp_path)
    env = s3_server.env()

    cache_root = f"s3://{BUCKET}/rehearsal/cache"  # the bucket is shared with other tests
    for encode in ("encode_llava_pretrain", "encode_llava_instruct"):
        job(ray_head, env, f"python -m pipelines.encode --config {PAPER}/{encode}.yaml",
            f"dataset.path={data}/mixed.json", f"dataset.media_root={data}",
            f"encoder.model_dir={tmp_path / 'siglip2'}", "encoder.dtype=fp32", f"cache.root={cache_root}",
            "cache.shard_size=8", "run.actors=1", "run.batch_size=8", "run.gpus_per_actor=0")
    cache = cache_in_s3(s3, cache_root)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{cache.split('/', 3)[3]}/manifest.json")["Body"].read())
    assert manifest["counts"] == {"read": 30, "written": 30, "rejected": 0}  # over-long samples are kept here

    # 8 steps of 2 samples a worker read each worker's whole share of the 30 (15): the over-long ones are met
    shrink = shrunk(str(backbone), str(tmp_path / "runs"), mlflow_server.tracking_uri, cache, steps=8)
    for phase in (1, 2):
        job(ray_head, env, f"python -m pipelines.train --config {PAPER}/train_vision.yaml --phase {phase}", *shrink)
    model = tmp_path / "runs" / "modrwkv-vision-1.5b" / "phase2" / "model"
    job(ray_head, env, f"python -m pipelines.evaluate --checkpoint {model} --task vqa --cache {cache} "
                       f"--out-dir {tmp_path / 'eval'}", f"tracking_uri={mlflow_server.tracking_uri}",
        "max_new_tokens=2")

    client = MlflowClient(mlflow_server.tracking_uri)
    runs = check_runs(client, "modrwkv-vision", [cache])
    assert 0 <= runs["eval"].data.metrics["accuracy"] <= 1
    for phase in ("1", "2"):  # the over-long samples each phase left out, named in an artifact of its run
        (tmp_path / phase).mkdir()
        artifact = client.download_artifacts(runs[phase].info.run_id, "skipped_samples.jsonl", str(tmp_path / phase))
        named = [json.loads(line) for line in Path(artifact).read_text().splitlines()]
        assert len(named) == runs[phase].data.metrics["skipped_over_length"]
        assert {r["key"] for r in named} <= {"long-0", "long-1"} and all(r["tokens"] > 96 for r in named)
    assert set(normalization(model, "image")) == {"feature_mean", "feature_whitening"}  # image's default: whiten


@pytest.mark.slow
def test_paper_audio_recipe_on_a_ray_head(ray_head, mlflow_server, s3_server, tmp_path):
    s3 = s3_client(s3_server.endpoint_url)
    data, env, bucket = librispeech_in_s3(s3), s3_server.env(), f"s3://{BUCKET}/rehearsal/audio"
    for local, uri in ((save_tiny_whisper(tmp_path / "whisper"), f"{bucket}/models/whisper"),
                       (tiny_pth_backbone(tmp_path), f"{bucket}/models/rwkv7.pth")):
        upload(s3, local, uri)
    caches = {}
    # here the same tree; the test set's limits keep its utterances over 30 s, the training set's do not: two entries
    for encode in ("encode_librispeech", "encode_librispeech_test_clean"):
        job(ray_head, env, f"python -m pipelines.encode --config {PAPER}/{encode}.yaml", f"dataset.path={data}",
            f"encoder.model_dir={bucket}/models/whisper", "encoder.dtype=fp32", f"cache.root={bucket}/{encode}",
            "cache.shard_size=4", "run.actors=1", "run.batch_size=4", "run.gpus_per_actor=0", "max_length=96")
        caches[encode] = cache_in_s3(s3, f"{bucket}/{encode}")
    cache = caches["encode_librispeech"]
    for phase in (1, 2):
        job(ray_head, env, f"python -m pipelines.train --config {PAPER}/train_audio.yaml --phase {phase}",
            *shrunk(f"{bucket}/models/rwkv7.pth", f"{bucket}/runs", mlflow_server.tracking_uri, cache))
    model = f"{bucket}/runs/modrwkv-audio-1.5b/phase2/model"
    job(ray_head, env, f"python -m pipelines.evaluate --config {PAPER}/eval_librispeech.yaml",
        f"checkpoint={model}", f"cache={caches['encode_librispeech_test_clean']}", f"out_dir={bucket}/eval",
        "actors=1", "gpus_per_actor=0",
        "max_new_tokens=2", f"tracking_uri={mlflow_server.tracking_uri}")
    client = MlflowClient(mlflow_server.tracking_uri)
    runs = check_runs(client, "modrwkv-audio", [cache])
    assert runs["eval"].data.metrics["wer_en"] >= 0
    # through the server: each phase's loss history by its REST API, its loss curve and its logged model in S3
    stored = keys(s3, f"s3://{BUCKET}/mlflow")
    for phase, weights in (("1", "adapter.safetensors"), ("2", "model.safetensors")):
        run_id = runs[phase].info.run_id
        history = urllib.request.urlopen(f"{mlflow_server.tracking_uri}/api/2.0/mlflow/metrics/get-history?"
                                         f"run_id={run_id}&metric_key=loss").read()
        assert sorted(m["step"] for m in json.loads(history)["metrics"]) == [1, 2, 3]
        assert any(k.endswith(f"{run_id}/artifacts/loss_curve.png") for k in stored)
        (logged,) = client.search_logged_models([runs[phase].info.experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'")
        assert any(f"/models/{logged.model_id}/" in k and k.endswith(f"/model/{weights}") for k in stored)
    written = sorted(keys(s3, f"{bucket}/runs/modrwkv-audio-1.5b"))
    assert [k for k in written if "/ray/" not in k] == [
        "phase1/model/adapter.safetensors", "phase1/model/backbone_source.json", "phase1/model/encoders.json",
        "phase1/model/modrwkv_config.json", "phase2/adapter/adapter.safetensors", "phase2/adapter/modrwkv_config.json",
        "phase2/model/backbone_source.json", "phase2/model/encoders.json", "phase2/model/model.safetensors",
        "phase2/model/modrwkv_config.json"]
    assert any(k.startswith("phase2/ray/") and k.endswith(".safetensors") for k in written)  # Ray's checkpoints
    (published,) = keys(s3, f"{bucket}/eval")
    assert re.fullmatch(r"predictions_asr_[0-9a-f]{10}\.jsonl", published)
    phase2 = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{model.split('/', 3)[3]}/backbone_source.json")[
        "Body"].read())
    assert phase2["path"] == f"{bucket}/models/rwkv7.pth" and len(phase2["sha256"]) == 64
    with tempfile.TemporaryDirectory() as d:
        s3.download_file(BUCKET, f"{model.split('/', 3)[3]}/model.safetensors", f"{d}/model.safetensors")
        assert set(normalization(Path(d), "audio")) == {"feature_mean", "feature_std"}  # audio's default: standardize


def gift_eval_in_s3(s3, steps: int = 200) -> str:
    """GIFT-Eval's pretraining tree, `<dataset>/<freq>/data-00000-of-00001.arrow` (Hugging Face Arrow streams, one
    row per series): three daily-cycle series, a two-variate row and a series too short for one window; beside each
    file `datasets`' cache file of the same rows, which its state.json does not list (not read)."""
    import pyarrow as pa

    t = np.arange(steps)
    rows = {"solar/H": [[float(np.sin(2 * np.pi * t_ / p)) for t_ in t] for p in (24, 12, 8)],
            "retail/D": [[[float(np.cos(2 * np.pi * t_ / 7)) for t_ in t], [float(t_ % 5) for t_ in t]],
                         [[1.0, 2.0, 3.0]] * 2]}
    for dataset, targets in rows.items():
        table = pa.table({"item_id": [f"{dataset}-{i}" for i in range(len(targets))], "target": targets})
        stream = pa.BufferOutputStream()
        with pa.ipc.new_stream(stream, table.schema) as writer:
            writer.write_table(table)
        for name in ("data-00000-of-00001.arrow", "cache-5e1f.arrow"):
            s3.put_object(Bucket=BUCKET, Key=f"rehearsal/series/gift/{dataset}/{name}",
                          Body=stream.getvalue().to_pybytes())
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "5e1f"}
        s3.put_object(Bucket=BUCKET, Key=f"rehearsal/series/gift/{dataset}/state.json", Body=json.dumps(state).encode())
    return f"s3://{BUCKET}/rehearsal/series/gift"


def etth1_in_s3(s3, hours: int = 240) -> str:
    """An ETTh1-format file (`date` and three hourly load columns)."""
    lines = ["date,HUFL,MUFL,OT"] + [
        f"2016-07-{1 + h // 24:02d} {h % 24:02d}:00:00,{np.sin(2 * np.pi * h / 24):.4f},{h % 6},{0.01 * h:.3f}"
        for h in range(hours)]
    s3.put_object(Bucket=BUCKET, Key="rehearsal/series/ETTh1.csv", Body="\n".join(lines).encode())
    return f"s3://{BUCKET}/rehearsal/series/ETTh1.csv"


@pytest.mark.slow
def test_paper_series_recipe_on_a_ray_head(ray_head, mlflow_server, s3_server, tmp_path):
    s3 = s3_client(s3_server.endpoint_url)
    env, bucket = s3_server.env(), f"s3://{BUCKET}/rehearsal/series"
    window = ["dataset.lookback=48", "dataset.horizon=8", "run.actors=1", "run.batch_size=16"]
    # shards of 8: an entry of 6 windows is one shard, of 9 a full one and 1, which the 2 workers share by sample;
    # the folders encoded at once as Ray tasks on the cluster, reading S3 with the job's settings
    gift = [f"dataset.path={gift_eval_in_s3(s3)}", "dataset.stride=56", f"cache.root={bucket}/cache",
            "cache.shard_size=8", "run.folder_jobs=2", *window]
    logs = job(ray_head, env, f"python -m pipelines.encode --config {PAPER}/encode_gifteval_pretrain.yaml", *gift)
    assert "2 of 2 folders to read, 2 at a time as Ray tasks" in logs and logs.count(": encoded s3://") == 2
    # a collection (each_folder): an entry per dataset folder, each encoded by a job of its own
    caches = caches_in_s3(s3, f"{bucket}/cache")
    counts = [json.loads(s3.get_object(Bucket=BUCKET, Key=f"{c.split('/', 3)[3]}/manifest.json")["Body"].read())[
        "counts"] for c in caches]
    # 3 windows of 56 steps in each 200-step series (retail: 2 variates, solar: 3); the 3-step variates, rejected
    assert sorted(counts, key=lambda c: c["read"]) == [{"read": 8, "written": 6, "rejected": 2},
                                                       {"read": 9, "written": 9, "rejected": 0}]
    job(ray_head, env, f"python -m pipelines.encode --config {PAPER}/encode_etth1_test.yaml",
        f"dataset.path={etth1_in_s3(s3)}", "dataset.split_rows=[120, 160, 240]", f"cache.root={bucket}/test-cache",
        "cache.shard_size=64", *window)
    test_cache = cache_in_s3(s3, f"{bucket}/test-cache")

    # training names the collection's encode YAML (the shipped one as the encode job read it), which stands for
    # its entries: each found from a listing of its folder, no window read again
    collection = tmp_path / "encode_gifteval_pretrain.yaml"
    collection.write_text(yaml.safe_dump(to_dict(load_config(
        f"{REPO}/{PAPER}/encode_gifteval_pretrain.yaml", EncodeConfig, parse_overrides(gift)))))
    backbone = tiny_pth_backbone(tmp_path)
    for phase in (1, 2):
        logs = job(ray_head, env, f"python -m pipelines.train --config {PAPER}/train_series.yaml --phase {phase}",
                   *shrunk(str(backbone), str(tmp_path / "runs"), mlflow_server.tracking_uri, str(collection)),
                   "model.wavenet.hidden=8", "model.wavenet.layers=3")
        assert logs.count("its files unchanged since; nothing read") == 2
    model = tmp_path / "runs" / "modrwkv-series-1.5b" / "phase2" / "model"
    job(ray_head, env, f"python -m pipelines.evaluate --config {PAPER}/eval_etth1.yaml", f"checkpoint={model}",
        f"cache={test_cache}", f"out_dir={tmp_path / 'eval'}", "actors=1", "gpus_per_actor=0",
        f"tracking_uri={mlflow_server.tracking_uri}")

    runs = check_runs(MlflowClient(mlflow_server.tracking_uri), "modrwkv-series", caches, over_length=0)
    # every test window of the split's 80 hours whose 8-hour horizon it holds, in each of the 3 columns
    (predictions,) = (tmp_path / "eval").glob("predictions_forecast_*.jsonl")
    predicted = predictions.read_text().splitlines()
    assert len(predicted) == 73 * 3 and not any("skipped" in json.loads(row) for row in predicted)
    scores = runs["eval"].data.metrics
    assert np.isfinite(scores["mse_standardized"]) and scores["baseline_mse"] > 0  # seasonal naive beside it
    assert scores["rows_predicted"] == 73 * 3 and scores["rejected_at_encode"] == 0  # what they cover
    config = json.loads((model / "modrwkv_config.json").read_text())
    assert config["series_encoder"] == {"in_channels": 1, "hidden": 8, "layers": 3, "kernel": 2}
    assert config["forecast_horizon"] == 8 and config["projectors"]["series"]["adapter_scale"] == 4
    assert normalization(model, "series") == []  # raw series behind a WaveNet are not normalised


def upload(s3, local: Path, uri: str) -> None:
    """A file, or a folder's files, to `uri` in the test bucket."""
    key = uri.split("/", 3)[3]
    for path in [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, key if path == local else f"{key}/{path.relative_to(local)}")


def keys(s3, uri: str) -> list[str]:
    """The objects under `uri`, relative to it, without folder markers."""
    prefix = uri.split("/", 3)[3] + "/"
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"].removeprefix(prefix) for page in pages for o in page.get("Contents", [])
            if not o["Key"].endswith("/")]
