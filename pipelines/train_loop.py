"""What every Ray Train worker runs: the model, a DeepSpeed engine, its share of the feature cache, and the
phase's optimizer steps; checkpoints go through `ray.train.report`, metrics to MLflow from rank 0."""

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from modrwkv import RWKV7
from modrwkv.batching import Collator, first_fit_decreasing
from modrwkv.multimodal import ModRWKV, ModRWKVConfig
from modrwkv.tokenizer import WorldTokenizer
from preprocessing.cache.entry import FeatureCache

from .schedule import warmup_cosine
from .tracking import MetricLogger, log_environment, system_metrics
from .train_config import DeepSpeedConfig, PhaseConfig


@dataclass
class WorkerConfig:
    """What the driver hands every worker (through Ray, as this object)."""

    phase: int
    hp: PhaseConfig
    caches: list[str]  # cache URIs every worker can open
    model: ModRWKVConfig
    backbone_path: str
    init_from: str | None  # phase II: phase I's output folder
    feature_stats: dict  # modality -> the training features' mean and std or whitening (phase I)
    deepspeed: DeepSpeedConfig
    max_length: int
    packing: bool
    pack_buffer: int
    prefetch_threads: int
    seed: int
    tracking_uri: str
    run_id: str
    system_metrics_every_s: float


def build_model(cfg: WorkerConfig) -> ModRWKV:
    backbone = RWKV7.from_pretrained(cfg.backbone_path)
    if cfg.init_from:  # phase II starts from phase I's projectors
        return ModRWKV.from_pretrained(cfg.init_from, backbone=backbone)
    torch.manual_seed(cfg.seed)
    model = ModRWKV(cfg.model, backbone=backbone)
    for modality, stats in cfg.feature_stats.items():  # the driver's statistics of the training features
        model.projectors[modality].set_feature_stats(stats["mean"], stats.get("std"), stats.get("whitening"))
    return model


