"""The training core: one phase of ModRWKV training in plain PyTorch, in one process.

    model = build_model(backbone_path, model_config, init_from, feature_stats, seed)
    model.set_phase(phase)
    optimizer = optimizer_for(model, hp)            # RWKV-LM's parameter groups, AdamW
    batches = MicroBatches(caches, collator, ...)   # packed rows (or padded samples), caches drawn by the mix
    engine = LocalEngine(model, optimizer, accumulation_steps(hp, world=1), hp.grad_clip)
    skipped = train_steps(engine, optimizer, batches, hp, on_step=print)

`modrwkv train --single-process` runs exactly this (`train_local.py`). A Ray Train worker runs the same
`train_steps` around a DeepSpeed engine (`train_loop.py`), which keeps LocalEngine's contract across workers:
the loss divided by the accumulation steps, gradients clipped and the optimizer stepped at each accumulation
boundary, here with the gradients reduced and the optimizer state partitioned (ZeRO). Imports no Ray,
DeepSpeed or MLflow.
"""

import random
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from modrwkv import RWKV7
from modrwkv.batching import SKIP_REASONS, OverLength, first_fit_decreasing
from modrwkv.multimodal import LossUnits, ModRWKV, ModRWKVConfig
from modrwkv_kernels import to_device_nowait
from preprocessing.cache.entry import entry_name
from preprocessing.local_copy import local_copy

from .schedule import warmup_cosine
from .train_config import PhaseConfig


def build_model(backbone_path: str, config: ModRWKVConfig, init_from: str | None, feature_stats: dict,
                seed: int, gradient_checkpointing: bool = False) -> ModRWKV:
    """The backbone from `backbone_path`; phase II's projectors from phase I's folder `init_from`, phase I's new
    ones (seeded) normalising with `feature_stats` (modality -> the training features' mean and std or
    whitening). Either path may be an s3:// URI, read from this node's copy."""
    # fp32 master weights whatever the checkpoint's dtype (a bf16 folder too): bf16 is autocast's or DeepSpeed's
    backbone = RWKV7.from_pretrained(local_copy(backbone_path), dtype=torch.float32)
    backbone.gradient_checkpointing = gradient_checkpointing
    if init_from:
        return ModRWKV.from_pretrained(local_copy(init_from), backbone=backbone)
    torch.manual_seed(seed)
    model = ModRWKV(config, backbone=backbone)
    for modality, stats in feature_stats.items():
        model.projectors[modality].set_feature_stats(stats["mean"], stats.get("std"), stats.get("whitening"))
    return model


def adamw(groups: list[dict], lr: float, fused: bool = True, eps: float = 1e-18) -> torch.optim.AdamW:
    """AdamW as RWKV-LM trains (betas 0.9, 0.99, eps 1e-18), each of `optimizer_groups`' groups at lr times its
    lr_scale."""
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=eps, fused=fused)


