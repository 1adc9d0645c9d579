"""The paper's vision recipe rehearsed the way a user runs it on a cluster: the shipped YAML files themselves,
shrunk with `--set`, submitted with `ray job submit` (the `python -m pipelines.*` job commands) to a Ray head,
on LLaVA-format data in S3 that mixes image, text-only and over-long samples, a tiny random RWKV-7 written
as an RWKV-LM `.pth` and a tiny SigLIP2; MLflow on its server. Passes only if both encodes, phase I, phase II
and the evaluation finish and MLflow holds the runs FINISHED."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from infra.jobs import run_job
from infra.s3_server import s3_client
from modrwkv import RWKV7Config
from tests.conftest import random_backbone
from tests.mixed_llava import mixed_llava
from tests.services import BUCKET

REPO = Path(__file__).resolve().parents[2]
PAPER = "configs/paper"


def llava_data_in_s3(tmp_path: Path, s3) -> str:
    """24 digit images, 4 text-only conversations and 2 image samples far over the context length."""
    mixed = mixed_llava(tmp_path / "digits")
    s3.put_object(Bucket=BUCKET, Key="rehearsal/llava/mixed.json", Body=mixed.read_bytes())
    for image in (tmp_path / "digits" / "images").iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"rehearsal/llava/images/{image.name}", Body=image.read_bytes())
    return f"s3://{BUCKET}/rehearsal/llava"


def job(head, env, command: str, *overrides: str) -> None:
    entrypoint = command + "".join(f" --set {shlex.quote(o)}" for o in overrides)
    result = run_job(head.dashboard_url, entrypoint, working_dir=REPO, env_vars=env, headers=head.auth_headers(),
                     timeout=900)
    assert result.status == "SUCCEEDED", f"{entrypoint}\n{result.logs[-4000:]}"


@pytest.mark.slow
def test_paper_vision_recipe_on_a_ray_head(ray_head, mlflow_server, s3_server, tmp_path):
    s3 = s3_client(s3_server.endpoint_url)
    data = llava_data_in_s3(tmp_path, s3)
    torch.manual_seed(0)
    siglip2 = Siglip2VisionConfig(patch_size=8, num_patches=16, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2)
    Siglip2VisionModel(siglip2).save_pretrained(tmp_path / "siglip2")
    backbone = tmp_path / "rwkv7.pth"  # RWKV-LM's checkpoint format: a plain state dict
    tiny = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)
    torch.save(random_backbone(tiny).state_dict(), backbone)
    env = s3_server.env()

    cache_root = f"s3://{BUCKET}/rehearsal/cache"  # the bucket is shared with other tests
    for encode in ("encode_llava_pretrain", "encode_llava_instruct"):
        job(ray_head, env, f"python -m pipelines.encode --config {PAPER}/{encode}.yaml",
            f"dataset.path={data}/mixed.json", f"dataset.media_root={data}",
            f"encoder.model_dir={tmp_path / 'siglip2'}", "encoder.dtype=fp32", f"cache.root={cache_root}",
            "cache.shard_size=8", "run.actors=1", "run.batch_size=8", "run.gpus_per_actor=0")
    entries = {key.split("/")[2] for key in (o["Key"] for o in s3.list_objects_v2(
        Bucket=BUCKET, Prefix="rehearsal/cache/")["Contents"]) if key.endswith("manifest.json")}
    assert len(entries) == 1  # the same data and encoder twice: one cache, found the second time
    cache = f"{cache_root}/{entries.pop()}"
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{cache.split('/', 3)[3]}/manifest.json")["Body"].read())
    assert manifest["counts"] == {"read": 30, "written": 30, "rejected": 0}  # over-long samples are kept here

    shrink = [f"model.backbone.path={backbone}", f"output_dir={tmp_path / 'runs'}", "max_length=96",
              "scaling.workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
              f"tracking.tracking_uri={mlflow_server.tracking_uri}"]
    for phase in (1, 2):
        shrink += [f"phase{phase}.steps=3", f"phase{phase}.global_batch=4", f"phase{phase}.micro_batch=2",
                   f"phase{phase}.warmup_steps=1", f"phase{phase}.checkpoint_every=0", f"phase{phase}.caches=[{cache}]"]
    for phase in (1, 2):
        job(ray_head, env, f"python -m pipelines.train --config {PAPER}/train_vision.yaml --phase {phase}", *shrink)
    model = tmp_path / "runs" / "modrwkv-vision-1.5b" / "phase2" / "model"
    job(ray_head, env, f"python -m pipelines.evaluate --checkpoint {model} --task vqa --cache {cache} "
                       f"--out-dir {tmp_path / 'eval'}", f"tracking_uri={mlflow_server.tracking_uri}",
        "max_new_tokens=2")

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("modrwkv-vision")
    runs = {r.data.tags.get("phase", "eval"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"1", "2", "eval"}
    assert all(r.info.status == "FINISHED" and r.info.end_time for r in runs.values())
    for phase in ("1", "2"):
        (used,) = runs[phase].inputs.dataset_inputs
        assert used.dataset.source.endswith(f'{cache}"}}') or cache in used.dataset.source
        assert runs[phase].data.metrics["skipped_over_length"] >= 1  # the long samples, skipped and counted
    assert 0 <= runs["eval"].data.metrics["accuracy"] <= 1
