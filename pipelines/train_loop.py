"""What every Ray Train worker runs: the training core (`trainer.py`) around a DeepSpeed engine, on its share of
the feature caches; checkpoints go through `ray.train.report`, metrics to MLflow from rank 0."""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import torch.distributed as dist
from ray.train import Checkpoint

from modrwkv.batching import Collator
from modrwkv.model_folder import write_records
from modrwkv.multimodal import ModRWKVConfig
from modrwkv.tokenizer import WorldTokenizer
from preprocessing import storage
from preprocessing.cache.entry import FeatureCache

from .environment import require_cuda
from .logged_models import log_trained_model
from .schedule import schedule_of
from .tracking import MetricLogger, log_environment, system_metrics
from .deepspeed_engine import save_final, start_engine
from .train_config import DeepSpeedConfig, PhaseConfig
from .trainer import MicroBatches, build_model, train_steps


@dataclass
class WorkerConfig:
    """What the driver hands every worker (through Ray, as this object)."""

    phase: int
    hp: PhaseConfig
    caches: list[str]  # cache URIs every worker can open
    weights: list[float]  # each cache's in the draw of micro-batches (`caches.draw_weights`)
    model: ModRWKVConfig
    backbone: dict  # its record: {"path": a folder, .pth or s3:// URI, "sha256" for a URI}
    init_from: str | None  # phase II: phase I's output folder
    # modality -> the training features' mean and std or whitening (phase I); not in the repr, which Ray Train shows
    # as the run's loop config (a 1152-wide whitening matrix alone is 27 MB of text)
    feature_stats: dict = field(repr=False)
    deepspeed: DeepSpeedConfig
    max_length: int
    packing: bool
    pack_buffer: int
    prefetch_threads: int
    seed: int
    tracking_uri: str = field(repr=False)  # may hold credentials (`tracking.redact`); not in the repr either
    run_id: str
    system_metrics_every_s: float
    use_gpu: bool = False  # scaling.use_gpu: a worker that sees no CUDA device then fails
    gradient_checkpointing: bool = False
    log_checkpoints: bool = False  # each checkpoint's model folder a logged model of the run (rank 0)
    encoders: dict | None = None  # modality -> the caches' encoder settings, recorded in those folders
    resume_from: Checkpoint | None = None  # `--resume-from`: where a fresh run starts (Ray's own restarts win)
    s3: storage.Settings | None = None  # the driver's S3 settings and MLflow credentials, applied first (not in the
    # runtime env)


def train_loop_per_worker(cfg: WorkerConfig) -> None:
    if cfg.s3:
        cfg.s3.apply()
    on_gpu = cfg.use_gpu
    if on_gpu:
        require_cuda("scaling.use_gpu")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hp, phase = cfg.hp, cfg.phase
    monitor = None
    if ctx.get_local_rank() == 0:  # once per machine
        node = f"node{ctx.get_node_rank()}" if ctx.get_local_world_size() < world else None
        log_environment(cfg.tracking_uri, cfg.run_id, node)
        if cfg.system_metrics_every_s:
            monitor = system_metrics(cfg.tracking_uri, cfg.run_id, node, cfg.system_metrics_every_s)
    model = build_model(cfg.backbone["path"], cfg.model, cfg.init_from, cfg.feature_stats, cfg.seed,
                        cfg.gradient_checkpointing)
    model.set_phase(phase)
    engine, optimizer = start_engine(model, hp, cfg.deepspeed, world, on_gpu)
    step, position, skipped = 0, None, []
    # after a failure inside this fit, Ray's latest checkpoint; otherwise the one --resume-from names (Ray Train 2
    # refuses a trainer's resume_from_checkpoint)
    checkpoint = ray.train.get_checkpoint() or cfg.resume_from
    if checkpoint:
        with checkpoint.as_directory() as d:
            # the frozen backbone is not in phase I's checkpoints: it comes from its path, as built above
            frozen = any(not p.requires_grad for p in model.parameters())
            path, client_state = engine.load_checkpoint(d, tag="ds", load_module_strict=not frozen)
            if path is None:  # DeepSpeed returns (None, None) instead of raising
                raise FileNotFoundError(f"{d}: no DeepSpeed checkpoint to resume from")
            step, positions = client_state["step"], client_state["data_positions"]
            if len(positions) != world:
                raise ValueError(f"{d}: saved by {len(positions)} workers, resumed by {world}")
            position = positions[rank]
            skipped = client_state.get("skipped_samples", [[]] * world)[rank]  # absent: saved before it was kept

    caches = [FeatureCache(u) for u in cfg.caches]
    collator = Collator(WorldTokenizer(), model.config, cfg.max_length, skip_bad_samples=True)
    batches = MicroBatches(caches, collator, hp.micro_batch, rank, world, cfg.seed, cfg.weights, position,
                           cfg.prefetch_threads, cfg.pack_buffer if cfg.packing else 0)
    logger = MetricLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 else None
    if logger and step:
        logger.log({"resumed_from_step": step}, step)

    def on_step(step: int, metrics: dict) -> None:
        last = step == hp.steps
        if logger:
            logger.log(metrics, step)
            if last:  # every step's metrics in MLflow before the final checkpoint ends the run
                logger.flush()
        if last or (hp.checkpoint_every and step % hp.checkpoint_every == 0):
            positions, everyone_skipped = gather(batches.position(), world), gather(skipped, world)
            with tempfile.TemporaryDirectory() as d:
                # without the frozen weights: a 1.5B backbone is 3 GB in bf16, every checkpoint_every steps
                engine.save_checkpoint(d, tag="ds", exclude_frozen_parameters=True, client_state={
                    "step": step, "data_positions": positions, "skipped_samples": everyone_skipped})
                if last or cfg.log_checkpoints:
                    save_final(engine, Path(d), phase, rank)
                if cfg.log_checkpoints and not last and rank == 0:  # the final one: the driver's, with encoders
                    write_records(Path(d) / "model", encoders=cfg.encoders, backbone_source={
                        "run_id": cfg.run_id, "phase": phase, **cfg.backbone, "step": step})
                    drawn = [cache for cache, weight in zip(caches, cfg.weights) if weight > 0]  # not left_out
                    log_trained_model(cfg.tracking_uri, cfg.run_id, Path(d) / "model", phase, step, drawn, {})
                checkpoint = Checkpoint.from_directory(d)
                # what a resume checks before it starts workers
                checkpoint.set_metadata({"phase": phase, "step": step, "run_id": cfg.run_id,
                                         "entries": positions[0]["entries"], "epochs": [p["epoch"] for p in positions],
                                         "orders": [p["order"] for p in positions], "schedule": schedule_of(hp),
                                         "weight_decay": hp.weight_decay, "backbone": cfg.backbone,
                                         # the driver names them from the checkpoint Ray registered (a worker's
                                         # own log could run ahead of it), as a resume from it knows them
                                         "skipped_samples": [{**s, "rank": r} for r, part in
                                                             enumerate(everyone_skipped) for s in part]})
                ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)

    train_steps(engine, optimizer, batches, hp, step, on_step, skipped)  # the last step checkpoints
    if monitor:
        monitor.finish()  # logs what it holds; after a crash it stops by itself once the run is no longer RUNNING


def gather(value, world: int) -> list:
    """Every rank's `value`, in rank order (a collective: every rank calls it)."""
    if not (dist.is_initialized() and world > 1):
        return [value]
    everyone = [None] * world
    dist.all_gather_object(everyone, value)
    return everyone
