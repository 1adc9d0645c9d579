"""The schema of a train YAML (`modrwkv train --config`): checked at load by `pipelines.config`."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from modrwkv.conversation import PLACEHOLDER_IDS
from modrwkv.multimodal import ProjectorConfig
from modrwkv.wavenet import WaveNetConfig

from .config import parse_overrides
from .logged_models import check_registered_name


@dataclass
class BackboneConfig:
    # A pretrained backbone: a save_pretrained directory or an RWKV-LM .pth. (A freshly initialised RWKV-7
    # cannot serve phase I: its output projections start at zero, so no gradient reaches the adapter.)
    path: str


WHITEN_EPS = 0.1  # added to each eigenvalue, times their mean: near-empty directions are not blown up


@dataclass
class ModelConfig:
    backbone: BackboneConfig
    # by modality; encoder_dim comes from the caches, model_dim from the backbone, normalize (with the training
    # caches' statistics) defaults to the modality's measured best (modrwkv/multimodal.py says why)
    projectors: dict[str, ProjectorConfig] = field(default_factory=dict)
    wavenet: WaveNetConfig | None = None  # series caches encoded "raw" train this WaveNet (in_channels: the caches)
    # the forecast adds a linear map of the normalised lookback, starting as the naive forecast (ModRWKV)
    forecast_skip: bool = True
    # whitened projectors: the ε of Σ^(-1/2); 0.1 kept colour as well as 0.01 did and the other types better
    # (benchmarks/RESULTS.md, "ZCA whitening"; `benchmarks/experiments.py image-normalisation` compares them)
    whiten_eps: float = WHITEN_EPS

    def __post_init__(self):
        if self.whiten_eps <= 0:
            raise ValueError(f"whiten_eps must be positive, not {self.whiten_eps}")
        if unknown := sorted(set(self.projectors) - set(PLACEHOLDER_IDS)):  # else a misspelt one is never built
            raise ValueError(f"projectors: unknown modalities {unknown}; known: {sorted(PLACEHOLDER_IDS)}")


@dataclass
class PhaseConfig:
    lr: float
    steps: int  # optimizer steps
    global_batch: int
    # per worker, samples (padded) or rows of up to max_length tokens (packing); accumulation fills the global
    # batch, which counts the same unit
    micro_batch: int = 8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    # AdamW's decoupled decay on the matrices RWKV-LM decays (`RWKV7.optimizer_groups`), applied every step to all
    # of them: a projector whose caches a step does not draw is pulled toward 0 (and moves on its momentum) all the
    # same, so a modality the mix draws rarely is decayed more for each step that trains it
    weight_decay: float = 0.0
    # AdamW's epsilon: RWKV-LM's 1e-18 (rwkv7.md), under which a tensor of tiny gradients still moves by about lr a
    # step; torch's 1e-8 damps any whose gradients' RMS is near or below it
    adam_eps: float = 1e-18
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # 0: only at the end
    caches: list[str] | None = None  # this phase's data, when it differs from the top-level caches
    # relative sampling weight of each configured cache's samples, in order (a collection's shared by its entries'
    # sample counts); default: sample counts. Packed, a cache of shorter samples is drawn less often, as a row holds
    # more of them (`train_setup.per_packed_draw`)
    mix: list[float] | None = None

    def __post_init__(self):
        if self.lr <= 0 or self.steps < 1 or self.micro_batch < 1:
            raise ValueError("lr, steps and micro_batch must be positive")
        if self.global_batch < 1 or self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch must be a positive multiple of micro_batch {self.micro_batch}, not "
                             f"{self.global_batch}")
        if not 0 <= self.warmup_steps < self.steps:  # a warmup as long as the run leaves nothing to decay
            raise ValueError(f"warmup_steps must be 0 or more and fewer than steps ({self.steps}), not "
                             f"{self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be between 0 and 1 (a fraction of lr), not {self.min_lr_ratio}")
        if not 0 < self.adam_eps < 1:
            raise ValueError(f"adam_eps must be between 0 and 1, not {self.adam_eps}")
        for name in ("weight_decay", "grad_clip", "checkpoint_every"):  # grad_clip 0: no clipping
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.mix is not None and not all(w > 0 for w in self.mix):
            raise ValueError(f"mix weights must be positive, got {self.mix}")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    # ZeRO 1/2: reduce gradient buckets while the backward still runs (DeepSpeed leaves it off for these stages);
    # worth it across nodes, at the cost of its communication buffers' memory
    overlap_comm: bool = False

    def __post_init__(self):
        if self.overlap_comm and self.zero_stage == 0:
            raise ValueError("overlap_comm overlaps ZeRO's gradient reduction with the backward: it needs zero_stage "
                             "1 or 2")
        if self.offload_optimizer and self.zero_stage == 0:  # DeepSpeed reads the offload settings only under ZeRO
            raise ValueError("offload_optimizer moves ZeRO's partitioned optimizer states to the CPU: it needs "
                             "zero_stage 1 or 2")
        if self.zero_stage == 3:  # refused here, not as an autograd error in the workers' first backward
            raise ValueError("zero_stage 3 is not supported yet: the trainer adds every trainable tensor to each "
                             "step's loss (times 0) so that ZeRO reduces the projectors a micro-batch leaves idle, "
                             "and ZeRO-3's partitioned parameters cannot take that gradient; use zero_stage 2, "
                             "with offload_optimizer: true to save memory")


@dataclass
class ScalingSpec:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    ray_address: str | None = None

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be 1 or more, not {self.workers}")
        if self.cpus_per_worker < 1 or self.max_failures < -1:  # -1: Ray Train retries for ever
            raise ValueError(f"cpus_per_worker must be 1 or more and max_failures -1 (for ever), 0 or more, not "
                             f"{self.cpus_per_worker} and {self.max_failures}")


@dataclass
class TrackingConfig:
    # default: MLFLOW_TRACKING_URI, the local server, or runs/mlflow.db; not in the repr: it may hold credentials
    tracking_uri: str | None = field(default=None, repr=False)
    experiment: str = "modrwkv"
    run_name: str | None = None
    system_metrics_every_s: float = 10.0  # CPU, memory, GPU of each training node into the run; 0: off
    # each phase's final model is a logged model of its run (pipelines/logged_models.py); this name registers
    # phase II's as a new version of it (`modrwkv train --register-as NAME`)
    register_as: str | None = None
    # every phase's checkpoint_every checkpoint a logged model too (to compare and evaluate; no encoders: the final
    # phase II model is the one to serve)
    log_checkpoints: bool = False

    def __post_init__(self):
        check_registered_name(self.register_as)
        if self.system_metrics_every_s < 0:  # a monitor's sampling interval: 0 is off, below it no interval
            raise ValueError(f"system_metrics_every_s must be 0 (off) or more, not {self.system_metrics_every_s}")


@dataclass
class TrainConfig:
    name: str
    model: ModelConfig
    phase1: PhaseConfig
    phase2: PhaseConfig
    caches: list[str] = field(default_factory=list)  # cache entries or encode YAMLs (found or encoded first)
    output_dir: str = "runs/train"  # a folder or s3://bucket/prefix (`<output_dir>/<name>/phase<N>/`)
    max_length: int = 2048
    # Several samples per row of up to max_length tokens, first-fit decreasing over `pack_buffer` samples at a time;
    # each sample's recurrence starts from zero, exactly as alone. Off: one right-padded row per sample.
    # benchmarks/RESULTS.md (training throughput) measures both.
    packing: bool = True
    pack_buffer: int = 128
    prefetch_threads: int = 4  # per worker, read, check and decode the next shards ahead; 0: on the training thread
    # recompute each block's activations in the backward pass instead of keeping them all: more compute (a second
    # forward) for less memory; without it phase II of the 0.4B shape held 66 GiB for one 16,384-token row
    # (docs/scale.md), so 40-80 GB cards need it at the paper's context and micro-batches
    gradient_checkpointing: bool = False
    seed: int = 0
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if not self.name or self.name in (".", "..") or "/" in self.name:  # <output_dir>/<name>/phase<N>/
            raise ValueError(f"name {self.name!r}: one folder's name, without '/'")
        if self.prefetch_threads < 0:
            raise ValueError(f"prefetch_threads must be 0 or more, not {self.prefetch_threads}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be 1 or more, not {self.max_length}")
        if self.packing and self.pack_buffer < 1:
            raise ValueError(f"packing needs a pack_buffer of 1 or more, not {self.pack_buffer}")
        for name, phase in (("phase1", self.phase1), ("phase2", self.phase2)):
            caches = self.phase_caches(phase)
            if not caches:
                raise ValueError(f"{name}: no data; give caches (both phases) or {name}.caches")
            if phase.mix is not None and len(phase.mix) != len(caches):
                raise ValueError(f"{name}.mix has {len(phase.mix)} weights for {len(caches)} caches")
            # each worker accumulates micro-batches to its share of the global batch: here, not in every worker
            # after the run has started (`--single-process` loads its config with one worker)
            per_step = phase.micro_batch * self.scaling.workers
            if phase.global_batch % per_step:
                raise ValueError(f"{name}.global_batch {phase.global_batch} is not a multiple of micro_batch x "
                                 f"scaling.workers = {phase.micro_batch} x {self.scaling.workers} = {per_step}")

    def phase_caches(self, phase: PhaseConfig) -> list[str]:
        """What `phase` (self.phase1 or self.phase2) reads: its own caches, or the top-level ones."""
        return phase.caches or self.caches

    def with_caches(self, resolve: Callable[[str], str]) -> "TrainConfig":
        """This config with each cache it names, top-level and a phase's own, replaced by `resolve(cache)`."""
        def each(caches: list[str] | None) -> list[str] | None:
            return caches and [resolve(c) for c in caches]

        return replace(self, caches=each(self.caches), phase1=replace(self.phase1, caches=each(self.phase1.caches)),
                       phase2=replace(self.phase2, caches=each(self.phase2.caches)))

    def read_caches(self) -> list[str]:
        """Every cache entry or encode YAML either phase reads, once each, in order."""
        return list(dict.fromkeys(self.phase_caches(self.phase1) + self.phase_caches(self.phase2)))


def train_overrides(args) -> dict:
    """`modrwkv train`'s --set items and flags as load_config overrides."""
    flags = {"tracking.register_as": args.register_as} if getattr(args, "register_as", None) else {}
    return {**parse_overrides(args.set), **flags}
