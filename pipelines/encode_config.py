"""The schema of `configs/*/encode_*.yaml` (`EncodeConfig`), checked when the config is loaded."""

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from preprocessing.cache.precision import DEFAULT as DEFAULT_PRECISION
from preprocessing.cache.precision import Precision
from preprocessing.items import RAW_SERIES
from preprocessing.validate import Limits

MODALITY_OF_FORMAT = {"llava": "image", "asr_jsonl": "audio", "librispeech": "audio", "aishell": "audio",
                      "series": "series"}


# the dataset options of series windows (and of a collection of series folders)
SERIES_ONLY = ("each_folder", "lookback", "horizon", "stride", "split", "fractions", "split_rows", "max_windows",
               "columns", "time_column", "nan_policy", "prompt")


@dataclass
class DatasetConfig:
    format: Literal["llava", "asr_jsonl", "librispeech", "aishell", "series"]
    path: str  # aishell: its transcript file
    # image/audio paths resolve against this (default: the manifest's folder); aishell: the split's folder of .wav
    media_root: str | None = None
    # media paths must stay inside media_root (no absolute paths, `..` or symlinks out); true lifts that
    allow_media_outside_root: bool = False
    # true: `path` is a collection, a folder of dataset folders (GIFT-Eval's pretraining set); each is encoded by a
    # job of its own into an entry of its own (a job holds every window it cuts), and training takes them all
    each_folder: bool = False
    # series only
    lookback: int = 96
    horizon: int = 24
    stride: int = 24
    split: Literal["train", "val", "test"] = "train"
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    # instead of fractions: the rows where train, val and test end (the Time-Series-Library's ETTh borders:
    # [8640, 11520, 14400]; ETTm: [34560, 46080, 57600]); rows after the last are not read
    split_rows: list[int] | None = None
    # the encode job holds every window until its entry is written (at lookback 720, 13 KiB each when they overlap,
    # 29 KiB when they share no value: 1M are 12-28 GiB, benchmarks/RESULTS.md "Series encode"); more stop the read
    # there, saying what to do
    max_windows: int = 1_000_000
    columns: list[str] | None = None
    time_column: str | None = None
    nan_policy: Literal["reject", "interpolate"] = "reject"
    prompt: str = "<series>\nForecast the next values."

    def __post_init__(self):
        if self.format != "series":  # ignored there, yet keyed: the same data would go to another entry
            given = [f.name for f in fields(self) if f.name in SERIES_ONLY and getattr(self, f.name) != (
                f.default_factory() if f.default_factory is not MISSING else f.default)]
            if given:
                raise ValueError(f"dataset.{', dataset.'.join(given)} applies to series, not dataset.format "
                                 f"{self.format!r}")
        if self.format == "aishell" and not self.media_root:
            raise ValueError("dataset.media_root is required for aishell: the split's folder of .wav files "
                             "(data_aishell/wav/test, say), beside dataset.path, the transcript")
        if min(self.lookback, self.horizon, self.stride, self.max_windows) < 1:
            raise ValueError("lookback, horizon, stride and max_windows must be positive")
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) < 0:
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {self.fractions}")
        if self.split_rows is not None and (len(self.split_rows) != 3 or not 0 < self.split_rows[0]
                                            <= self.split_rows[1] <= self.split_rows[2]):
            raise ValueError(f"split_rows must be three increasing row numbers (where train, val and test end), "
                             f"got {self.split_rows}")


@dataclass
class EncoderSpec:
    kind: str  # a registered frozen encoder (clip, siglip2, whisper, ...) or "raw" for WaveNet series
    model_dir: str | None = None  # a folder or s3:// URI (each node reads its local copy)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # vision only: the whole image resized to this square, no crop (default: the folder's processor, whose CLIP and
    # DINOv2 resize the short side and centre-crop, cutting a wide image's sides); siglip2 (NaFlex, any aspect
    # ratio): the patch budget of a square that size, (image_size / patch)² (384: the paper's 576 patches; default 256)
    image_size: int | None = None
    # vision only: the hidden layer whose tokens are cached (LLaVA's mm_vision_select_layer: -2 is the
    # penultimate, before the final norm); None: the last hidden state
    layer: int | None = None

    def __post_init__(self):
        # transformers and torch: heavy, only checking an encoder section needs the registry
        from preprocessing.encoders import ENCODERS
        from preprocessing.encoders.vision import VISION_ENCODERS

        if self.image_size is not None and self.kind not in VISION_ENCODERS:
            raise ValueError(f"encoder.image_size applies to vision encoders, not {self.kind!r}")
        if self.image_size is not None and self.image_size < 1:  # 0 was ignored yet keyed, -32 rejected every image
            raise ValueError(f"encoder.image_size must be a positive number of pixels, got {self.image_size}")
        if self.layer is not None and self.kind not in VISION_ENCODERS:
            raise ValueError(f"encoder.layer applies to vision encoders, not {self.kind!r}")

        if self.kind != RAW_SERIES and self.kind not in ENCODERS:
            raise ValueError(f"encoder.kind {self.kind!r} is not one of {sorted(ENCODERS) + [RAW_SERIES]}")
        if self.kind != RAW_SERIES and not self.model_dir:
            raise ValueError(f"encoder.model_dir is required for {self.kind!r} (a model folder or its s3:// URI)")


