"""`modrwkv train --config ... --phase N --single-process`: one phase in this process, no Ray or DeepSpeed.

The same resolution as the cluster driver (`train.py`: caches, model config, feature statistics, phase I's
output for phase II), then the training core (`trainer.py`) with a `LocalEngine`, on the GPU when there is one.
Metrics go to the console and, when a tracking URI is configured (the config's `tracking.tracking_uri` or
MLFLOW_TRACKING_URI), to an MLflow run, which ends FINISHED, FAILED or KILLED as the cluster driver's does; MLflow
is not imported otherwise. The model folder is written where the cluster driver writes it, so phase II, evaluation
and chat read either alike.
"""

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

from modrwkv.batching import Collator
from modrwkv.tokenizer import WorldTokenizer
from preprocessing import storage

from .config import load_config
from .train_config import TrainConfig, train_overrides
from .train_setup import PhasePlan, encoder_store_keys, plan_phase, skipped_in_caches
from .trainer import LocalEngine, MicroBatches, accumulation_steps, build_model, optimizer_for, train_steps


def configured_tracking_uri(config: TrainConfig) -> str | None:
    return config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def run_single_process(config: TrainConfig, phase: int, device: str | None = None) -> tuple[Path, list[dict]]:
    """Trains one phase; returns the model folder on this machine (under an s3:// output_dir, a copy of the
    published one) and every step's metrics."""
    uri = configured_tracking_uri(config)
    if phase == 2 and config.tracking.register_as and not uri:  # before training, not silently after it
        raise ValueError(f"tracking.register_as {config.tracking.register_as!r}: registering needs MLflow, which one "
                         "process uses only when told where: set tracking.tracking_uri or MLFLOW_TRACKING_URI")
    plan = plan_phase(config, phase, world=1)
    hp, opened, out = plan.hp, plan.opened, plan.out
    logger = mlflow_logger(config, phase, plan, uri) if uri else None
    skipped = []  # train_steps extends it as it goes: a failed run names those left out before it failed too
    with tracked_run(logger, skipped):
        known_skips = skipped_in_caches(opened, plan.model, config.max_length, plan.left_out)
        if logger:
            log_before_training(logger, plan.caches, known_skips, plan.left_out)

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(plan.backbone["path"], plan.model,
                            plan.init_from, plan.feature_stats(), config.seed,
                            config.gradient_checkpointing).to(device)
        model.set_phase(phase)
        optimizer = optimizer_for(model, hp)
        engine = LocalEngine(model, optimizer, accumulation_steps(hp, world=1), hp.grad_clip)
        collator = Collator(WorldTokenizer(), model.config, config.max_length, skip_bad_samples=True)
        batches = MicroBatches(opened, collator, hp.micro_batch, 0, 1, config.seed, plan.weights, None,
                               config.prefetch_threads, config.pack_buffer if config.packing else 0)

        history, started = [], time.perf_counter()
        encoders = encoder_store_keys(opened)

        def save(folder: Path, step: int) -> None:
            model.save_pretrained(folder, adapter_only=phase == 1, encoders=encoders,
                                  backbone_source={"run_id": logger.run_id if logger else None, "phase": phase,
                                                   **plan.backbone, "step": step})

        def on_step(step: int, metrics: dict) -> None:
            history.append({"step": step, **metrics})
            print(f"phase {phase} step {step}/{hp.steps}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.2e}, "
                  f"{metrics['tokens_per_s']:.0f} tokens/s", flush=True)
            if logger:
                logger.log(metrics, step)
                if config.tracking.log_checkpoints and hp.checkpoint_every and step % hp.checkpoint_every == 0 \
                        and step < hp.steps:  # the final model is logged with its encoders below
                    from .logged_models import log_trained_model

                    save(out / "checkpoints" / f"step-{step:06d}", step)
                    log_trained_model(uri, logger.run_id, out / "checkpoints" / f"step-{step:06d}", phase, step,
                                      plan.drawn, {})

        train_steps(engine, optimizer, batches, hp, on_step=on_step, skipped=skipped)
        save(out / "model", hp.steps)
        if phase == 2:
            model.save_pretrained(out / "adapter", adapter_only=True)
        if skipped:
            print(f"{len(skipped)} samples left out, e.g. {skipped[0]}")
        if logger:
            finish_mlflow_run(logger, config, plan, phase, history, skipped, encoders)
        model_uri = plan.publish()
    print(f"phase {phase} done in {time.perf_counter() - started:.0f} s: loss {history[-1]['loss']:.4f}; "
          f"model in {model_uri}")
    return out / "model", history


def mlflow_logger(config: TrainConfig, phase: int, plan: PhasePlan, uri: str):
    from . import tracking  # only when a run is tracked: this driver runs without MLflow

    tags = {"phase": str(phase), "driver": "single-process"}
    if phase == 2 and (plan.phase1_source or {}).get("run_id"):  # as the cluster driver links phase II to phase I
        tags["phase1_run_id"] = plan.phase1_source["run_id"]
    run_id = tracking.start_training_run(uri, config, phase, plan.caches, tags)
    return tracking.MetricLogger(uri, run_id)


@contextlib.contextmanager
def tracked_run(logger, skipped: list[dict]):
    """A tracked run ends FINISHED, FAILED or KILLED, as the cluster driver's does (`tracking.run_status`); one
    that fails keeps the metrics of the steps it took and names the samples it had left out (`skipped`)."""
    if logger is None:
        yield
        return
    from . import tracking

    with tracking.run_status(logger.uri, logger.run_id):
        try:
            yield
        except BaseException:
            logger.flush()
            tracking.log_skipped_samples(logger.uri, logger.run_id, skipped)
            raise


def log_before_training(logger, caches: list[str], known_skips: dict[str, int], left_out: list[str]) -> None:
    """What the cluster driver logs before its workers start: the caches read (and those left out of the draw), and
    how many of their samples training will skip by their manifests (`skipped_in_caches`)."""
    from . import tracking

    tracking.log_caches(logger.uri, logger.run_id, caches, left_out=left_out)
    logger.log(known_skips, 0)


def finish_mlflow_run(logger, config: TrainConfig, plan: PhasePlan, phase: int, history: list[dict],
                      skipped: list[dict], encoders: dict) -> None:
    from . import tracking
    from .logged_models import encoder_dirs, log_trained_model, register

    logger.flush()
    with tempfile.TemporaryDirectory() as tmp:
        curve = [(h["step"], h["loss"]) for h in history]
        logger.client.log_artifact(logger.run_id, str(tracking.loss_curve(curve, Path(tmp) / "loss_curve.png",
                                                                          f"{config.name} phase {phase}")))
    tracking.log_skipped_samples(logger.uri, logger.run_id, skipped)
    model_id = log_trained_model(logger.uri, logger.run_id, plan.out / "model", phase, history[-1]["step"],
                                 plan.drawn, encoder_dirs(plan.opened, encoders),
                                 storage.join(plan.destination, "model"))
    if phase == 2 and config.tracking.register_as:
        register(logger.uri, model_id, config.tracking.register_as)


def main(args: argparse.Namespace) -> None:
    if args.resume_from:
        raise ValueError("--resume-from continues a Ray Train checkpoint; --single-process starts a phase afresh")
    # this process is the one worker: global_batch need only be a multiple of micro_batch here
    config = load_config(args.config, TrainConfig, {**train_overrides(args), "scaling.workers": 1})
    run_single_process(config, args.phase)
