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
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .config import ConfigError, load_config, parse_overrides, to_dict
from . import tracking

BACKBONE_REF = "backbone_source.json"  # beside an adapter-only save: which backbone it was trained on


@dataclass
class BackboneConfig:
    # A pretrained backbone: a save_pretrained directory or an RWKV-LM .pth. (A freshly initialised RWKV-7
    # cannot serve phase I: its output projections start at zero, so no gradient reaches the adapter.)
    path: str


# Measured in benchmarks/quality.py (RESULTS.md, issue 12): whitening lifts DINOv2's colour (0.46 → 0.86) but
# doubles the spoken-digit errors on Whisper features (WER 0.05 → 0.22); series are the same either way.
DEFAULT_NORMALIZE = {"image": "whiten", "audio": "standardize", "series": "standardize"}


@dataclass
class ProjectorSpec:
    kernel: int = 0
    stride: int = 0
    adapter_scale: int = 4
    # with the training caches' feature statistics: none, standardize (per dimension) or whiten (ZCA); default:
    # the modality's measured best (DEFAULT_NORMALIZE); modrwkv/projector.py says why
    normalize: Literal["none", "standardize", "whiten"] | None = None


@dataclass
class WaveNetSpec:
    hidden: int = 64
    layers: int = 6
    kernel: int = 2


@dataclass
class ModelConfig:
    backbone: BackboneConfig
    projectors: dict[str, ProjectorSpec] = field(default_factory=dict)  # by modality; widths come from the caches
    wavenet: WaveNetSpec | None = None  # series caches encoded "raw" train this WaveNet
    # the forecast adds a linear map of the normalised lookback, starting as the naive forecast (ModRWKV)
    forecast_skip: bool = True


@dataclass
class PhaseConfig:
    lr: float
    steps: int  # optimizer steps
    global_batch: int
    micro_batch: int = 8  # per worker; accumulation fills the global batch
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # 0: only at the end
    caches: list[str] | None = None  # this phase's data, when it differs from the top-level caches
    mix: list[float] | None = None  # relative sampling weight of each cache, in order; default: its sample count

    def __post_init__(self):
        if self.lr <= 0 or self.steps < 1 or self.micro_batch < 1:
            raise ValueError("lr, steps and micro_batch must be positive")
        if self.mix is not None and not all(w > 0 for w in self.mix):
            raise ValueError(f"mix weights must be positive, got {self.mix}")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False


@dataclass
class ScalingSpec:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    ray_address: str | None = None


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, the local server, or runs/mlflow.db
    experiment: str = "modrwkv"
    run_name: str | None = None
    system_metrics_every_s: float = 10.0  # CPU, memory, GPU of each training node into the run; 0: off


@dataclass
class TrainConfig:
    name: str
    model: ModelConfig
    phase1: PhaseConfig
    phase2: PhaseConfig
    caches: list[str] = field(default_factory=list)  # cache entries or encode YAMLs (found or encoded first)
    output_dir: str = "runs/train"
    max_length: int = 2048
    prefetch_threads: int = 4  # per worker, read, check and decode the next shards ahead; 0: on the training thread
    seed: int = 0
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if self.prefetch_threads < 0:
            raise ValueError(f"prefetch_threads must be 0 or more, not {self.prefetch_threads}")
        for name, phase in (("phase1", self.phase1), ("phase2", self.phase2)):
            caches = phase.caches or self.caches
            if not caches:
                raise ValueError(f"{name}: no data; give caches (both phases) or {name}.caches")
            if phase.mix is not None and len(phase.mix) != len(caches):
                raise ValueError(f"{name}.mix has {len(phase.mix)} weights for {len(caches)} caches")


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path
    metrics: dict
    seconds: float


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    from preprocessing import storage

    return uri if storage.is_remote(uri) else str(Path(uri).absolute())


def resolve_caches(entries: list[str]) -> list[str]:
    from .encode import EncodeConfig, run_encode

    uris = []
    for entry in entries:
        if entry.endswith((".yaml", ".yml")):
            uris.append(run_encode(load_config(entry, EncodeConfig)).uri)
        else:
            uris.append(entry)
    return [absolute(u) for u in uris]