def optimizer_for(model: ModRWKV, hp: PhaseConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in RWKV-LM's groups (att.w0 at 2x lr, weight decay on matrices only).
    Fused: one pass over each (flat ZeRO) partition; on CPU the loop form takes 10x as long (0.32 vs 0.03 s for
    67M parameters), a sixth of a step of the L6, C512 backbone in benchmarks/train.py."""
    return adamw(model.backbone.optimizer_groups(hp.weight_decay, params=model.trainable_parameters()), hp.lr,
                 eps=hp.adam_eps)


def accumulation_steps(hp: PhaseConfig, world: int) -> int:
    per_step = hp.micro_batch * world
    if hp.global_batch % per_step:
        raise ValueError(f"global_batch {hp.global_batch} is not a multiple of micro_batch x workers = {per_step}")
    return hp.global_batch // per_step


class LocalEngine:
    """The engine contract `train_steps` uses, in plain PyTorch (DeepSpeed's engine keeps the same one):
    calling it runs the model (`module`); `backward` divides the loss by the accumulation steps; `step` counts micro-steps
    and, at each accumulation boundary, clips the gradients' global norm and steps the optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accumulation: int,
                 grad_clip: float):
        self.module, self.optimizer, self.accumulation, self.grad_clip = model, optimizer, accumulation, grad_clip
        self.device = next(model.parameters()).device
        self.micro_steps, self.grad_norm = 0, torch.zeros(())

    def __call__(self, *args, **kwargs):
        # on a GPU in bf16 over fp32 weights, as DeepSpeed's bf16 mode computes there
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]  # in the model's order, as a loop would
        # kept on the device: read with the step's metrics, not before the optimizer may run
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def get_global_grad_norm(self) -> float:
        return float(self.grad_norm)


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
            self.used, self.skipped = used, []  # its skipped samples went out with its first row

    def fill(self) -> None:
        for _ in range(self.cache_size // self.buffer + 1):  # every sample skipped: read on, a pass at most
            self.start, self.read, self.used = self.start + self.read, self.buffer, 0
            encoded, skipped = self.collator.encode_all([next(self.samples) for _ in range(self.buffer)])
            self.skipped += skipped
            if encoded:
                break
        else:
            raise ValueError(f"{self.uri}: every sample drawn is skipped ({len(self.skipped)} in a row, e.g. "
                             f"{self.skipped[0]})")
        bins = first_fit_decreasing([len(e.ids) for e in encoded], self.collator.max_length)
        random.Random(f"{self.seed}/{self.start}").shuffle(bins)
        self.rows = [[encoded[i] for i in row] for row in bins]

    def next_row(self) -> list:
        if self.used == len(self.rows):
            self.fill()
        self.used += 1
        return self.rows[self.used - 1]

    def take(self, n: int):
        """A packed micro-batch of `n` rows, with the samples left out since the last one."""
        rows = [self.next_row() for _ in range(n)]
        batch = self.collator.pack(rows, self.skipped)
        self.skipped = []
        return batch


def worker_epochs(caches: list, weights: list[float], rank: int, world: int) -> list[int]:
    """Worker `rank`'s samples of each cache an epoch (0 for a cache never drawn): what turns a count taken into a
    place in the data."""
    return [c.samples_of(rank, world) if w else 0 for c, w in zip(caches, weights, strict=True)]


def check_position(saved: dict, epoch: list[int], entries: list[str], rank: int, order: dict | None = None) -> None:
    """A data position counts samples taken: it means the same place only over the same entries and epochs, and in
    the same order (`stream_order`). Refuses a position saved over another entry (one encoded again), another epoch
    of one drawn then and now (the entry shared otherwise among the workers) or in another order; one saved before
    these were recorded is taken as it is (without its entries and epochs, with a warning)."""
    if order is not None and "order" in saved and not same_order(saved["order"], order):
        raise ValueError(f"a data position saved with {saved['order']} cannot resume a run with {order} (the same "
                         "counts would point at other samples): start the phase afresh")
    if "entries" not in saved:
        print(f"worker {rank}: the data position predates its record of the entries and epochs; resuming where its "
              "counts lead, which is where the run stood only if the caches and their split among the workers are "
              "unchanged (the split changed on 2026-12-06)")
        return
    if len(saved["entries"]) != len(entries):
        raise ValueError(f"a data position saved over {len(saved['entries'])} entries cannot resume a run over "
                         f"{len(entries)}: start the phase afresh")
    for i, name in enumerate(entries):
        if saved["entries"][i] != name:  # encoded again, or (since 2026-12-07) its refused records are keyed too
            raise ValueError(f"a data position saved over the entry {saved['entries'][i]} cannot resume a run that "
                             f"reads {name} in its place: start the phase afresh, or name that entry's folder in "
                             "caches (its URI, not the encode config that now finds another)")
        if saved["epoch"][i] and epoch[i] and saved["epoch"][i] != epoch[i]:
            raise ValueError(f"{name}: a data position saved when worker {rank}'s epoch held {saved['epoch'][i]} of "
                             f"its samples cannot resume one of {epoch[i]} (it is shared otherwise among the "
                             "workers): start the phase afresh")


def stream_order(seed: int, pack_buffer: int, epochs: list[int], max_length: int | None, projectors: dict) -> dict:
    """What, beside the entries and their epochs, decides which samples a data position's counts point at: the seed
    (the cache draws and each epoch's shuffle) and, packing (`pack_buffer` > 0), how a buffer becomes rows: each
    cache's buffer (no larger than the worker's share of it, `epochs`: a larger one would hold some of its samples
    twice; None for a cache never drawn), max_length and each projector's compression (a sample's tokens)."""
    if not pack_buffer:
        return {"seed": seed}
    return {"seed": seed, "pack_buffers": [min(pack_buffer, share) if share else None for share in epochs],
            "max_length": max_length, "compression": {m: [p.kernel, p.stride] for m, p in sorted(projectors.items())}}


def same_order(saved: dict, now: dict) -> bool:
    """Whether a position saved under `saved` points at the same samples under `now`: equal, but for the buffer of
    a cache not drawn in one of the runs (it took nothing there)."""
    if saved.keys() != now.keys() or len(saved.get("pack_buffers", [])) != len(now.get("pack_buffers", [])):
        return False
    buffers = zip(saved.get("pack_buffers", []), now.get("pack_buffers", []))
    return (all(a == b for a, b in buffers if a is not None and b is not None)
            and all(saved[k] == now[k] for k in now if k != "pack_buffers"))


def samples_per_row(tokens, max_length: int, buffer: int, seed: int, sampled: int = 8192) -> float:
    """The samples a packed row holds on average when RowPacker packs samples of these lengths (`tokens`, those
    over max_length skipped): measured by packing up to `sampled` of them, seeded, in buffers of `buffer`."""
    fit = [int(n) for n in tokens if n <= max_length]
    if not fit:
        return 1.0
    drawn = random.Random(seed).sample(fit, min(sampled, len(fit)))
    rows = sum(len(first_fit_decreasing(drawn[i : i + buffer], max_length)) for i in range(0, len(drawn), buffer))
    return len(drawn) / rows


class MicroBatches:
    """Endless (cache modality, micro-batch) pairs, each batch from one cache drawn with weights `mix` (default:
    sample counts; the training drivers give `plan_phase`'s, which packed divides by `samples_per_row`). Every rank
    draws the same cache for the same micro-step (one shared seed), so all ranks run the same modality's projector
    together. The modality is the cache's: a batch of an image cache may hold
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
        self.epoch = worker_epochs(caches, self.weights, rank, world)
        self.entries = [entry_name(c.uri) for c in caches]
        self.order = stream_order(seed, pack_buffer, self.epoch, collator.max_length if pack_buffer else None,
                                  collator.config.projectors if pack_buffer else {})
        if position is None:
            position = {"draws": 0, "taken": [0] * len(caches)}
            if pack_buffer:
                position["rows"] = [0] * len(caches)
        else:
            if len(position["taken"]) != len(caches):
                raise ValueError(f"a data position for {len(position['taken'])} caches cannot resume {len(caches)}")
            if ("rows" in position) != bool(pack_buffer):
                saved, now = ("on" if "rows" in position else "off"), ("on" if pack_buffer else "off")
                raise ValueError(f"a data position saved with packing {saved} cannot resume a run with packing {now}")
            check_position(position, self.epoch, self.entries, rank, self.order)
        self.draws, self.taken = 0, list(position["taken"])
        self.pick = random.Random(seed)
        for _ in range(position["draws"]):  # the cache choices are a seeded sequence: replaying them reads nothing
            self.draw()
        self.streams = [self.stream(i) for i in range(len(caches))]
        self.packers = [RowPacker(self.streams[i], collator, self.order["pack_buffers"][i] or 1, len(c), c.uri, seed,
                                  position["taken"][i], position["rows"][i])
                        for i, c in enumerate(caches)] if pack_buffer else None

    def position(self) -> dict:
        where = {"epoch": self.epoch, "entries": self.entries, "order": self.order}
        if self.packers is None:
            return {"draws": self.draws, "taken": list(self.taken), **where}
        return {"draws": self.draws, "taken": [p.start for p in self.packers], "rows": [p.used for p in self.packers],
                **where}

    def draw(self) -> int:
        self.draws += 1
        return self.pick.choices(range(len(self.caches)), self.weights)[0]

    def stream(self, i: int):
        cache = self.caches[i]
        epoch, start = divmod(self.taken[i], self.epoch[i])
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
        modality, batch = self.caches[i].modality, self.next_batch(i)
        # a key is unique within its entry only (a collection's entries key their windows by paths in their folders)
        batch.skipped = [{**record, "entry": entry_name(self.caches[i].uri)} for record in batch.skipped]
        return modality, batch

    def next_batch(self, i: int):
        if self.packers is not None:
            return self.packers[i].take(self.micro)
        batch, skipped = self.take(i), []
        for _ in range(len(self.caches[i]) // self.micro + 1):  # every sample skipped: draw again, a pass at most
            if batch.sample_ids:
                break
            skipped += batch.skipped
            batch = self.take(i)
        else:
            raise ValueError(f"{self.caches[i].uri}: every sample drawn is skipped ({len(skipped)} in a row, e.g. "
                             f"{skipped[0]})")
        batch.skipped = skipped + batch.skipped
        return batch


def to_device(batch, device):
    """The batch's features and series on `device`, copied without the host waiting. Its layout (ids, labels,
    mask, offsets) stays on the host, where the model finds placeholders and targets without a device read."""
    batch.features = [[(m, to_device_nowait(f, device)) for m, f in items] for items in batch.features]
    if batch.series_target is not None:
        batch.series_target = to_device_nowait(batch.series_target, device)
    if batch.series_lookback is not None:
        batch.series_lookback = to_device_nowait(batch.series_lookback, device)
    return batch


def all_sum(values: torch.Tensor) -> list[float]:
    """Each of `values` (float64) summed over the workers (one all-reduce), read back once."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values.tolist()


