"""`modrwkv encode --config configs/encode_*.yaml`: raw dataset -> content-addressed WebDataset feature cache.

    readers (driver: descriptors, text checks) -> Ray Data: one row per shard
      -> map(decode_and_validate)             bad sample -> that shard's rejects
      -> map_batches(ShardEncoder, actor pool) frozen encoder in micro-batches -> shard tar + receipt
    driver: receipts -> rejects.jsonl + manifest.json (last)

Shards are planned up front from the sorted sample keys, so a rerun finds finished shards by their receipts
and encodes only the rest; a complete entry (manifest present) is reused without starting Ray at all.
"""

import argparse
import dataclasses
import functools
import os
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from preprocessing import storage
from preprocessing.cache.entry import CacheEntry, cache_id
from preprocessing.cache.shard import pack_shard
from preprocessing.readers import RawSample, Reject, read_asr_manifest, read_librispeech, read_llava, read_series
from preprocessing.validate import Limits, Rejected, check_series, check_text, decode_audio, decode_image

from .config import load_config, parse_overrides, to_dict

MODALITY_OF_FORMAT = {"llava": "image", "asr_jsonl": "audio", "librispeech": "audio", "series": "series"}
RAW_SERIES = "raw"  # trainable series encoders (WaveNet) get the normalised input, not features
# Forwarded (by name) to the Ray workers that read and write storage; values never printed.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_DEFAULT_REGION", "AWS_REGION")


@dataclass
class DatasetConfig:
    format: Literal["llava", "asr_jsonl", "librispeech", "series"]
    path: str
    media_root: str | None = None  # image/audio paths resolve against this (default: the manifest's folder)
    # media paths must stay inside media_root (no absolute paths, `..` or symlinks out); true lifts that
    allow_media_outside_root: bool = False
    # series only
    lookback: int = 96
    horizon: int = 24
    stride: int = 24
    split: Literal["train", "val", "test"] = "train"
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    columns: list[str] | None = None
    time_column: str | None = None
    nan_policy: Literal["reject", "interpolate"] = "reject"
    prompt: str = "<series>\nForecast the next values."

    def __post_init__(self):
        if min(self.lookback, self.horizon, self.stride) < 1:
            raise ValueError("lookback, horizon and stride must be positive")
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) < 0:
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {self.fractions}")


@dataclass
class EncoderSpec:
    kind: str  # a registered frozen encoder (clip, siglip2, whisper, ...) or "raw" for WaveNet series
    model_dir: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    image_size: int | None = None  # vision only: square input size (default: the model's processor config)

    def __post_init__(self):
        from preprocessing.encoders import ENCODERS
        from preprocessing.encoders.vision import VISION_ENCODERS

        if self.image_size is not None and self.kind not in VISION_ENCODERS:
            raise ValueError(f"encoder.image_size applies to vision encoders, not {self.kind!r}")

        if self.kind != RAW_SERIES and self.kind not in ENCODERS:
            raise ValueError(f"encoder.kind {self.kind!r} is not one of {sorted(ENCODERS) + [RAW_SERIES]}")
        if self.kind != RAW_SERIES and not self.model_dir:
            raise ValueError(f"encoder.model_dir is required for {self.kind!r} (a local model directory)")


@dataclass
class CacheConfig:
    root: str = "runs/cache"  # a folder or s3://bucket/prefix
    shard_size: int = 256

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