@dataclass
class CacheConfig:
    root: str = "runs/cache"  # a folder or s3://bucket/prefix
    shard_size: int = 256
    # how the store holds features (preprocessing/cache/precision.py): fp16, or int8 with a scale per vector (half
    # the bytes); part of the store's key, so both live side by side
    precision: Precision = DEFAULT_PRECISION

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError("cache.shard_size must be positive")


@dataclass
class RunConfig:
    actors: int = 1  # encoder actor pool size
    batch_size: int = 16  # encoder micro-batch
    gpus_per_actor: float = 0.0
    force: bool = False  # re-encode even when a complete entry exists
    ray_address: str | None = None  # None: a local Ray instance
    # A job whose store lacks at most this many items encodes them in the driver, without Ray Data's ~6 s per job
    # before its first item (planning, the actor pool, each actor loading its encoder). 0: always Ray. 128: on 2
    # CPU cores the driver (2 torch threads) stays ahead of 2 actors up to ~1,000 items when it has the cores to
    # itself, but slows far more than they do when other work competes: there Ray overtook it between 64 and 192
    # items. 128 keeps the loss of the wrong choice near 5 s either way (benchmarks/RESULTS.md).
    in_process_max_items: int = 128
    # A collection's folders (`dataset.each_folder`) encoded at once, each as a Ray task of one CPU holding that
    # folder's windows (up to dataset.max_windows, ~28 KiB each at lookback 720): sized to the cluster's memory.
    # Ray's memory monitor kills a task over it; a local instance of ours retries it OOM_RETRIES times, then names
    # that folder failed, as do ray_cluster.yaml's nodes (RAY_task_oom_retries=2); a cluster started without it
    # retries it without end. 1: one after another in the driver, without Ray.
    folder_jobs: int = 1
    # Memory Ray reserves for each folder task (its `memory` resource): a node takes no more tasks than it holds,
    # so large folders wait rather than being killed (more than any node has: they wait for a node that has it, as
    # an autoscaler may add). 0: none reserved, `folder_jobs` alone bounds them.
    folder_memory_gb: float = 0.0

    def __post_init__(self):
        for name in ("actors", "batch_size", "folder_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be 1 or more, got {getattr(self, name)}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"run.gpus_per_actor must be 0 or more, got {self.gpus_per_actor}")
        if self.folder_memory_gb < 0:
            raise ValueError(f"run.folder_memory_gb must be 0 (none reserved) or more, got {self.folder_memory_gb}")
        if self.in_process_max_items < 0:
            raise ValueError("run.in_process_max_items must be 0 (always Ray) or more")


@dataclass
class EncodeConfig:
    dataset: DatasetConfig
    encoder: EncoderSpec
    limits: Limits = field(default_factory=Limits)
    cache: CacheConfig = field(default_factory=CacheConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # the context length the cache will train at: encode counts and names the samples over it (changes no feature)
    max_length: int | None = None

    def __post_init__(self):
        from preprocessing.encoders import AUDIO_ENCODERS, SERIES_ENCODERS, VISION_ENCODERS

        if self.encoder.kind == RAW_SERIES and self.dataset.format != "series":
            raise ValueError(f"encoder.kind {RAW_SERIES!r} is for series (the WaveNet's input), not "
                             f"dataset.format {self.dataset.format!r}")
        modality = MODALITY_OF_FORMAT[self.dataset.format]
        encoders = {"image": VISION_ENCODERS, "audio": AUDIO_ENCODERS, "series": {**SERIES_ENCODERS, RAW_SERIES: 0}}
        if self.encoder.kind not in encoders[modality]:  # each item would be refused: an entry of nothing
            raise ValueError(f"encoder.kind {self.encoder.kind!r} does not encode {modality} "
                             f"(dataset.format {self.dataset.format!r}); {modality} encoders: "
                             f"{sorted(encoders[modality])}")
        if modality == "series" and self.dataset.lookback < self.limits.min_series_length:
            raise ValueError(f"dataset.lookback {self.dataset.lookback} is shorter than limits.min_series_length "
                             f"{self.limits.min_series_length}: every window would be rejected")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be 1 or more (the context length the cache will train at), got "
                             f"{self.max_length}")
        if self.cache.precision != DEFAULT_PRECISION and self.encoder.kind == RAW_SERIES:
            raise ValueError(f"cache.precision {self.cache.precision!r} applies to encoder features; raw series "
                             "(the WaveNet's input) are stored in full precision, in the shards")
