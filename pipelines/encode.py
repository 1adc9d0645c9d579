"""`modrwkv encode --config configs/encode_*.yaml`: raw dataset -> content-addressed WebDataset feature cache.

    readers (driver: descriptors, text checks) -> Ray Data: one row per shard
      -> map(decode_and_validate)             encoder items; bad sample -> that shard's rejects
      -> map_batches(ShardEncoder, actor pool) `encoder.encode(items, ids)` in micro-batches -> shard tar + receipt
    driver: receipts -> rejects.jsonl + manifest.json (last)

Shards are planned up front from the sorted sample keys, so a rerun finds finished shards by their receipts
and encodes only the rest; a complete entry (manifest present) is reused without starting Ray at all. The
schema is in `encode_config.py`, the cache key in `preprocessing/cache/key.py`.
"""

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from preprocessing import storage
from preprocessing.cache.entry import CacheEntry, FeatureCache, npy_bytes, pack_shard
from preprocessing.cache.key import cache_spec, code_version, entry_uri
from preprocessing.items import Audio
from preprocessing.readers import RawSample, Reject, read_asr_manifest, read_librispeech, read_llava, read_series
from preprocessing.validate import Limits, Rejected, check_series, check_text, decode_audio, decode_image

from .config import load_config, parse_overrides, to_dict
from .encode_config import MODALITY_OF_FORMAT, RAW_SERIES, DatasetConfig, EncodeConfig, EncoderSpec

# Forwarded (by name) to the Ray workers that read and write storage; values never printed.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_DEFAULT_REGION", "AWS_REGION")
# a raw media file -> the encoder's item (series windows are inline, see `series_window`)
DECODE_MEDIA = {"image": decode_image, "audio": decode_audio}


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
    from modrwkv.tokenizer import WorldTokenizer  # modrwkv imports torch: heavy

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


def plan_shards(samples: list[RawSample], shard_size: int) -> list[list[RawSample]]:
    ordered = sorted(samples, key=lambda s: s.key)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


# ---- Ray side: validate, encode, write ----------------------------------------------------------------------
# Items and arrays travel between the stages as hex .npy bytes (a plain string column); audio as .npz with its rate.
def pack_item(item) -> str:
    if isinstance(item, Audio):
        buf = io.BytesIO()
        np.savez(buf, wave=item.wave, rate=item.rate)
        return buf.getvalue().hex()
    return npy_bytes(item).hex()