@dataclass
class EncodeConfig:
    dataset: DatasetConfig
    encoder: EncoderSpec
    limits: Limits = field(default_factory=Limits)
    cache: CacheConfig = field(default_factory=CacheConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # the context length the cache will train at: encode counts and names the samples over it (changes no feature)
    max_length: int | None = None


@dataclass
class EncodeResult:
    uri: str
    manifest: dict
    reused: bool
    encoded_shards: list[int]
    seconds: float
    over_length: list[dict] | None = None  # with max_length: the samples over it, features uncompressed


# ---- driver side: read, key, plan ---------------------------------------------------------------------------
def read_dataset(d: DatasetConfig) -> tuple[list[RawSample], list[Reject]]:
    if d.format == "llava":
        return read_llava(d.path, d.media_root, d.allow_media_outside_root)
    if d.format == "asr_jsonl":
        return read_asr_manifest(d.path, d.media_root, d.allow_media_outside_root)
    if d.format == "librispeech":
        return read_librispeech(d.path)
    return read_series(d.path, d.lookback, d.horizon, d.stride, d.split, d.fractions, d.columns, d.time_column,
                       d.nan_policy, d.prompt)


@functools.cache
def world_tokenizer():
    from modrwkv.tokenizer import WorldTokenizer

    return WorldTokenizer()


def check_texts(samples: list[RawSample], rejects: list[Reject]) -> list[RawSample]:
    tokenizer, kept = world_tokenizer(), []
    for s in samples:
        try:
            check_text(s.meta["turns"], tokenizer)
            kept.append(s)
        except Rejected as e:
            rejects.append(Reject(s.meta.get("source", "?"), str(e), s.key, stage="validate"))
    return kept


def file_sha256(uri: str) -> str:
    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except (FileNotFoundError, OSError):
        return "missing"  # the validate stage rejects it with the reason


def source_hash(samples: list[RawSample]) -> str:
    """Descriptors and the bytes of every raw file: edited data never reuses a stale cache."""
    files = sorted({src for s in samples for src in s.sources})
    with ThreadPoolExecutor(8) as pool:
        contents = dict(zip(files, pool.map(file_sha256, files)))
    digest = hashlib.sha256()
    for s in samples:
        record = {**dataclasses.asdict(s), "content": [contents[src] for src in s.sources]}
        digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


def cache_spec(config: EncodeConfig, samples: list[RawSample], modality: str) -> dict:
    from preprocessing.encoders.base import hash_model_dir

    e = config.encoder
    preprocessing = {"limits": dataclasses.asdict(config.limits), "shard_size": config.cache.shard_size,
                     # where the files are, and the permission to read outside the root, change no feature:
                     # the samples they admit are in source_hash
                     "dataset": {k: v for k, v in dataclasses.asdict(config.dataset).items()
                                 if k not in ("path", "media_root", "allow_media_outside_root")}}
    return {"modality": modality,
            "encoder": {"kind": e.kind, "dtype": e.dtype, "image_size": e.image_size,
                        "weights_hash": hash_model_dir(e.model_dir) if e.model_dir else None},
            "preprocessing": preprocessing, "source_hash": source_hash(samples)}


def entry_uri(root: str, spec: dict) -> str:
    return storage.join(root, f"{spec['modality']}-{spec['encoder']['kind']}-{cache_id(spec)[:16]}")


def plan_shards(samples: list[RawSample], shard_size: int) -> list[list[RawSample]]:
    ordered = sorted(samples, key=lambda s: s.key)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


# ---- Ray side: validate, encode, write ----------------------------------------------------------------------
def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_and_validate(row: dict, limits: dict) -> dict:
    """Decodes every raw input of the shard; a sample that fails gets a reject reason instead of payloads."""
    limits = Limits(**limits)
    samples = json.loads(row["samples"])
    for s in samples:
        s["payloads"], s["reject"], s["meta"]["content_sha256"] = [], None, []
        try:
            if s["modality"] == "series":
                lookback = check_series(s["series"]["lookback"], limits, "lookback")
                target = check_series(s["series"]["target"], Limits(min_series_length=1), "target")
                s["payloads"] = [npy(lookback), npy(target)]
            for src in s["sources"]:
                try:
                    data = storage.read_bytes(src)
                except (FileNotFoundError, OSError) as e:
                    raise Rejected(f"cannot read {src}: {e}") from None
                s["meta"]["content_sha256"].append(hashlib.sha256(data).hexdigest())
                try:
                    decoded = decode_image(data, limits) if s["modality"] == "image" else decode_audio(data, limits)
                except Rejected as e:
                    raise Rejected(f"{src}: {e}") from None
                s["payloads"].append(npy(decoded))
        except Rejected as e:
            s["reject"], s["payloads"] = str(e), []
    # payloads travel as .npy bytes (hex in JSON keeps the row a plain string column)
    for s in samples:
        s["payloads"] = [p.hex() for p in s["payloads"]]
    return {"index": row["index"], "samples": json.dumps(samples)}


def from_npy(hex_bytes: str) -> np.ndarray:
    return np.load(io.BytesIO(bytes.fromhex(hex_bytes)), allow_pickle=False)


class ShardEncoder:
    """An actor: holds one frozen encoder, turns a validated shard into a written shard and its receipt."""

    def __init__(self, encoder: dict, entry_uri: str, batch_size: int):
        import torch

        self.spec, self.entry, self.batch_size = EncoderSpec(**encoder), CacheEntry(entry_uri), batch_size
        self.encoder = None
        if self.spec.kind != RAW_SERIES:
            from preprocessing.encoders import build_encoder

            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.spec.dtype]
            device = "cuda" if torch.cuda.is_available() else "cpu"
            extra = {"image_size": self.spec.image_size} if self.spec.image_size else {}
            self.encoder = build_encoder(self.spec.kind, self.spec.model_dir, device=device, dtype=dtype, **extra)

    def encode_items(self, modality: str, items: list, ids: list[str]) -> list[np.ndarray]:
        if modality == "image":
            out = self.encoder.encode(items, ids)
        elif modality == "audio":
            out = self.encoder.encode(items, [16000] * len(items), ids)
        else:
            out = self.encoder.encode(items, ids)
        return [o.float().numpy().astype(np.float16) for o in out]

    def encode_samples(self, samples: list[dict]) -> dict[str, list[np.ndarray] | str]:
        """key -> feature arrays, or key -> reject reason when the encoder refuses the sample."""
        results = {}
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            items = [(s["key"], from_npy(p)) for s in chunk for p in s["payloads"]]
            if not items:  # text-only samples (LLaVA mixes have them): nothing to encode
                results.update({s["key"]: [] for s in chunk})
                continue
            try:
                feats = self.encode_items(chunk[0]["modality"], [x for _, x in items], [k for k, _ in items])
            except ValueError:  # find the sample the encoder refuses; the others still get encoded
                for s in chunk:
                    try:
                        payloads = [from_npy(p) for p in s["payloads"]]
                        results[s["key"]] = self.encode_items(s["modality"], payloads, [s["key"]] * len(payloads))
                    except ValueError as e:
                        results[s["key"]] = f"encoder refused it: {e}"
                continue
            for (key, _), f in zip(items, feats):
                results.setdefault(key, []).append(f)
            for s in chunk:
                results.setdefault(s["key"], [])
        return results

    def series_arrays(self, s: dict) -> tuple[dict, dict]:
        import torch

        from modrwkv.wavenet import normalize_series

        lookback, target = (torch.from_numpy(from_npy(p)).float()[:, None] for p in s["payloads"])
        normalised, mean, std = normalize_series(lookback, s["key"])
        stats = {"mean": float(mean), "std": float(std)}
        # the normalised lookback rides along for every encoder: evaluation needs it for seasonal-naive baselines
        arrays = {"target": ((target - mean) / std)[:, 0].numpy(), "lookback": normalised[:, 0].numpy()}
        if self.encoder is None:
            arrays["item0"] = normalised.numpy()
        else:
            arrays["item0"] = self.encode_items("series", [normalised[:, 0].numpy()], [s["key"]])[0]
        return arrays, stats

    def __call__(self, batch: dict) -> dict:
        receipts = []
        for index, samples_json in zip(batch["index"], batch["samples"]):
            samples = json.loads(samples_json)
            rejects = [{"key": s["key"], "source": s["meta"].get("source"), "stage": "validate", "reason": s["reject"]}
                       for s in samples if s["reject"]]
            good = [s for s in samples if not s["reject"]]
            written = []
            if good and good[0]["modality"] == "series":
                for s in good:
                    arrays, stats = self.series_arrays(s)
                    meta = {**s["meta"], **stats, "modality": "series"}
                    written.append({"key": s["key"], "arrays": arrays, "meta": meta})
            elif good:
                features = self.encode_samples(good)
                for s in good:
                    f = features[s["key"]]
                    if isinstance(f, str):
                        rejects.append({"key": s["key"], "source": s["meta"].get("source"), "stage": "encode",
                                        "reason": f})
                    else:
                        written.append({"key": s["key"], "arrays": {f"item{j}": a for j, a in enumerate(f)},
                                        "meta": {**s["meta"], "modality": s["modality"]}})
            receipt = self.entry.write_shard(int(index), pack_shard(written), [w["key"] for w in written], rejects,
                                             [sample_lengths(w) for w in written])
            receipts.append(json.dumps({"index": int(index), "count": receipt["count"], "rejected": len(rejects)}))
        return {"receipt": np.array(receipts, dtype=object)}