def cache_shapes(cache_uris: list[str]) -> tuple[dict[str, int], int, int]:
    """(modality -> the cached feature width, the projector's input; the forecast horizon and the lookback
    length, 0 without series), from the first sample of each cache that has a feature item (text-only samples
    and empty shards are passed over)."""
    from preprocessing.cache.reader import FeatureCache

    widths, horizon, lookback = {}, 0, 0
    for uri in cache_uris:
        cache = FeatureCache(uri)
        samples = (s for i in range(len(cache.shards)) for s in cache.read_shard(i))
        arrays = next((s["arrays"] for s in samples if "item0" in s["arrays"]), None)
        if arrays is None:
            raise ValueError(f"{uri}: no sample holds {cache.modality} features (text-only or empty cache)")
        widths[cache.modality] = int(arrays["item0"].shape[-1])
        if cache.modality == "series":
            horizon, lookback = int(arrays["target"].shape[0]), int(arrays["lookback"].shape[0])
    return widths, horizon, lookback


def model_config(config: TrainConfig, backbone_config, cache_uris: list[str]) -> dict:
    from modrwkv.multimodal import ModRWKVConfig
    from modrwkv.projector import ProjectorConfig
    from modrwkv.wavenet import WaveNetConfig

    widths, horizon, lookback = cache_shapes(cache_uris)
    missing = set(widths) - set(config.model.projectors)
    if missing:
        raise ConfigError(f"model.projectors: the caches hold {sorted(missing)} features but no projector is "
                          "configured")
    wavenet = None
    if config.model.wavenet and "series" in widths:
        wavenet = WaveNetConfig(in_channels=widths["series"], **dataclasses.asdict(config.model.wavenet))
        widths["series"] = wavenet.hidden
    projectors = {m: ProjectorConfig(encoder_dim=widths[m], model_dim=backbone_config.n_embd,
                                     **{**dataclasses.asdict(p),  # WaveNet's output is trained, not cached
                                        "normalize": "none" if m == "series" and wavenet
                                        else p.normalize or DEFAULT_NORMALIZE.get(m, "standardize")})
                  for m, p in config.model.projectors.items() if m in widths}
    series = "series" in widths
    return ModRWKVConfig(backbone_config, projectors, horizon if series else 0, wavenet,
                         forecast_lookback=lookback if series and config.model.forecast_skip else 0).to_dict()


WHITEN_EPS = 0.1  # added to each eigenvalue, times their mean: near-empty directions are not blown up


def feature_stats(cache_uris: list[str], normalize: dict[str, str], max_shards: int = 16,
                  max_vectors: int = 262_144) -> dict[str, dict]:
    """For each modality in `normalize` (modality -> "standardize" or "whiten"): the mean of the cached feature
    vectors, and their per-dimension std or ZCA whitening matrix Σ^(-1/2), over the items of the first
    `max_shards` shards of each cache, at most `max_vectors` vectors (enough for stable statistics, cheap on a
    cluster's driver)."""
    import numpy as np

    from preprocessing.cache.reader import FeatureCache

    moments = {}  # modality -> [n, sum x, sum x x^T]
    for uri in cache_uris:
        cache = FeatureCache(uri)
        if cache.modality not in normalize:
            continue
        for index in range(min(len(cache.shards), max_shards)):
            n, total, outer = moments.setdefault(cache.modality, [0, 0.0, 0.0])
            if n >= max_vectors:
                break
            items = [a for s in cache.read_shard(index) for name, a in s["arrays"].items() if name.startswith("item")]
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


def over_length_in_caches(cache_uris: list[str], mm_config: dict, max_length: int) -> int | None:
    """Prints, per cache, how many samples exceed `max_length` with this model's projectors (from the manifests'
    recorded lengths, before any worker starts; training skips and names them). The total, or None when a cache
    predates recorded lengths."""
    from modrwkv.multimodal import ModRWKVConfig
    from preprocessing.cache.reader import FeatureCache

    projectors, total = ModRWKVConfig.from_dict(mm_config).projectors, 0
    for uri in cache_uris:
        cache = FeatureCache(uri)
        over = cache.over_length(max_length, projectors[cache.modality].compressed_length)
        if over is None:
            print(f"{uri}: encoded before sample lengths were recorded; over-long samples are counted as met")
            return None
        if over:
            print(f"{uri}: {len(over)} of {len(cache)} samples are over max_length {max_length} and will be skipped, "
                  f"e.g. {over[0]['key']} ({over[0]['tokens']} tokens)")
        total += len(over)
    return total