def deepspeed_config(hp: PhaseConfig, ds: DeepSpeedConfig, world: int, on_gpu: bool) -> dict:
    per_step = hp.micro_batch * world
    if hp.global_batch % per_step:
        raise ValueError(f"global_batch {hp.global_batch} is not a multiple of micro_batch x workers = {per_step}")
    config = {"train_micro_batch_size_per_gpu": hp.micro_batch,
              "gradient_accumulation_steps": hp.global_batch // per_step, "gradient_clipping": hp.grad_clip,
              "zero_optimization": {"stage": ds.zero_stage}, "bf16": {"enabled": on_gpu},
              "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed refuses a client optimizer under offload unless told, for fear of a slow CPU step; ours is
        # torch's fused AdamW (one pass per partition), and its DeepSpeedCPUAdam is a C++ op built on first use
        config["zero_force_ds_cpu_optimizer"] = False
    return config


class RowPacker:
    """One cache's samples as rows of up to max_length tokens: `buffer` samples read at a time (the cache's order
    is already shuffled) and packed first-fit decreasing; their rows are handed out in a seeded shuffle (first-fit
    decreasing makes the rows of the longest samples first), then the next buffer is read.

    Its position is the samples read before the current buffer (`start`) and the rows handed out of it (`used`):
    reading that buffer again packs and orders the same rows."""

    def __init__(self, samples, collator, buffer: int, cache_size: int, uri: str, seed: int, start: int = 0,
                 used: int = 0):
        self.samples, self.collator, self.buffer = samples, collator, buffer
        self.cache_size, self.uri, self.seed = cache_size, uri, seed
        self.rows, self.start, self.read, self.used, self.skipped = [], start, 0, 0, []
        if used:  # resuming inside a buffer: read it again, skip what was handed out
            self.fill()
            self.used = used

    def fill(self) -> None:
        for _ in range(self.cache_size // self.buffer + 1):  # every sample over-long: read on, a pass at most
            self.start, self.read, self.used = self.start + self.read, self.buffer, 0
            encoded, skipped = self.collator.encode_all([next(self.samples) for _ in range(self.buffer)])
            self.skipped += skipped
            if encoded:
                break
        else:
            raise ValueError(f"{self.uri}: every sample drawn is over max_length "
                             f"({len(self.skipped)} in a row, e.g. {self.skipped[0]})")
        bins = first_fit_decreasing([len(e.ids) for e in encoded], self.collator.max_length)
        random.Random(f"{self.seed}/{self.start}").shuffle(bins)
        self.rows = [[encoded[i] for i in row] for row in bins]

    def next_row(self) -> list:
        if self.used == len(self.rows):
            self.fill()
        self.used += 1
        return self.rows[self.used - 1]

    def take(self, n: int):
        """A packed micro-batch of `n` rows, with the over-long samples left out since the last one."""
        rows = [self.next_row() for _ in range(n)]
        batch = self.collator.pack(rows, self.skipped)
        self.skipped = []
        return batch


class MicroBatches:
    """Endless (cache modality, micro-batch) pairs, each batch from one cache drawn with weights `mix` (default:
    sample counts). Every rank draws the same cache for the same micro-step (one shared seed), so all ranks run
    the same modality's projector together. The modality is the cache's: a batch of an image cache may hold
    text-only samples (LLaVA's data does), and its per-modality loss still counts as the cache's.

    A micro-batch is `micro` samples, right-padded; or with `pack_buffer` > 0, `micro` rows of up to max_length
    tokens packed from buffers of that many samples (`RowPacker`).

    `position()` is plain counts (caches drawn; per cache, the samples taken, and when packing, taken before the
    current buffer and the rows handed out of it); a stream built with it continues exactly where the first one
    stood, reading no shard before that point."""

    def __init__(self, caches: list, collator, micro: int, rank: int, world: int, seed: int, mix=None,
                 position: dict | None = None, prefetch: int = 4, pack_buffer: int = 0):
        self.caches, self.collator, self.micro, self.seed = caches, collator, micro, seed
        self.rank, self.world, self.prefetch = rank, world, prefetch
        self.weights = mix or [len(c) for c in caches]
        if position is None:
            position = {"draws": 0, "taken": [0] * len(caches)}
            if pack_buffer:
                position["rows"] = [0] * len(caches)
        if len(position["taken"]) != len(caches):
            raise ValueError(f"a data position for {len(position['taken'])} caches cannot resume {len(caches)}")
        if ("rows" in position) != bool(pack_buffer):
            saved, now = ("on" if "rows" in position else "off"), ("on" if pack_buffer else "off")
            raise ValueError(f"a data position saved with packing {saved} cannot resume a run with packing {now}")
        self.draws, self.taken = 0, list(position["taken"])
        self.pick = random.Random(seed)
        for _ in range(position["draws"]):  # the cache choices are a seeded sequence: replaying them reads nothing
            self.draw()
        self.streams = [self.stream(i) for i in range(len(caches))]
        self.packers = [RowPacker(self.streams[i], collator, pack_buffer, len(c), c.uri, seed, position["taken"][i],
                                  position["rows"][i]) for i, c in enumerate(caches)] if pack_buffer else None

    def position(self) -> dict:
        if self.packers is None:
            return {"draws": self.draws, "taken": list(self.taken)}
        return {"draws": self.draws, "taken": [p.start for p in self.packers], "rows": [p.used for p in self.packers]}

    def draw(self) -> int:
        self.draws += 1
        return self.pick.choices(range(len(self.caches)), self.weights)[0]

    def stream(self, i: int):
        cache = self.caches[i]
        epoch, start = divmod(self.taken[i], cache.samples_per_worker(self.world))
        for sample in cache.iter_samples(self.rank, self.world, seed=self.seed, epoch=epoch, start=start,
                                         epochs=None, prefetch=self.prefetch):
            self.taken[i] += 1  # counted before it is handed out: a position taken between draws is exact
            yield sample

    def take(self, i: int):
        return self.collator([next(self.streams[i]) for _ in range(self.micro)])

    def __iter__(self):
        return self

    def __next__(self):
        i = self.draw()
        if self.packers is not None:
            return self.caches[i].modality, self.packers[i].take(self.micro)
        batch, skipped = self.take(i), []
        for _ in range(len(self.caches[i]) // self.micro + 1):  # every sample over-long: draw again, a pass at most
            if batch.sample_ids:
                break
            skipped += batch.skipped
            batch = self.take(i)
        else:
            raise ValueError(f"{self.caches[i].uri}: every sample drawn is over max_length "
                             f"({len(skipped)} in a row, e.g. {skipped[0]})")
        batch.skipped = skipped + batch.skipped
        return self.caches[i].modality, batch


def to_device(batch, device):
    batch.input_ids, batch.labels = batch.input_ids.to(device), batch.labels.to(device)
    if batch.attention_mask is not None:
        batch.attention_mask = batch.attention_mask.to(device)
    batch.features = [[(m, f.to(device)) for m, f in items] for items in batch.features]
    if batch.series_target is not None:
        batch.series_target = batch.series_target.to(device)
    if batch.series_lookback is not None:
        batch.series_lookback = batch.series_lookback.to(device)
    return batch


def all_mean(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def train_loop_per_worker(cfg: WorkerConfig) -> None:
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator once, at import

    if not on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build: over a minute on 2 cores,
        # per install) that only tensor-parallel inference calls; training all-reduces through torch.distributed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hp, phase = cfg.hp, cfg.phase
    monitor = None
    if ctx.get_local_rank() == 0:  # once per machine
        node = f"node{ctx.get_node_rank()}" if ctx.get_local_world_size() < world else None
        log_environment(cfg.tracking_uri, cfg.run_id, node)
        if cfg.system_metrics_every_s:
            monitor = system_metrics(cfg.tracking_uri, cfg.run_id, node, cfg.system_metrics_every_s)
    model = build_model(cfg)
    model.set_phase(phase)
    trainable = model.trainable_parameters()
    groups = model.backbone.optimizer_groups(hp.weight_decay, params=trainable)
    for g in groups:
        g["lr"] = hp.lr * g["lr_scale"]
    # fused: one pass over each flat ZeRO partition; on CPU the default loop form takes 10x as long (0.32 vs 0.03 s
    # for 67M parameters), a sixth of a step of the L6, C512 backbone in benchmarks/train.py
    optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.99), eps=1e-8, fused=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                                   config=deepspeed_config(hp, cfg.deepspeed, world, on_gpu))
    step, position = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            path, client_state = engine.load_checkpoint(d, tag="ds")
            if path is None:  # DeepSpeed returns (None, None) instead of raising
                raise FileNotFoundError(f"{d}: no DeepSpeed checkpoint to resume from")
            step, positions = client_state["step"], client_state["data_positions"]
            if len(positions) != world:
                raise ValueError(f"{d}: saved by {len(positions)} workers, resumed by {world}")
            position = positions[rank]

    caches = [FeatureCache(u) for u in cfg.caches]
    collator = Collator(WorldTokenizer(), model.config, cfg.max_length, skip_over_length=True)
    batches = MicroBatches(caches, collator, hp.micro_batch, rank, world, cfg.seed, hp.mix, position,
                           cfg.prefetch_threads, cfg.pack_buffer if cfg.packing else 0)
    accumulation = engine.gradient_accumulation_steps()
    logger = MetricLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 else None
    if logger and step:
        logger.log({"resumed_from_step": step}, step)
    # every trainable tensor joins every step's graph (x0): ZeRO reduces all of them even when this
    # micro-batch's modality leaves a projector idle (why DeepSpeedConfig refuses ZeRO-3)
    touch = list(trainable.values())
    metrics, skipped = {}, []  # over-long samples this rank left out (the collator's policy)
    while step < hp.steps:
        scale = warmup_cosine(step, hp.steps, hp.warmup_steps, hp.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = hp.lr * g["lr_scale"] * scale
        started, losses, samples, tokens, slots, waited = time.perf_counter(), [], 0, 0, 0, 0.0
        by_modality = {}
        for _ in range(accumulation):
            before = time.perf_counter()
            modality, batch = next(batches)
            waited += time.perf_counter() - before
            skipped += [{**s, "step": step + 1, "rank": rank} for s in batch.skipped]
            batch = to_device(batch, engine.device)
            out = engine(batch.input_ids, batch.features, attention_mask=batch.attention_mask, labels=batch.labels,
                         series_target=batch.series_target, sample_ids=batch.sample_ids, return_logits=False,
                         series_lookback=batch.series_lookback, cu_seqlens=batch.cu_seqlens)
            loss = out.loss + sum(p.sum() * 0.0 for p in touch)
            engine.backward(loss)
            engine.step()
            losses.append(float(out.loss))
            by_modality.setdefault(modality, []).append(float(out.loss))
            samples += len(batch.sample_ids)
            tokens += batch.n_tokens
            slots += batch.slots
        step += 1
        seconds = time.perf_counter() - started
        metrics = {"step": step, "loss": all_mean(sum(losses) / len(losses), engine.device),
                   "lr": hp.lr * scale, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "samples_per_s": all_mean(samples, engine.device) * world / seconds,
                   "tokens_per_s": all_mean(tokens, engine.device) * world / seconds,  # real tokens, no padding
                   # Batch.padding_fraction over the step: right padding, or the packed rows' unfilled ends
                   "padding_fraction": 1.0 - all_mean(tokens, engine.device) / all_mean(slots, engine.device),
                   "skipped_over_length": all_mean(len(skipped), engine.device) * world,
                   "data_wait_s": all_mean(waited, engine.device)}  # the step's time spent waiting for its batches
        # every rank draws the same cache per micro-step, so these keys agree across ranks
        metrics.update({f"loss_{m}": all_mean(sum(v) / len(v), engine.device) for m, v in sorted(by_modality.items())})
        if logger:
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
        last = step == hp.steps
        if last:
            log_skipped(skipped, logger, world)
        if last or (hp.checkpoint_every and step % hp.checkpoint_every == 0):
            positions = gather(batches.position(), world)
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="ds", client_state={"step": step, "data_positions": positions})
                if last:
                    save_final(model, Path(d), phase, rank, cfg.deepspeed.zero_stage)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    if monitor:
        monitor.finish()  # logs what it holds; after a crash it stops by itself once the run is no longer RUNNING


def gather(value, world: int) -> list:
    """Every rank's `value`, in rank order (a collective: every rank calls it)."""
    if not (dist.is_initialized() and world > 1):
        return [value]
    everyone = [None] * world
    dist.all_gather_object(everyone, value)
    return everyone


def log_skipped(skipped: list[dict], logger, world: int) -> None:
    """Every rank's skipped samples, gathered, as `skipped_samples.jsonl` in the run (rank 0 writes it).
    A collective: every rank calls it."""
    rows = [row for part in gather(skipped, world) for row in part]
    if logger is not None and rows:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "skipped_samples.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            logger.client.log_artifact(logger.run_id, str(path))


def save_final(model, folder: Path, phase: int, rank: int, zero_stage: int) -> None:
    """Phase I: the projectors only (adapter-only save); phase II: the whole model, and the adapter beside it.
    Called on every rank: under ZeRO-3 the full weights are gathered first (a collective)."""
    import deepspeed  # imported by train_loop_per_worker first, once DS_ACCELERATOR is set

    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=zero_stage == 3):
        if rank == 0:
            model.save_pretrained(folder / "model", adapter_only=phase == 1)
            if phase == 2:
                model.save_pretrained(folder / "adapter", adapter_only=True)