def sample_lengths(sample: dict) -> list:
    """[text tokens, [feature tokens of each item]]: what a context length is checked against."""
    from modrwkv.conversation import Turn, text_length

    n_items = sum(name.startswith("item") for name in sample["arrays"])
    items = [sample["arrays"][f"item{j}"].shape[0] for j in range(n_items)]
    turns = [Turn(**t) for t in sample["meta"]["turns"]]
    return [text_length(world_tokenizer(), turns, len(items), sample["key"]), items]


def encode_shards(config: EncodeConfig, uri: str, shards: list[list[RawSample]], todo: list[int]) -> None:
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        # a job on a cluster (`ray job submit` sets RAY_ADDRESS) joins it; only a new local instance is sized
        joining = config.run.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=config.run.ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if joining else {"num_cpus": max(config.run.actors, 1) + 1}))
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [{"index": i, "samples": json.dumps([dataclasses.asdict(s) for s in shards[i]])} for i in todo]
    runtime_env = {"env_vars": {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}}
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(decode_and_validate, fn_kwargs={"limits": dataclasses.asdict(config.limits)}, runtime_env=runtime_env)
    ds = ds.map_batches(ShardEncoder, batch_size=1, runtime_env=runtime_env,
                        compute=ray.data.ActorPoolStrategy(size=config.run.actors),
                        num_gpus=config.run.gpus_per_actor or None,
                        fn_constructor_kwargs={"encoder": dataclasses.asdict(config.encoder), "entry_uri": uri,
                                               "batch_size": config.run.batch_size})
    with tqdm(total=len(todo), desc="encode shards", unit="shard") as bar:
        for _ in ds.iter_rows():
            bar.update(1)