def train_steps(engine, optimizer, batches: MicroBatches, hp: PhaseConfig, step: int = 0,
                on_step: Callable[[int, dict], None] | None = None, skipped: list[dict] | None = None) -> list[dict]:
    """Optimizer steps `step + 1` ... `hp.steps` of one phase: each sets the scheduled lr, runs the accumulation's
    micro-batches through `engine` (LocalEngine, or DeepSpeed's) and calls `on_step(step, metrics)`; metrics are
    summed over workers when torch.distributed is up. Returns the samples left out (over-long, with an item
    compressed to nothing, or with nothing to learn: `modrwkv.batching.BadSample`), by step:
    `skipped` (those of the steps before `step`, when resuming) extended in place, so `on_step` may save it.

    A step minimises the mean cross-entropy over every labelled token of the step (all micro-batches, all workers)
    times the share of its samples that answer in text, plus the mean squared error over every forecast value of the
    step times the share of its samples that forecast: one task alone, its plain mean; tasks mixed in a step, each
    weighed by its samples, as the mix draws them. Each micro-batch's means are weighted by its part of those
    counts (`step_objective`), so micro_batch, packing and the number of workers change how a step is computed, not
    what it minimises."""
    # every trainable tensor a micro-batch may leave idle joins its graph (x0), so that ZeRO reduces every gradient:
    # the projectors of the other modalities, the heads (the LM head reads labelled positions only, and a forecast
    # has none), and the backbone's unread tensors (every forward reads its ~800 others; touching them too added
    # thousands of tiny kernels a micro-step); the same in one process, where AdamW skips a tensor with no gradient
    # (no decay, no momentum) that ZeRO's flat partition updates with a zero one: so one process computes what
    # workers do
    model = engine.module
    idle = [*model.backbone.unread_parameters(), model.backbone.head.weight]
    read = {id(p) for p in model.backbone.parameters()} - {id(p) for p in idle}
    touch = [p for p in model.parameters() if p.requires_grad and id(p) not in read]
    accumulation, skipped = engine.gradient_accumulation_steps(), [] if skipped is None else skipped
    # the engines divide the loss by the accumulation steps, and DeepSpeed averages the gradients over workers
    workers = dist.get_world_size() if dist.is_initialized() else 1
    while step < hp.steps:
        scale = warmup_cosine(step, hp.steps, hp.warmup_steps, hp.min_lr_ratio)
        for g in optimizer.param_groups:  # eps and decay too: a resumed optimizer's groups hold their checkpoint's
            g["lr"], g["eps"] = hp.lr * g["lr_scale"] * scale, hp.adam_eps
            if g.get("decays"):
                g["weight_decay"] = hp.weight_decay
        started, micro, waited = time.perf_counter(), [], 0.0
        for _ in range(accumulation):  # all of the step's micro-batches first: their counts weigh each one's loss
            before = time.perf_counter()
            micro.append(next(batches))
            waited += time.perf_counter() - before
        units = [model.loss_units(b.labels, b.features, b.series_target, b.cu_seqlens) for _, b in micro]
        totals = step_totals(units, engine.device)
        modalities = sorted({modality for modality, _ in micro})
        # per modality, summed over its micro-batches on the device until the step's one read: the token loss sum,
        # the squared error sum, then the LossUnits
        sums = torch.zeros(len(modalities), 2 + len(LossUnits._fields), dtype=torch.float64, device=engine.device)
        samples, tokens, slots = 0, 0, 0
        for (modality, batch), counts in zip(micro, units):
            skipped.extend({**s, "step": step + 1} for s in batch.skipped)
            batch = to_device(batch, engine.device)
            out = engine(batch.input_ids, batch.features, attention_mask=batch.attention_mask, labels=batch.labels,
                         series_target=batch.series_target, sample_ids=batch.sample_ids, return_logits=False,
                         series_lookback=batch.series_lookback, cu_seqlens=batch.cu_seqlens)
            objective = step_objective(out, counts, totals) * (accumulation * workers)
            engine.backward(objective + sum(p.sum() * 0.0 for p in touch))
            engine.step()
            row = sums[modalities.index(modality)]
            if out.lm_loss is not None:
                row[0] += out.lm_loss.detach().double() * counts.tokens
            if out.forecast_loss is not None:
                row[1] += out.forecast_loss.detach().double() * counts.values
            row[2:] += to_device_nowait(torch.tensor(counts, dtype=torch.float64), engine.device)
            samples += len(batch.sample_ids)
            tokens += batch.n_tokens
            slots += batch.slots
        step += 1
        # records saved before they named a reason are over-long ones (the only reason then)
        reasons = [s.get("reason", OverLength.reason) for s in skipped]
        counts = torch.tensor([samples, tokens, slots, waited, *map(reasons.count, SKIP_REASONS)],
                              dtype=torch.float64)
        # every worker draws the same cache per micro-step, so the modalities agree across workers
        values = all_sum(torch.cat([sums.flatten(), to_device_nowait(counts, engine.device)]))
        width = sums.shape[1]
        per_modality = [values[width * i : width * (i + 1)] for i in range(len(modalities))]
        samples, tokens, slots, waited, *n_skipped = values[width * len(modalities) :]
        seconds = time.perf_counter() - started  # after the read, which waited for the step's device work
        metrics = {"loss": mean_loss(*map(sum, zip(*per_modality))), "lr": hp.lr * scale,
                   "samples_per_s": samples / seconds,
                   "tokens_per_s": tokens / seconds,  # real tokens, no padding
                   # Batch.padding_fraction over the step: right padding, or the packed rows' unfilled ends
                   "padding_fraction": 1.0 - tokens / slots,
                   "data_wait_s": waited / workers}  # the step's time spent waiting for its batches, per worker
        metrics.update({f"skipped_{reason}": n for reason, n in zip(SKIP_REASONS, n_skipped)})
        metrics.update({f"loss_{m}": mean_loss(*sums_m) for m, sums_m in zip(modalities, per_modality)})
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:  # an engine that measured none: no metric rather than a made-up 0
            metrics["grad_norm"] = float(grad_norm)
        if on_step:
            on_step(step, metrics)
    return skipped


