"""`modrwkv train --config configs/train_*.yaml --phase 1|2`: Ray Train workers, one DeepSpeed engine each,
reading the feature cache; MLflow tracks the run.

Phase I trains the projectors (Conv1D compression + adapter), the forecast head and WaveNet at a high lr on
a frozen backbone and saves them adapter-only; phase II loads that output and trains the backbone too.
The driver resolves the caches (an encode YAML is encoded or found in the cache), builds the model config
from the cached feature widths, creates the MLflow run, and exports the final model from the last
checkpoint; workers run the loop in `train_loop.py`.
"""

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import yaml
from mlflow import MlflowClient
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from modrwkv.checkpoint import read_config
from modrwkv.config import RWKV7Config
from modrwkv.multimodal import ModRWKVConfig, read_backbone_source, write_backbone_source
from preprocessing.cache.entry import FeatureCache
from preprocessing.encoders.recorded import write_encoders_record

from . import tracking
from .caches import absolute, resolve_caches
from .config import ConfigError, load_config, parse_overrides, to_dict
from .train_config import TrainConfig
from .train_loop import WorkerConfig, train_loop_per_worker

# glibc maps every allocation over 32 MB afresh (over 64 MB in a thread's own arena, and the loop runs in a thread)
# and unmaps it when freed: the embedding's and head's gradients of a 65536-word vocabulary (33.5 MB each at width
# 128), their flat ZeRO buckets and Adam's temporaries are faulted in again every step, half a CPU worker's step
# time on a VM (benchmarks/RESULTS.md). Kept in one heap, they are reused; a user's own setting of each wins.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32), "MALLOC_ARENA_MAX": "1"}


def worker_env() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path
    metrics: dict
    seconds: float


def cache_shapes(caches: list[FeatureCache]) -> tuple[dict[str, int], int, int]:
    """(modality -> the cached feature width, the projector's input; the forecast horizon and the lookback
    length, 0 without series), from the first sample of each cache that has a feature item (text-only samples
    and empty shards are passed over)."""
    widths, horizon, lookback = {}, 0, 0
    for cache in caches:
        samples = (s for i in range(len(cache.shards)) for s in cache.read_shard(i))
        sample = next((s for s in samples if s.items), None)
        if sample is None:
            raise ValueError(f"{cache.uri}: no sample holds {cache.modality} features (text-only or empty cache)")
        widths[cache.modality] = int(sample.items[0].shape[-1])
        if cache.modality == "series":
            horizon, lookback = int(sample.target.shape[0]), int(sample.lookback.shape[0])
    return widths, horizon, lookback


def model_config(config: TrainConfig, backbone: RWKV7Config, caches: list[FeatureCache]) -> ModRWKVConfig:
    """The model for these caches: each projector's input width is its cache's feature width (a width set in
    the config must agree), WaveNet's input channels the cached series'."""
    widths, horizon, lookback = cache_shapes(caches)
    missing = set(widths) - set(config.model.projectors)
    if missing:
        raise ConfigError(f"model.projectors: the caches hold {sorted(missing)} features but no projector is "
                          "configured")
    wavenet = None
    if config.model.wavenet and "series" in widths:
        wavenet = dataclasses.replace(config.model.wavenet, in_channels=widths["series"])
        widths["series"] = wavenet.hidden  # WaveNet's output is trained, not cached
    projectors = {}
    for modality, p in config.model.projectors.items():
        if modality not in widths:
            continue
        if p.encoder_dim not in (0, widths[modality]):
            raise ConfigError(f"model.projectors.{modality}.encoder_dim: {p.encoder_dim}, but the cached features "
                              f"are {widths[modality]} wide")
        projectors[modality] = dataclasses.replace(p, encoder_dim=widths[modality])
    series = "series" in widths
    return ModRWKVConfig(backbone, projectors, horizon if series else 0, wavenet,
                         forecast_lookback=lookback if series and config.model.forecast_skip else 0)


WHITEN_EPS = 0.1  # added to each eigenvalue, times their mean: near-empty directions are not blown up