def run_encode(config: EncodeConfig) -> EncodeResult:
    start = time.perf_counter()
    samples, rejects = read_dataset(config.dataset)
    samples = check_texts(samples, rejects)
    modality = MODALITY_OF_FORMAT[config.dataset.format]
    spec = cache_spec(config, samples, modality)
    uri = entry_uri(config.cache.root, spec)
    entry = CacheEntry(uri)
    if entry.is_complete() and not config.run.force:
        manifest = entry.manifest()
        print(f"cache hit: {uri} ({manifest['counts']['written']} samples); nothing to encode")
        return EncodeResult(uri, manifest, True, [], time.perf_counter() - start, report_over_length(uri, config))
    if config.run.force:
        entry.clear()
    shards = plan_shards(samples, config.cache.shard_size)
    done = entry.done_shards()
    todo = [i for i in range(len(shards)) if i not in done]
    if done:
        print(f"resuming {uri}: {len(done)} of {len(shards)} shards already written")
    if todo:
        encode_shards(config, uri, shards, todo)
    read_rejects = [r.to_dict() for r in rejects]
    manifest = entry.finish(spec, len(shards), read_rejects, n_read=len(samples) + len(rejects),
                            extra={"config": to_dict(config), "code_version": code_version()})
    c = manifest["counts"]
    print(f"encoded {uri}: read {c['read']} = written {c['written']} + rejected {c['rejected']}"
          + (f" (see {storage.join(uri, 'rejects.jsonl')})" if c["rejected"] else ""))
    return EncodeResult(uri, manifest, False, todo, time.perf_counter() - start, report_over_length(uri, config))


def report_over_length(uri: str, config: EncodeConfig) -> list[dict] | None:
    """With `max_length`: prints how many samples exceed it by their text alone (training skips them with any
    projector) and with their features uncompressed (a projector's compression may bring these under)."""
    from preprocessing.cache.reader import FeatureCache

    if not config.max_length:
        return None
    cache = FeatureCache(uri)
    text_only, whole = cache.over_length(config.max_length, lambda n: 0), cache.over_length(config.max_length)
    if whole is None:
        print(f"{uri} was encoded before sample lengths were recorded: re-encode with --force to check max_length")
        return None
    examples = ", ".join(f"{s['key']} ({s['tokens']} tokens)" for s in whole[:3])
    print(f"max_length {config.max_length}: {len(text_only)} of {len(cache)} samples are over it by their text alone "
          f"(training skips them whatever the projector), {len(whole)} with their features uncompressed"
          + (f", e.g. {examples}" if whole else ""))
    return whole


def code_version() -> str:
    from importlib.metadata import version

    return version("modrwkv")


def main(args: argparse.Namespace) -> None:
    overrides = parse_overrides(args.set)
    if args.force:
        overrides["run.force"] = True
    if args.ray_address:
        overrides["run.ray_address"] = args.ray_address
    run_encode(load_config(args.config, EncodeConfig, overrides))


# `python -m pipelines.encode ...`, the job command for `ray job submit`: same flags as `modrwkv encode`
if __name__ == "__main__":
    import sys

    from pipelines.cli import main as cli_main

    sys.exit(cli_main(["encode", *sys.argv[1:]]))