def backbone_config(config: TrainConfig):
    from modrwkv.checkpoint import infer_config, read_rwkv_pth
    from modrwkv.config import RWKV7Config

    path = Path(config.model.backbone.path)
    if path.is_dir():
        return RWKV7Config.from_dict(json.loads((path / "config.json").read_text()))
    return infer_config(read_rwkv_pth(path), path)


def phase_dir(config: TrainConfig, phase: int) -> Path:
    return Path(config.output_dir).absolute() / config.name / f"phase{phase}"


def run_train(config: TrainConfig, phase: int, resume_from: str | None = None) -> TrainResult:
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_loop import train_loop_per_worker

    start = time.perf_counter()
    hp = config.phase1 if phase == 1 else config.phase2
    caches = resolve_caches(hp.caches or config.caches)
    bb_config = backbone_config(config)
    mm_config = model_config(config, bb_config, caches)
    init_from = None
    if phase == 2:
        init_from = phase_dir(config, 1) / "model"
        if not (init_from / BACKBONE_REF).is_file():
            raise FileNotFoundError(f"{init_from}: no phase I output; run `modrwkv train --phase 1` first")
    out = phase_dir(config, phase)
    out.mkdir(parents=True, exist_ok=True)

    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    tags = {"phase": str(phase), "feature_caches": json.dumps(caches),
            "feature_cache_ids": ",".join(Path(c.rstrip("/")).name for c in caches)}
    if phase == 2:
        tags["phase1_run_id"] = json.loads((init_from / BACKBONE_REF).read_text())["run_id"]
    run_name = config.tracking.run_name or f"{config.name}-phase{phase}"
    run_id = tracking.start_run(uri, config.tracking.experiment, run_name,
                                {**to_dict(config), "phase": phase, "resolved_caches": caches}, tags)
    print(f"MLflow run {run_id} at {uri}")

    with tracking.run_status(uri, run_id):  # FINISHED, FAILED or KILLED, with an end time
        tracking.log_caches(uri, run_id, caches)
        over = over_length_in_caches(caches, mm_config, config.max_length)
        if over is not None:
            tracking.MetricLogger(uri, run_id).log({"over_length_in_caches": over}, 0)
        if not ray.is_initialized():
            ray.init(address=config.scaling.ray_address, log_to_driver=False)
        normalized = {m: p["normalize"] for m, p in mm_config["projectors"].items() if p["normalize"] != "none"}
        stats = feature_stats(caches, normalized) if phase == 1 else {}  # phase II reads phase I's buffers
        loop_config = {"phase": phase, "hp": dataclasses.asdict(hp), "caches": caches, "model": mm_config,
                       "backbone": {"path": absolute(config.model.backbone.path)},
                       "init_from": str(init_from) if init_from else None, "feature_stats": stats,
                       "deepspeed": dataclasses.asdict(config.deepspeed), "max_length": config.max_length,
                       "prefetch_threads": config.prefetch_threads,
                       "seed": config.seed, "tracking_uri": uri, "run_id": run_id,
                       "system_metrics_every_s": config.tracking.system_metrics_every_s}
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
                                         resources_per_worker={"CPU": config.scaling.cpus_per_worker}),
            # one Ray run per MLflow run: Ray Train resumes any run whose name it finds in storage, and a new
            # `modrwkv train` must start fresh (resuming is --resume-from, or a restart inside this fit)
            run_config=RunConfig(name=f"{config.name}-phase{phase}-{run_id[:8]}", storage_path=str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=config.scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            resume_from_checkpoint=Checkpoint(resume_from) if resume_from else None,
        )
        with tracking.StepProgress(uri, run_id, hp.steps, f"{config.name} phase {phase}"):
            result = trainer.fit()
        model_dir = export_model(result.checkpoint, out, config, phase, run_id)
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
    reference = {"run_id": run_id, "phase": phase, "path": absolute(config.model.backbone.path)}
    (out / "model" / BACKBONE_REF).write_text(json.dumps(reference, indent=1) + "\n")
    return out / "model"


def log_artifacts(uri: str, run_id: str, config: TrainConfig, model_dir: Path, out: Path, phase: int) -> None:
    from mlflow import MlflowClient

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

    from modrwkv.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