def feature_stats(caches: list[FeatureCache], normalize: dict[str, str], max_shards: int = 16,
                  max_vectors: int = 262_144) -> dict[str, dict]:
    """For each modality in `normalize` (modality -> "standardize" or "whiten"): the mean of the cached feature
    vectors, and their per-dimension std or ZCA whitening matrix Σ^(-1/2), over the items of the first
    `max_shards` shards of each cache, at most `max_vectors` vectors (enough for stable statistics, cheap on a
    cluster's driver)."""
    moments = {}  # modality -> [n, sum x, sum x x^T]
    for cache in caches:
        if cache.modality not in normalize:
            continue
        for index in range(min(len(cache.shards), max_shards)):
            n, total, outer = moments.setdefault(cache.modality, [0, 0.0, 0.0])
            if n >= max_vectors:
                break
            items = [a for s in cache.read_shard(index) for a in s.items]
            if items:
                x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in items]).astype(np.float64)[: max_vectors - n]
                moments[cache.modality] = [n + len(x), total + x.sum(0), outer + x.T @ x]
    stats = {}
    for modality, (n, total, outer) in moments.items():
        mean = total / n
        covariance = outer / n - np.outer(mean, mean)
        stats[modality] = {"mean": mean.tolist()}
        if normalize[modality] == "standardize":
            stats[modality]["std"] = (np.sqrt(np.maximum(np.diag(covariance), 0.0)) + 1e-6).tolist()
        else:
            eigenvalues, vectors = np.linalg.eigh(covariance)
            eigenvalues = np.maximum(eigenvalues, 0.0) + WHITEN_EPS * max(eigenvalues.mean(), 1e-12)
            stats[modality]["whitening"] = ((vectors / np.sqrt(eigenvalues)) @ vectors.T).tolist()
    return stats


def over_length_in_caches(caches: list[FeatureCache], mm_config: ModRWKVConfig, max_length: int) -> int:
    """Prints, per cache, how many samples exceed `max_length` with this model's projectors (from the manifests'
    recorded lengths, before any worker starts; training skips and names them). Returns the total."""
    projectors, total = mm_config.projectors, 0
    for cache in caches:
        over = cache.over_length(max_length, projectors[cache.modality].compressed_length)
        if over:
            print(f"{cache.uri}: {len(over)} of {len(cache)} samples are over max_length {max_length} and will be "
                  f"skipped, e.g. {over[0]['key']} ({over[0]['tokens']} tokens)")
        total += len(over)
    return total


def phase_dir(config: TrainConfig, phase: int) -> Path:
    return Path(config.output_dir).absolute() / config.name / f"phase{phase}"


def run_train(config: TrainConfig, phase: int, resume_from: str | None = None) -> TrainResult:
    start = time.perf_counter()
    hp = config.phase1 if phase == 1 else config.phase2
    caches = resolve_caches(hp.caches or config.caches)
    opened = [FeatureCache(uri) for uri in caches]  # each manifest read once per start
    bb_config = read_config(config.model.backbone.path)
    mm_config = model_config(config, bb_config, opened)
    init_from = None
    if phase == 2:
        init_from = phase_dir(config, 1) / "model"
        phase1 = read_backbone_source(init_from)
        if phase1 is None:
            raise FileNotFoundError(f"{init_from}: no phase I output; run `modrwkv train --phase 1` first")
    out = phase_dir(config, phase)
    out.mkdir(parents=True, exist_ok=True)

    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    tags = {"phase": str(phase), "feature_caches": json.dumps(caches),
            "feature_cache_ids": ",".join(Path(c.rstrip("/")).name for c in caches)}
    if phase == 2:
        tags["phase1_run_id"] = phase1["run_id"]
    run_name = config.tracking.run_name or f"{config.name}-phase{phase}"
    run_id = tracking.start_run(uri, config.tracking.experiment, run_name,
                                {**to_dict(config), "phase": phase, "resolved_caches": caches}, tags)
    print(f"MLflow run {run_id} at {uri}")

    with tracking.run_status(uri, run_id):  # FINISHED, FAILED or KILLED, with an end time
        tracking.log_caches(uri, run_id, caches)
        over = over_length_in_caches(opened, mm_config, config.max_length)
        tracking.MetricLogger(uri, run_id).log({"over_length_in_caches": over}, 0)
        if not ray.is_initialized():
            ray.init(address=config.scaling.ray_address, log_to_driver=False)
        normalized = {m: p.normalize for m, p in mm_config.projectors.items() if p.normalize != "none"}
        stats = feature_stats(opened, normalized) if phase == 1 else {}  # phase II reads phase I's buffers
        loop_config = WorkerConfig(
            phase=phase, hp=hp, caches=caches, model=mm_config, backbone_path=absolute(config.model.backbone.path),
            init_from=str(init_from) if init_from else None, feature_stats=stats, deepspeed=config.deepspeed,
            max_length=config.max_length, packing=config.packing, pack_buffer=config.pack_buffer,
            prefetch_threads=config.prefetch_threads, seed=config.seed,
            tracking_uri=uri, run_id=run_id, system_metrics_every_s=config.tracking.system_metrics_every_s)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
                                         resources_per_worker={"CPU": config.scaling.cpus_per_worker}),
            # one Ray run per MLflow run: Ray Train resumes any run whose name it finds in storage, and a new
            # `modrwkv train` must start fresh (resuming is --resume-from, or a restart inside this fit)
            run_config=RunConfig(name=f"{config.name}-phase{phase}-{run_id[:8]}", storage_path=str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=config.scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 worker_runtime_env={"env_vars": worker_env()}),
            resume_from_checkpoint=Checkpoint(resume_from) if resume_from else None,
        )
        with tracking.StepProgress(uri, run_id, hp.steps, f"{config.name} phase {phase}"):
            result = trainer.fit()
        model_dir = export_model(result.checkpoint, out, config, phase, run_id)
        write_encoders_record(model_dir, encoder_store_keys(opened))
        log_artifacts(uri, run_id, config, model_dir, out, phase)
        metrics = dict(result.metrics or {})
        print(f"phase {phase} done in {time.perf_counter() - start:.0f} s: step {metrics.get('step')}, "
              f"loss {metrics.get('loss', float('nan')):.4f}; model in {model_dir}")
    return TrainResult(run_id, model_dir, metrics, time.perf_counter() - start)