def step_totals(units: list[LossUnits], device) -> LossUnits:
    """A step's `LossUnits`: its micro-batches', summed over workers (an all-reduce when torch.distributed is up,
    read back before the step's first backward: one more read a step on a GPU)."""
    totals = [sum(column) for column in zip(*units)]
    if dist.is_initialized():
        summed = torch.tensor(totals, dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        totals = summed.tolist()
    return LossUnits(*map(int, totals))


def task_weights(totals: LossUnits) -> tuple[float, float]:
    """What a token's cross-entropy and a forecast value's squared error each weigh in the loss over `totals` (a
    step's, or one modality's): each task's mean, weighed by the share of the samples it is over."""
    lm = totals.answering / (totals.tokens * totals.samples) if totals.tokens else 0.0
    forecast = totals.forecasting / (totals.values * totals.samples) if totals.values else 0.0
    return lm, forecast


def step_objective(out, units: LossUnits, totals: LossUnits) -> torch.Tensor:
    """A micro-batch's part of the step's loss (`train_steps`): its means times its tokens and values (their sums)
    at the step's `task_weights`; the parts add up to the step's loss."""
    lm, forecast = task_weights(totals)
    parts = []
    if out.lm_loss is not None:
        parts.append(out.lm_loss * (units.tokens * lm))
    if out.forecast_loss is not None:
        parts.append(out.forecast_loss * (units.values * forecast))
    if not parts:
        raise ValueError("a micro-batch with neither labelled tokens nor a forecast target: nothing to learn")
    return sum(parts)


def mean_loss(token_loss_sum: float, squared_error_sum: float, *counts: float) -> float:
    """The loss (`train_steps`) from its sums over a step, or one modality's part of it."""
    lm, forecast = task_weights(LossUnits(*counts))
    return token_loss_sum * lm + squared_error_sum * forecast
