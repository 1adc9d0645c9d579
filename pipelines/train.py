"""`modrwkv train --config configs/*/train*.yaml --phase 1|2`: Ray Train workers, one DeepSpeed engine each,
reading the feature cache; MLflow tracks the run.

Phase I trains the projectors (Conv1D compression + adapter), the forecast head and WaveNet at a high lr on
a frozen backbone and saves them adapter-only; phase II loads that output and trains the backbone too.
The driver resolves the caches (an encode YAML is encoded or found in the cache), builds the model config
from the cached feature widths, creates the MLflow run, and exports the final model from the last
checkpoint; workers run the loop in `train_loop.py`.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from mlflow import MlflowClient
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from modrwkv.model_folder import write_records
from infra.local_ray import init_ray
from preprocessing import storage
from preprocessing.cache.entry import entry_name

from . import tracking
from .config import load_config
from .stop_signals import stop_signals_abort_ray_train
from .logged_models import encoder_dirs, log_trained_model, register
from .schedule import lr_at, schedule_of
from .train_config import TrainConfig, train_overrides
from .train_loop import WorkerConfig, train_loop_per_worker
from .train_setup import backbone_sha256, encoder_store_keys, plan_phase, skipped_in_caches
from .trainer import check_position, stream_order, worker_epochs

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
    model_dir: Path  # on this machine
    metrics: dict
    seconds: float
    model_id: str  # the logged model of model_dir
    model_uri: str  # where the model folder was published: model_dir, or its copy under an s3:// output_dir


def run_train(config: TrainConfig, phase: int, resume_from: str | None = None) -> TrainResult:
    start = time.perf_counter()
    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    tracking.check_reachable_by_workers(uri, config.scaling.ray_address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():  # before the plan, whose encodes (a collection's folder tasks) would start one
        init_ray(config.scaling.ray_address, log_to_driver=False)
    plan = plan_phase(config, phase, config.scaling.workers)
    hp, caches, opened, mm_config, init_from, out = (plan.hp, plan.caches, plan.opened, plan.model, plan.init_from,
                                                     plan.out)
    checkpoint = Checkpoint(*storage.for_ray(resume_from)) if resume_from else None
    if checkpoint:
        check_resumable(checkpoint.get_metadata(), resume_from, plan, phase, config)
    tags = {"phase": str(phase), "feature_caches": json.dumps(caches),
            "feature_cache_ids": ",".join(map(entry_name, caches))}
    if phase == 2 and (plan.phase1_source or {}).get("run_id"):  # none after an untracked single-process phase I
        tags["phase1_run_id"] = plan.phase1_source["run_id"]
    if checkpoint:  # the run this one continues, and from where (checkpoints before 2026-12-07 name no run)
        tags["resumed_from"] = tracking.redact(resume_from)
        if checkpoint.get_metadata().get("run_id"):
            tags["resumed_from_run_id"] = checkpoint.get_metadata()["run_id"]
    run_id = tracking.start_training_run(uri, config, phase, caches, tags)

    with tracking.run_status(uri, run_id):  # FINISHED, FAILED or KILLED, with an end time
        tracking.log_caches(uri, run_id, caches, left_out=plan.left_out)
        before_start = tracking.MetricLogger(uri, run_id)
        before_start.log(skipped_in_caches(opened, mm_config, config.max_length, plan.left_out), 0)
        before_start.flush()
        stats = plan.feature_stats()
        loop_config = WorkerConfig(
            phase=phase, hp=hp, caches=caches, weights=plan.weights, model=mm_config, backbone=plan.backbone,
            init_from=init_from, feature_stats=stats, deepspeed=config.deepspeed,
            max_length=config.max_length, packing=config.packing, pack_buffer=config.pack_buffer,
            prefetch_threads=config.prefetch_threads, seed=config.seed,
            tracking_uri=uri, run_id=run_id, system_metrics_every_s=config.tracking.system_metrics_every_s,
            use_gpu=config.scaling.use_gpu, gradient_checkpointing=config.gradient_checkpointing,
            log_checkpoints=config.tracking.log_checkpoints, encoders=encoder_store_keys(opened),
            resume_from=checkpoint, s3=storage.settings())
        storage_path, storage_filesystem = storage.for_ray(storage.join(plan.destination, "ray"))  # folder or s3://
        ray_run = f"{config.name}-phase{phase}-{run_id[:8]}"
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
                                         resources_per_worker={"CPU": config.scaling.cpus_per_worker}),
            # one Ray run per MLflow run: Ray Train resumes any run whose name it finds in storage, and a new
            # `modrwkv train` must start fresh (resuming is --resume-from, or a restart inside this fit)
            run_config=RunConfig(name=ray_run, storage_path=storage_path,
                                 storage_filesystem=storage_filesystem,
                                 failure_config=FailureConfig(max_failures=config.scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 worker_runtime_env={"env_vars": worker_env()}))
        with tracking.StepProgress(uri, run_id, hp.steps, f"{config.name} phase {phase}"):
            last_checkpoint = functools.partial(registered_checkpoint, f"{storage_path}/{ray_run}", storage_filesystem,
                                                checkpoint)
            try:
                with stop_signals_abort_ray_train():  # Ray's own SIGINT handler would end the run FAILED
                    result = trainer.fit()
            except BaseException:  # a run that fails for good names those up to its last checkpoint too
                try:
                    log_skipped_samples(uri, run_id, last_checkpoint())
                except Exception as e:  # the training's own error is the one to see
                    print(f"note: the samples skipped up to the last checkpoint could not be named in the run: "
                          f"{tracking.redact(str(e))}", file=sys.stderr)
                raise
            log_skipped_samples(uri, run_id, last_checkpoint())
        encoders = loop_config.encoders
        model_dir = export_model(result.checkpoint, out, plan.backbone, phase, run_id, encoders)
        log_artifacts(uri, run_id, config, out, phase)
        model_id = log_trained_model(uri, run_id, model_dir, phase, hp.steps, plan.drawn,
                                     encoder_dirs(opened, encoders),
                                     storage.join(plan.destination, "model"))
        if phase == 2 and config.tracking.register_as:
            register(uri, model_id, config.tracking.register_as)
        model_uri = plan.publish()
        metrics = dict(result.metrics or {})
        print(f"phase {phase} done in {time.perf_counter() - start:.0f} s: step {metrics.get('step')}, "
              f"loss {metrics.get('loss', float('nan')):.4f}; model in {model_uri}")
    return TrainResult(run_id, model_dir, metrics, time.perf_counter() - start, model_id, model_uri)


def registered_checkpoint(ray_run: str, filesystem, resumed: Checkpoint | None) -> Checkpoint | None:
    """The last checkpoint Ray registered for this run; before its first, the one it resumed from (if any)."""
    try:
        return Result.from_path(ray_run, filesystem).checkpoint or resumed
    except RuntimeError:  # no run folder or checkpoint record yet
        return resumed


def log_skipped_samples(uri: str, run_id: str, checkpoint: Checkpoint | None) -> None:
    """Names in the MLflow run the samples training left out up to `checkpoint` (its metadata's), as a resume from
    it knows them."""
    if checkpoint:
        tracking.log_skipped_samples(uri, run_id, checkpoint.get_metadata().get("skipped_samples", []))


def export_model(checkpoint, out: Path, backbone: dict, phase: int, run_id: str, encoders: dict) -> Path:
    """The final checkpoint's save_pretrained folders (model/, and adapter/ after phase II), copied out of
    Ray's storage, the model's with what the driver knows recorded (its backbone, its encoders); returns the
    model folder."""
    with checkpoint.as_directory() as d:
        if not (Path(d) / "model").is_dir():
            raise FileNotFoundError(f"{d}: the final checkpoint has no model/ folder")
        for name in ("model", "adapter"):
            if (out / name).exists():
                shutil.rmtree(out / name)
            if (Path(d) / name).is_dir():
                shutil.copytree(Path(d) / name, out / name)
    write_records(out / "model", {"run_id": run_id, "phase": phase, **backbone}, encoders)
    return out / "model"


def check_same_backbone(saved: dict, now: dict, resume_from: str) -> None:
    """Phase I's checkpoints hold no backbone (frozen): a resume builds it from the config's path, which must hold
    the saved run's weights. One record is the same backbone; else their sha256 are compared (a URI's record holds
    it, a local file's is read: the same weights at another mount are taken); a saved local path this machine
    cannot read is let through with a note."""
    if saved == now:
        return
    hashes = [backbone_sha256(saved), backbone_sha256(now)]
    if None in hashes:
        print(f"note: {resume_from} trained its adapter on the backbone {saved['path']}, which this machine cannot "
              f"read; resuming on {now['path']}, unchecked", file=sys.stderr)
    elif hashes[0] != hashes[1]:
        raise ValueError(f"{resume_from}: phase I trained its adapter on the backbone {saved['path']} (sha256 "
                         f"{hashes[0][:12]}), this config names {now['path']} ({hashes[1][:12]}): point "
                         "model.backbone.path at the saved one, or start phase I anew")


def check_resumable(saved: dict, resume_from: str, plan, phase: int, config: TrainConfig) -> None:
    """What the workers would refuse after loading the checkpoint, refused before any run starts (a checkpoint
    written before its metadata held these is left to the workers): another phase's checkpoint, a phase already at
    its last step, which would run nothing, weight decay turned on or off (the optimizer's groups differ), and data
    positions saved over other entries or epochs, or in another order (another seed or packing:
    `trainer.check_position`), and for phase I other backbone weights than the saved run's. A schedule other than
    the checkpoint's is let through with a note of the lr it resumes at, and the saved run's there."""
    world = config.scaling.workers
    if saved.get("phase", phase) != phase:  # else the workers' load fails on missing tensors, or phase I's takes II's
        raise ValueError(f"{resume_from}: a phase {saved['phase']} checkpoint cannot resume phase {phase}")
    if phase == 1 and "backbone" in saved:  # phase II's checkpoints hold their backbone
        check_same_backbone(saved["backbone"], plan.backbone, resume_from)
    decay = plan.hp.weight_decay
    if (saved.get("weight_decay", decay) > 0) != (decay > 0):  # a decay changed between two others is taken
        raise ValueError(f"{resume_from}: saved with weight_decay {saved['weight_decay']}, resumed with {decay}: its "
                         "optimizer state has a parameter group for the decayed matrices only when the decay is above "
                         f"0; set phase{phase}.weight_decay {'above 0' if saved['weight_decay'] else 'to 0'}")
    steps, step = plan.hp.steps, saved.get("step", 0)
    if step >= steps:  # the workers would run no step, and report no checkpoint
        raise ValueError(f"{resume_from}: saved at step {step}, the last of phase {phase}'s {steps}: nothing to "
                         f"resume (its model is in {plan.destination}); with phase{phase}.steps raised it trains on, "
                         "its lr from then on the longer schedule's (partway up its cosine, not where this run's "
                         "ended)")
    now = schedule_of(plan.hp)
    if saved.get("schedule", now) != now:
        print(f"note: {resume_from} was saved by a run scheduled {saved['schedule']}, this one is {now}: step "
              f"{step + 1} runs at lr {lr_at(now, step):.3g}, where the saved run's would be "
              f"{lr_at(saved['schedule'], step):.3g}", file=sys.stderr)
    if "epochs" not in saved:
        return
    if len(saved["epochs"]) != world:
        raise ValueError(f"{resume_from}: saved by {len(saved['epochs'])} workers, resumed by {world}")
    entries = [entry_name(c.uri) for c in plan.opened]
    for rank, epoch in enumerate(saved["epochs"]):
        now = worker_epochs(plan.opened, plan.weights, rank, world)
        order = stream_order(config.seed, config.pack_buffer if config.packing else 0, now, config.max_length,
                             plan.model.projectors)
        check_position({"entries": saved["entries"], "epoch": epoch,
                        **({"order": saved["orders"][rank]} if "orders" in saved else {})}, now, entries, rank, order)


def log_artifacts(uri: str, run_id: str, config: TrainConfig, out: Path, phase: int) -> None:
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(yaml.safe_dump(tracking.logged_config(config), sort_keys=False))
        client.log_artifact(run_id, str(cfg))
        history = tracking.latest_per_step(client.get_metric_history(run_id, "loss"))
        client.log_artifact(run_id, str(tracking.loss_curve(history, Path(tmp) / "loss_curve.png",
                                                            f"{config.name} phase {phase}")))
    adapter = out / ("model" if phase == 1 else "adapter") / "adapter.safetensors"
    client.log_artifact(run_id, str(adapter), "adapter")


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config, TrainConfig, train_overrides(args))
    run_train(config, args.phase, args.resume_from)


# `python -m pipelines.train ...`, the job command for `ray job submit`: same flags as `modrwkv train`
if __name__ == "__main__":
    from pipelines.cli import main as cli_main  # the CLI imports this module: only the `-m` entry needs it

    sys.exit(cli_main(["train", *sys.argv[1:]]))