def export_model(checkpoint, out: Path, config: TrainConfig, phase: int, run_id: str) -> Path:
    """The final checkpoint's save_pretrained folders (model/, and adapter/ after phase II), copied out of
    Ray's storage; returns the model folder."""
    with checkpoint.as_directory() as d:
        if not (Path(d) / "model").is_dir():
            raise FileNotFoundError(f"{d}: the final checkpoint has no model/ folder")
        for name in ("model", "adapter"):
            if (out / name).exists():
                shutil.rmtree(out / name)
            if (Path(d) / name).is_dir():
                shutil.copytree(Path(d) / name, out / name)
    write_backbone_source(out / "model", {"run_id": run_id, "phase": phase,
                                          "path": absolute(config.model.backbone.path)})
    return out / "model"


def encoder_store_keys(caches: list[FeatureCache]) -> dict[str, dict]:
    """modality -> the feature store key of its caches: the encoder settings inference must reproduce. A modality
    whose caches came from different encoders or settings, or one whose manifest records none (a cache written by
    other code), is left out (chat then needs its kind), with a note."""
    keys: dict[str, list[dict | None]] = {}
    for cache in caches:
        keys.setdefault(cache.modality, []).append(cache.manifest.get("store"))
    agreed = {}
    for modality, found in keys.items():
        if None in found:
            print(f"note: a {modality} cache records no encoder settings; the model records none for {modality}")
        elif any(k != found[0] for k in found):
            print(f"note: the {modality} caches come from different encoders or settings; the model records none")
        else:
            agreed[modality] = found[0]
    return agreed


def log_artifacts(uri: str, run_id: str, config: TrainConfig, model_dir: Path, out: Path, phase: int) -> None:
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        client.log_artifact(run_id, str(cfg))
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
        client.log_artifact(run_id, str(tracking.loss_curve(sorted(history), Path(tmp) / "loss_curve.png",
                                                            f"{config.name} phase {phase}")))
    client.log_artifacts(run_id, str(model_dir), "model")
    adapter = out / ("model" if phase == 1 else "adapter") / "adapter.safetensors"
    client.log_artifact(run_id, str(adapter), "adapter")


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config, TrainConfig, parse_overrides(args.set))
    run_train(config, args.phase, args.resume_from)


# `python -m pipelines.train ...`, the job command for `ray job submit`: same flags as `modrwkv train`
if __name__ == "__main__":
    import sys

    from pipelines.cli import main as cli_main  # the CLI imports this module: only the `-m` entry needs it

    sys.exit(cli_main(["train", *sys.argv[1:]]))