def unpack_item(hex_bytes: str):
    loaded = np.load(io.BytesIO(bytes.fromhex(hex_bytes)), allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        return Audio(loaded["wave"], int(loaded["rate"]))
    return loaded


def series_window(s: dict, limits: Limits) -> tuple[list, dict, dict]:
    """(items, arrays, meta) of a window: the item is the normalised lookback; the normalised target and
    lookback (evaluation's seasonal-naive baselines need it whatever the encoder) are stored next to the
    features, with the stats that undo the normalisation."""
    # torch: heavy, only series windows need it
    import torch

    from modrwkv.wavenet import normalize_series

    lookback = check_series(s["series"]["lookback"], limits, "lookback")
    target = torch.from_numpy(check_series(s["series"]["target"], Limits(min_series_length=1), "target"))[:, None]
    try:
        normalised, mean, std = normalize_series(torch.from_numpy(lookback)[:, None], s["key"])
    except ValueError as e:
        raise Rejected(str(e)) from None
    arrays = {"target": ((target - mean) / std)[:, 0].numpy(), "lookback": normalised[:, 0].numpy()}
    meta = {"mean": float(mean), "std": float(std), "content_sha256": []}  # no files: no content hashes
    return [normalised[:, 0].numpy()], arrays, meta


def media_items(s: dict, limits: Limits) -> tuple[list, dict, dict]:
    """(items, arrays, meta) of a sample with media files: each file read, fingerprinted and decoded."""
    items, hashes = [], []
    for src in s["sources"]:
        try:
            data = storage.read_bytes(src)
        except (FileNotFoundError, OSError) as e:
            raise Rejected(f"cannot read {src}: {e}") from None
        hashes.append(hashlib.sha256(data).hexdigest())
        try:
            items.append(DECODE_MEDIA[s["modality"]](data, limits))
        except Rejected as e:
            raise Rejected(f"{src}: {e}") from None
    return items, {}, {"content_sha256": hashes}


def decode_and_validate(row: dict, limits: Limits) -> dict:
    """Turns every sample of the shard into encoder items (and arrays stored as they are); a sample that fails
    gets a reject reason instead."""
    samples = json.loads(row["samples"])
    for s in samples:
        s["items"], s["arrays"], s["reject"] = [], {}, None
        try:
            # series windows are inline values, every other sample is media files
            items, arrays, meta = series_window(s, limits) if s["series"] else media_items(s, limits)
            s["items"], s["meta"] = [pack_item(x) for x in items], {**s["meta"], **meta}
            s["arrays"] = {name: npy_bytes(a).hex() for name, a in arrays.items()}
        except Rejected as e:
            s["reject"] = str(e)
    return {"index": row["index"], "samples": json.dumps(samples)}


class RawSeries:
    """The encoder of the "raw" kind: WaveNet trains on the normalised series itself, one value per step."""

    def encode(self, items: list, ids: list[str] | None = None) -> list:
        import torch  # heavy: only the encoder actors need it

        return [torch.from_numpy(x)[:, None] for x in items]


class ShardEncoder:
    """An actor: holds one encoder, turns a validated shard into a written shard and its receipt."""

    def __init__(self, encoder: EncoderSpec, entry_uri: str, batch_size: int):
        self.spec, self.entry, self.batch_size = encoder, CacheEntry(entry_uri), batch_size
        if self.spec.kind == RAW_SERIES:
            self.encoder, self.feature_dtype = RawSeries(), np.float32  # the model's input: full precision
        else:
            self.encoder, self.feature_dtype = self.frozen_encoder(), np.float16  # features: half the bytes

    def frozen_encoder(self):
        # torch and transformers: heavy, only the encoder actors need them
        import torch

        from preprocessing.encoders import build_encoder

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.spec.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        extra = {"image_size": self.spec.image_size} if self.spec.image_size else {}
        return build_encoder(self.spec.kind, self.spec.model_dir, device=device, dtype=dtype, **extra)

    def encode_items(self, items: list, ids: list[str]) -> list[np.ndarray]:
        return [o.float().numpy().astype(self.feature_dtype) for o in self.encoder.encode(items, ids)]

    def encode_samples(self, samples: list[dict]) -> dict[str, list[np.ndarray] | str]:
        """key -> feature arrays, or key -> reject reason when the encoder refuses the sample."""
        results = {}
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            items = [(s["key"], unpack_item(p)) for s in chunk for p in s["items"]]
            if not items:  # text-only samples (LLaVA mixes have them): nothing to encode
                results.update({s["key"]: [] for s in chunk})
                continue
            try:
                feats = self.encode_items([x for _, x in items], [k for k, _ in items])
            except ValueError:  # find the sample the encoder refuses; the others still get encoded
                for s in chunk:
                    try:
                        results[s["key"]] = self.encode_items([unpack_item(p) for p in s["items"]],
                                                              [s["key"]] * len(s["items"]))
                    except ValueError as e:
                        results[s["key"]] = f"encoder refused it: {e}"
                continue
            for (key, _), f in zip(items, feats):
                results.setdefault(key, []).append(f)
            for s in chunk:
                results.setdefault(s["key"], [])
        return results

    def __call__(self, batch: dict) -> dict:
        receipts = []
        for index, samples_json in zip(batch["index"], batch["samples"]):
            samples = json.loads(samples_json)
            rejects = [{"key": s["key"], "source": s["meta"].get("source"), "stage": "validate", "reason": s["reject"]}
                       for s in samples if s["reject"]]
            good = [s for s in samples if not s["reject"]]
            features, written = self.encode_samples(good), []
            for s in good:
                f = features[s["key"]]
                if isinstance(f, str):
                    rejects.append({"key": s["key"], "source": s["meta"].get("source"), "stage": "encode", "reason": f})
                    continue
                arrays = {name: unpack_item(a) for name, a in s["arrays"].items()}
                arrays.update({f"item{j}": a for j, a in enumerate(f)})
                written.append({"key": s["key"], "arrays": arrays, "meta": {**s["meta"], "modality": s["modality"]}})
            receipt = self.entry.write_shard(int(index), pack_shard(written), [w["key"] for w in written], rejects,
                                             [sample_lengths(w) for w in written])
            receipts.append(json.dumps({"index": int(index), "count": receipt["count"], "rejected": len(rejects)}))
        return {"receipt": np.array(receipts, dtype=object)}


def sample_lengths(sample: dict) -> list:
    """[text tokens, [feature tokens of each item]]: what a context length is checked against."""
    from modrwkv.conversation import Turn, text_length  # modrwkv imports torch: heavy

    n_items = sum(name.startswith("item") for name in sample["arrays"])
    items = [sample["arrays"][f"item{j}"].shape[0] for j in range(n_items)]
    turns = [Turn(**t) for t in sample["meta"]["turns"]]
    return [text_length(world_tokenizer(), turns, len(items), sample["key"]), items]


def encode_shards(config: EncodeConfig, uri: str, shards: list[list[RawSample]], todo: list[int]) -> None:
    # heavy, and only a job that has shards to encode needs them
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
    ds = ds.map(decode_and_validate, fn_kwargs={"limits": config.limits}, runtime_env=runtime_env)
    ds = ds.map_batches(ShardEncoder, batch_size=1, runtime_env=runtime_env,
                        compute=ray.data.ActorPoolStrategy(size=config.run.actors),
                        num_gpus=config.run.gpus_per_actor or None,
                        fn_constructor_kwargs={"encoder": config.encoder, "entry_uri": uri,
                                               "batch_size": config.run.batch_size})
    with tqdm(total=len(todo), desc="encode shards", unit="shard") as bar:
        for _ in ds.iter_rows():
            bar.update(1)


def run_encode(config: EncodeConfig) -> EncodeResult:
    start = time.perf_counter()
    samples, rejects = read_dataset(config.dataset)
    samples = check_texts(samples, rejects)
    sections = dataclasses.asdict(config)
    spec = cache_spec(MODALITY_OF_FORMAT[config.dataset.format], sections["encoder"], sections["dataset"],
                      sections["limits"], config.cache.shard_size, samples)
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

    from pipelines.cli import main as cli_main  # the CLI imports this module: only the `-m` entry needs it

    sys.exit(cli_main(["encode", *sys.argv[1:]]))
