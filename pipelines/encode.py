"""`modrwkv encode --config configs/*/encode_*.yaml`: raw dataset -> features in the feature store + a cache entry.

    driver: a series config's record of its entry, found while its files are unchanged -> reused, nothing read
            (`series_resolution`); else readers, text checks; each media file's sha256 from the fingerprints (files
            read only when they changed); series windows normalised; the entry's key from the store key and the
            samples' records
      complete entry with that key -> reused, nothing encoded
      else the items the store lacks (each unique media file or window once; a raw window is no store item, its
      sample's lookback is) -> Ray Data:
        map(decode_item)                         read, check against its sha256, decode, prepare (the encoder's
                                                 host half, built once in the driver from the encoder's configs:
                                                 processor, log-mel); bad item -> its reason
        map_batches(ItemEncoder, actor pool)     `encoder.forward(prepared)` in micro-batches -> store
      (at most `run.in_process_max_items` of them: the same two steps in the driver, without Ray)
    driver: the samples table (turns + the item files they reference, series arrays) -> shards, rejects.jsonl,
            manifest.json

Media travel between the stages as binary columns. An interrupted job loses nothing: the items it stored are
found by the next run. The schema is in `encode_config.py`, the keys in `preprocessing/cache/key.py`, the
on-disk format in `preprocessing/cache/entry.py`. A collection (`dataset.each_folder`) is a job per folder, an
entry each, `run.folder_jobs` at once as Ray tasks (`run_encodes`).
"""

import argparse
import dataclasses
import functools
import hashlib
import io
import itertools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from modrwkv.conversation import Sample, Turn, text_length
from modrwkv.tokenizer import WorldTokenizer
from preprocessing import storage
from preprocessing.cache.entry import (WRITTEN_WITH, CacheEntry, FeatureCache, FeatureStore, item_length, npy_bytes,
                                      pack_shard, shard_name)
from preprocessing.cache.key import (cache_fingerprints, cache_spec, code_version, entry_uri, hash_model_dir,
                                     library_versions, shard_order, store_key)
from preprocessing.cache.lease import lease, wait_out_sweep
from preprocessing.cache.precision import checked_stored
from preprocessing.cache.resolved import Resolution, source_digest
from preprocessing.items import RAW_SERIES
from preprocessing.local_copy import local_configs, local_copy
from preprocessing.readers import (RawSample, Reject, read_aishell, read_asr_manifest, read_librispeech, read_llava,
                                   read_series)
from preprocessing.readers.series import READERS as SERIES_READERS
from preprocessing.validate import (Limits, Rejected, check_series, check_text, decode_audio, decode_image,
                                   keyed_limits, normalised_lookback)

from .config import load_config, parse_overrides, to_dict
from .encode_config import MODALITY_OF_FORMAT, DatasetConfig, EncodeConfig, EncoderSpec, RunConfig

# a raw media file -> the encoder's item (series windows are inline, see `series_window`)
DECODE_MEDIA = {"image": decode_image, "audio": decode_audio}


@dataclass
class EncodeResult:
    uri: str
    manifest: dict
    reused: bool
    items: dict  # unique items: how many the dataset references, found in the store, encoded now, rejected
    seconds: float
    over_length: list[dict] | None = None  # with max_length: the samples over it, features uncompressed
    fingerprinted_files: int = 0  # files whose bytes were read to fingerprint them (changed or new)
    encoded_in: str | None = None  # "driver" (a small job), "ray", or None when nothing was encoded


@dataclass
class Prepared:
    """A sample on its way into the samples table."""

    raw: RawSample
    refs: list[str]  # its items, in order: sha256 of each media file's bytes (or of the normalised window)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # stored as they are (series targets)
    meta: dict = field(default_factory=dict)  # added to the raw meta (series normalisation stats)

    def record(self) -> dict:
        """What the entry key covers of this sample: its descriptor and its items' content (a series window's raw
        values by their sha256: `series_window` lets the values go)."""
        described = {**dataclasses.asdict(self.raw), "refs": self.refs}
        if "values_sha256" in self.meta:
            described["values_sha256"] = self.meta["values_sha256"]
        return described


# ---- driver side: read, key, plan ---------------------------------------------------------------------------
def read_dataset(d: DatasetConfig) -> tuple[list[RawSample], list[Reject]]:
    if d.format == "llava":
        return read_llava(d.path, d.media_root, d.allow_media_outside_root)
    if d.format == "asr_jsonl":
        return read_asr_manifest(d.path, d.media_root, d.allow_media_outside_root)
    if d.format == "librispeech":
        return read_librispeech(d.path, allow_outside_root=d.allow_media_outside_root)
    if d.format == "aishell":
        return read_aishell(d.path, d.media_root, d.allow_media_outside_root)
    return read_series(d.path, d.lookback, d.horizon, d.stride, d.split, d.fractions, d.columns, d.time_column,
                       d.nan_policy, d.prompt, d.split_rows, d.max_windows)


@functools.cache
def world_tokenizer():
    return WorldTokenizer()


def check_texts(samples: list[RawSample], rejects: list[Reject]) -> list[RawSample]:
    tokenizer, kept = world_tokenizer(), []
    for s in samples:
        try:
            check_text(s.meta["turns"], tokenizer, s.modality, 1 if s.modality == "series" else len(s.sources))
            kept.append(s)
        except Rejected as e:
            rejects.append(Reject(s.meta.get("source", "?"), str(e), s.key, stage="validate"))
    return kept


def plan_shards(samples: list[Sample], shard_size: int) -> list[list[Sample]]:
    """Shards of `shard_size` samples, in `shard_order` (their keys' sha256): fixed by the keys alone, and unrelated
    to them. In key order a shard held consecutive windows of one series (keys "<series>-<start>") or one speaker's
    utterances, and training, which shuffles shards and then samples within windows of a few shards, drew whole
    batches from them."""
    ordered = sorted(samples, key=lambda s: shard_order(s.key))
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def series_window(s: RawSample, limits: Limits) -> Prepared:
    """A window's item is its normalised lookback; the normalised target and lookback (evaluation's
    seasonal-naive baselines need it whatever the encoder) are stored in the sample, with the stats that undo the
    normalisation. Empties `s.series`: the raw values are not kept."""
    # torch: heavy, only series windows need it
    import torch

    from modrwkv.wavenet import STD_FLOOR

    # the raw values are let go here, prepared or rejected (s.series emptied: views of whole series, each freed with
    # its last window), the driver holding every window until the entry is written; the key covers them by digest
    try:
        normalised, mean, std = normalised_lookback(s.series["lookback"], limits, s.key)
        target = torch.from_numpy(check_series(s.series["target"], Limits(min_series_length=1), "target"))[:, None]
        values = {part: hashlib.sha256(np.ascontiguousarray(v, dtype="<f8").tobytes()).hexdigest()
                  for part, v in s.series.items()}
    finally:
        s.series.clear()
    # a flat lookback's std is the floor: a target that moves by more would train on normalised values of 1e5
    if float(std) <= STD_FLOOR and float((target - mean).abs().max()) > STD_FLOOR:
        raise Rejected("the lookback is flat but the target moves: the target has no scale to be normalised by")
    window = normalised[:, 0].numpy()
    scaled_target = ((target - mean) / std)[:, 0].float()
    if not bool(torch.isfinite(scaled_target).all()):  # past float32's range: stored as inf, a NaN loss in training
        raise Rejected(f"the target normalised by the lookback (mean {float(mean):.6g}, std {float(std):.6g}) is past "
                       "float32's range")
    arrays = {"target": scaled_target.numpy(), "lookback": window, "item": window}
    return Prepared(s, [hashlib.sha256(npy_bytes(window)).hexdigest()], arrays,
                    {"mean": float(mean), "std": float(std), "values_sha256": values})


def prepare(samples: list[RawSample], rejects: list[Reject], limits: Limits,
            fingerprints: storage.Fingerprints) -> list[Prepared]:
    """Every sample with its items' refs (media files fingerprinted, series windows normalised); a sample whose
    file is missing or whose window is unusable is rejected with the reason."""
    digests = fingerprints.sha256s([src for s in samples for src in s.sources])
    prepared = []
    for s in samples:
        try:
            if s.series:
                prepared.append(series_window(s, limits))
                continue
            missing = [src for src in s.sources if digests[src] is None]
            if missing:
                raise Rejected(f"cannot read {missing[0]}: no such file")
            refs = [digests[src] for src in s.sources]
            prepared.append(Prepared(s, refs, meta={"content_sha256": refs}))  # provenance: each file's sha256
        except Rejected as e:
            rejects.append(Reject(s.sources[0] if s.sources else s.meta.get("source", "?"), str(e), s.key,
                                  stage="validate"))
    return prepared


# ---- Ray side: decode and prepare, encode, store ------------------------------------------------------------
# An item travels between the stages as the .npz bytes of its prepared arrays (`EncoderInputs.prepare`).
def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        return {name: loaded[name] for name in loaded.files}


# the reason of a file whose bytes are not those it was fingerprinted and keyed by: `write_entry` drops its
# fingerprint, so that the next run hashes it again rather than reject it for good
CHANGED = ("its bytes are not those this job keyed it by: rewritten while the job ran, or before it keeping its size "
           "and modification time (cp -p, rsync -a); its fingerprint is dropped, run the job again")


def decode_item(row: dict, modality: str, limits: Limits, inputs, s3: storage.Settings | None = None) -> dict:
    """One item ready for the encoder's model: a media file read, checked against the sha256 it was keyed by,
    decoded and prepared by `inputs` (resize + patchify, log-mel, normalisation), or a series window prepared; an
    unusable one gets its reason instead. `s3`: the driver's S3 settings (a Ray task)."""
    if s3:
        s3.apply()
    name = row["source"] or f"window {row['ref'][:12]}"
    try:
        if row["source"]:
            try:
                data = storage.read_bytes(row["source"])
            except FileNotFoundError as e:  # gone since it was fingerprinted
                raise Rejected(f"cannot read it: {e}") from None
            except OSError as e:  # storage failing (after pyarrow's retries): fail, or the entry would miss it for good
                raise OSError(f"{row['source']}: cannot read it: {e}") from e
            if hashlib.sha256(data).hexdigest() != row["ref"]:
                raise Rejected(CHANGED)
            item = DECODE_MEDIA[modality](data, limits)
        else:
            item = np.load(io.BytesIO(row["window"]), allow_pickle=False)
    except Rejected as e:
        return {"ref": row["ref"], "item": b"", "reject": f"{name}: {e}"}
    try:
        return {"ref": row["ref"], "item": pack_arrays(inputs.prepare(item, name)), "reject": ""}
    except ValueError as e:
        return {"ref": row["ref"], "item": b"", "reject": f"the encoder refused it: {e}"}


def encoder_inputs(spec: EncoderSpec):
    """The host half of the job's encoder (`EncoderInputs`), what the decode tasks run: built once, here."""
    from preprocessing.encoders import build_inputs, build_settings  # transformers: heavy, only a job with items

    # an s3:// folder: its configs alone (the driver never needs the weights)
    return build_inputs(spec.kind, local_configs(spec.model_dir), **build_settings(dataclasses.asdict(spec)))


class ItemEncoder:
    """An actor: holds one encoder's model; encodes a micro-batch of prepared items and stores each one's
    features."""

    def __init__(self, encoder: EncoderSpec, store: FeatureStore, s3: storage.Settings | None = None):
        if s3:  # the driver's S3 settings, for a Ray actor
            s3.apply()
        self.spec, self.store = encoder, store
        self.encoder = self.frozen_encoder()

    def frozen_encoder(self):
        # torch and transformers: heavy, only the encoder actors need them
        import torch

        from preprocessing.encoders import build_encoder, build_settings
        from preprocessing.encoders.base import DTYPES

        dtype = DTYPES[self.spec.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model_dir = local_copy(self.spec.model_dir)  # an s3:// folder: this node's copy
        keyed = self.store.key().get("weights_hash")
        if keyed and (found := hash_model_dir(model_dir)) != keyed:  # replaced since the driver keyed the store
            raise RuntimeError(f"{self.spec.model_dir}: other weights (sha256 {found[:12]}) than the job keyed its "
                               f"feature store by ({keyed[:12]}): they changed while it ran, and a rerun keys them "
                               "anew; or they were replaced keeping their size and modification time (cp -p, rsync "
                               "-a), which the driver's fingerprints take for unchanged: touch the new files")
        settings = build_settings(dataclasses.asdict(self.spec))
        return build_encoder(self.spec.kind, model_dir, device=device, dtype=dtype, **settings)

    def __call__(self, batch: dict) -> dict:
        refs, files, rejects = list(batch["ref"]), [""] * len(batch["ref"]), list(batch["reject"])
        good = [i for i, reason in enumerate(rejects) if not reason]
        if good:
            features = self.encoder.forward([unpack_arrays(batch["item"][i]) for i in good])
            for i, f in zip(good, features):
                try:
                    stored = checked_stored(f.float().numpy(), self.store.precision)
                except ValueError as e:
                    rejects[i] = f"{e}; the encoder ran in {self.spec.dtype}"
                    continue
                files[i] = self.store.write(refs[i], stored)
        return {"ref": np.array(refs, dtype=object), "file": np.array(files, dtype=object),
                "reject": np.array(rejects, dtype=object)}


def encode_items(config: EncodeConfig, store: FeatureStore, todo: dict[str, dict]) -> tuple[dict[str, dict], str]:
    """ref -> {"file"} or {"reject"} for each item in `todo` (ref -> {"source"} or {"window"}), and where they were
    encoded: "driver" or "ray" (see `encodes_in_driver`)."""
    from tqdm import tqdm  # only a job that has items to encode needs it

    rows = [{"ref": ref, "source": item.get("source", ""), "window": item.get("window", b"")}
            for ref, item in sorted(todo.items())]
    where = "driver" if encodes_in_driver(config.run, len(rows)) else "ray"
    batches = (encode_in_driver if where == "driver" else encode_with_ray)(config, store, rows)
    results = {}
    with tqdm(total=len(rows), desc=f"encode items ({where})", unit="item") as bar:
        for batch in batches:
            for ref, name, reason in zip(batch["ref"], batch["file"], batch["reject"]):
                results[ref] = {"reject": reason} if reason else {"file": name}
            bar.update(len(batch["ref"]))
    return results, where


def encodes_in_driver(run: RunConfig, items: int) -> bool:
    """A job of at most `run.in_process_max_items` items encodes in the driver, unless its actors would get GPUs
    and the driver has none (a cluster's head node): there Ray Data's GPUs beat the driver's CPU at any size."""
    import torch  # loaded already: the driver's text checks import modrwkv

    return items <= run.in_process_max_items and (not run.gpus_per_actor or torch.cuda.is_available())


def encode_in_driver(config: EncodeConfig, store: FeatureStore, rows: list[dict]) -> Iterator[dict]:
    """The Ray stages' own functions, one micro-batch at a time in this process: a small job skips Ray Data's fixed
    cost (planning, starting the actor pool, each actor loading its encoder)."""
    encoder = ItemEncoder(config.encoder, store)
    modality = MODALITY_OF_FORMAT[config.dataset.format]
    for start in range(0, len(rows), config.run.batch_size):
        decoded = [decode_item(row, modality, config.limits, encoder.encoder.inputs)
                   for row in rows[start : start + config.run.batch_size]]
        yield encoder({column: [d[column] for d in decoded] for column in ("ref", "item", "reject")})


# Times a local instance retries a task its memory monitor killed before the task fails (Ray's default: without end,
# in silence, as log_to_driver is off)
OOM_RETRIES = 2


def join_ray(run: RunConfig, local_cpus: int):
    """Ray, initialised: a job on a cluster (`ray job submit` sets RAY_ADDRESS, or `run.ray_address`) joins it;
    only a new local instance is configured: sized to `local_cpus`, a task killed for memory retried OOM_RETRIES
    times."""
    import ray  # heavy: only the jobs that need it import it

    from infra.local_ray import init_ray

    if not ray.is_initialized():
        init_ray(run.ray_address, include_dashboard=False, log_to_driver=False,
                 local={"num_cpus": local_cpus, "_system_config": {"task_oom_retries": OOM_RETRIES}})
    return ray


def encode_with_ray(config: EncodeConfig, store: FeatureStore, rows: list[dict]) -> Iterator[dict]:
    ray = join_ray(config.run, local_cpus=config.run.actors + 1)
    ray.data.DataContext.get_current().enable_progress_bars = False
    s3 = storage.settings()  # an argument, not a runtime env's variables (see storage.Settings)
    blocks = max(1, min(len(rows) // config.run.batch_size, 64))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map(decode_item, fn_kwargs={"modality": MODALITY_OF_FORMAT[config.dataset.format],
                                        "limits": config.limits, "inputs": encoder_inputs(config.encoder), "s3": s3})
    ds = ds.map_batches(ItemEncoder, batch_size=config.run.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=config.run.actors),
                        num_gpus=config.run.gpus_per_actor or None,
                        fn_constructor_kwargs={"encoder": config.encoder, "store": store, "s3": s3})
    yield from ds.iter_batches(batch_size=None)


def samples_table(prepared: list[Prepared], files: dict[str, str], item_rejects: dict[str, str],
                  rejects: list[Reject], inline: bool = False) -> list[Sample]:
    """The samples to write, referencing their item files (none with `inline`: raw series windows, their own items);
    a sample with a rejected item is rejected."""
    written = []
    for p in prepared:
        failed = None if inline else next((i for i, ref in enumerate(p.refs) if ref not in files), None)
        if failed is not None:  # named by the item that failed (a sample may hold several)
            source = p.raw.sources[failed] if failed < len(p.raw.sources) else p.raw.meta.get("source", "?")
            rejects.append(Reject(source, item_rejects[p.refs[failed]], p.raw.key, stage="encode"))
            continue
        meta = {k: v for k, v in {**p.raw.meta, **p.meta}.items() if k != "turns"}
        written.append(Sample(p.raw.key, p.raw.modality, [Turn(**t) for t in p.raw.meta["turns"]],
                              [] if inline else [files[ref] for ref in p.refs], lookback=p.arrays.get("lookback"),
                              target=p.arrays.get("target"), meta=meta))
    return written


def sample_lengths(sample: Sample) -> list:
    """[text tokens, [feature vectors of each item]]: what a context length is checked against."""

    items = [len(sample.lookback)] if sample.items_inline else [item_length(name) for name in sample.item_files]
    return [text_length(world_tokenizer(), sample.turns, len(items), sample.key), items]


# a series config's options that change no window: its record finds the entry whatever they are
CHANGE_NO_WINDOW = ("max_windows", "each_folder")


def series_resolution(config: EncodeConfig, store: dict) -> Resolution | None:
    """A series config's record of its entry (`preprocessing/cache/resolved.py`), described by what decides its
    samples beside its files: the dataset options that change a window, the store's key (the encoder's weights,
    the limits), the shard size, and the code and libraries that read, cut, check, tokenize and key windows."""
    if config.dataset.format != "series":
        return None
    from modrwkv import conversation, tokenizer, wavenet
    from preprocessing import validate
    from preprocessing.cache import entry, index, key
    from preprocessing.readers import sample, series

    dataset = {k: v for k, v in dataclasses.asdict(config.dataset).items() if k not in CHANGE_NO_WINDOW}
    path = config.dataset.path.rstrip("/")
    dataset["path"] = path if storage.is_remote(path) else os.path.abspath(path)  # one record however it is named
    # conversation: what a window's text checks and token counts are; index: what the entry's index holds
    code = source_digest([sys.modules[__name__], series, sample, validate, key, entry, index, storage, wavenet,
                          tokenizer, conversation], ["numpy", "pyarrow", "rwkv"])  # rwkv: the tokenizer's vocabulary
    described = {"dataset": dataset, "store": store, "shard_size": config.cache.shard_size, "code": code}
    return Resolution(config.cache.root, described, series.files_read(config.dataset.path))


def identity(config: EncodeConfig) -> tuple[dict, dict, Resolution | None]:
    """What names the job's output: the cache root's media fingerprints, the feature store's key, and for series
    the record of its entry (`series_resolution`)."""
    sections = dataclasses.asdict(config)
    fingerprints = cache_fingerprints(config.cache.root)
    modality = MODALITY_OF_FORMAT[config.dataset.format]
    key = store_key(modality, sections["encoder"], keyed_limits(config.limits, modality), fingerprints,
                    config.cache.precision)
    return fingerprints, key, series_resolution(config, key)


def found_unchanged(config: EncodeConfig, resolution: Resolution | None, start: float) -> EncodeResult | None:
    """The entry a series record names while the files it was encoded from are unchanged: nothing read. None:
    the dataset is to be read (its entry may still exist)."""
    found = None if config.run.force or resolution is None else resolution.find()
    if not found:
        return None
    manifest = CacheEntry(found).manifest()
    print(f"cache hit: {found} ({manifest['counts']['written']} samples), its files unchanged since; nothing read")
    return EncodeResult(found, manifest, True, manifest["items"], time.perf_counter() - start,
                        report_over_length(found, config))


def run_encode(config: EncodeConfig) -> EncodeResult:
    start = time.perf_counter()
    fingerprints, key, resolution = identity(config)
    found = found_unchanged(config, resolution, start)
    if found:
        return found
    samples, rejects = read_dataset(config.dataset)
    n_read = len(samples) + len(rejects)
    samples = check_texts(samples, rejects)  # the rejected let go (a series window holds a view of its series)
    prepared = prepare(samples, rejects, config.limits, fingerprints)
    store = FeatureStore.for_key(config.cache.root, key, library_versions())
    spec = cache_spec(key, dataclasses.asdict(config.dataset), config.cache.shard_size,
                      (p.record() for p in sorted(prepared, key=lambda p: p.raw.key)),
                      ((r.key, r.reason) for r in rejects))
    uri = entry_uri(config.cache.root, spec)
    entry = CacheEntry(uri)

    def cache_hit() -> EncodeResult:
        manifest = entry.manifest()
        print(f"cache hit: {uri} ({manifest['counts']['written']} samples); nothing to encode")
        if resolution:
            resolution.write(uri)
        return EncodeResult(uri, manifest, True, manifest["items"], time.perf_counter() - start,
                            report_over_length(uri, config), fingerprints.files_read)

    if entry.is_complete() and not config.run.force:
        return cache_hit()
    # one job writes an entry at a time (a second waits: it finds the entry the first wrote), and `gc` keeps the
    # store's items and this entry's files while it runs
    with lease(uri, store.name):
        if entry.is_complete() and not config.run.force:
            return cache_hit()
        if config.run.force:
            entry.clear()
        manifest, items, encoded_in = write_entry(config, entry, store, spec, prepared, rejects, n_read,
                                                  fingerprints)
    if resolution:
        resolution.write(uri)
    c = manifest["counts"]
    print(f"encoded {uri}: read {c['read']} = written {c['written']} + rejected {c['rejected']}"
          + (f" (see {storage.join(uri, 'rejects.jsonl')})" if c["rejected"] else ""))
    return EncodeResult(uri, manifest, False, items, time.perf_counter() - start, report_over_length(uri, config),
                        fingerprints.files_read, encoded_in)


def write_entry(config: EncodeConfig, entry: CacheEntry, store: FeatureStore, spec: dict, prepared: list,
                rejects: list[Reject], n_read: int,
                fingerprints: storage.Fingerprints) -> tuple[dict, dict, str | None]:
    """The items not yet in the store encoded, then the entry's shards and its manifest; (manifest, item counts,
    where the items were encoded)."""
    needed = {ref: {"source": src} for p in prepared for ref, src in zip(p.refs, p.raw.sources)}
    if config.encoder.kind != RAW_SERIES:  # a raw window is its own item, stored with it (`Sample.items_inline`)
        needed.update({p.refs[0]: {"window": npy_bytes(p.arrays["item"])} for p in prepared
                       if p.raw.modality == "series"})
    in_store = {} if config.run.force or not needed else store.items()
    todo = {ref: item for ref, item in needed.items() if ref not in in_store}
    if needed:
        print(f"{len(needed)} unique items: {len(needed) - len(todo)} in the store {store.uri}, {len(todo)} to encode")
    if len(todo) < len(needed):
        note_other_libraries(store)
    results, encoded_in = encode_items(config, store, todo) if todo else ({}, None)
    files = {ref: in_store[ref] for ref in needed if ref in in_store}
    files.update({ref: r["file"] for ref, r in results.items() if "file" in r})
    item_rejects = {ref: r["reject"] for ref, r in results.items() if "reject" in r}
    fingerprints.forget([needed[ref]["source"] for ref, reason in item_rejects.items() if reason.endswith(CHANGED)])
    written = samples_table(prepared, files, item_rejects, rejects, inline=config.encoder.kind == RAW_SERIES)
    shards, done = plan_shards(written, config.cache.shard_size), entry.done_shards()
    kept_shards = []
    for index, shard in enumerate(shards):
        keys, item_files = [w.key for w in shard], [w.item_files for w in shard]
        # an interrupted run's shard is kept only if it holds exactly these samples: one that run rejected and this
        # one encodes (or the reverse) moves every sample after it to another shard
        kept = done.get(index)
        if kept and kept["keys"] == keys and kept["item_files"] == item_files:
            kept_shards.append(entry.path(shard_name(index)))
        else:
            entry.write_shard(index, pack_shard(shard), keys, [], [sample_lengths(w) for w in shard], item_files)
    entry.delete_shards_from(len(shards))  # an earlier run's past this one's last
    reused = [storage.join(store.uri, in_store[ref]) for ref in needed if ref in in_store] + kept_shards
    if reused:  # what it wrote itself no sweep listed
        wait_out_sweep(storage.parent(entry.uri))
    gone = [uri for uri, stat in storage.stat_files(reused).items() if stat is None]
    if gone:  # a gc that listed the root before this job's lease: the manifest would name missing files
        raise RuntimeError(f"{len(gone)} of the {len(reused)} store items and shards this job found and reused were "
                           f"removed while it ran (a `modrwkv cache gc --apply`?), e.g. {gone[0]}; run the job "
                           "again: it writes them anew")
    items = {"unique": len(needed), "in_store": len(needed) - len(todo), "encoded": len(todo) - len(item_rejects),
             "rejected": len(item_rejects)}
    manifest = entry.finish(spec, len(shards), [r.to_dict() for r in rejects], n_read=n_read,
                            extra={"config": to_dict(config), "code_version": code_version(),
                                   "libraries": library_versions(),
                                   "feature_store": store.name, "items": items})
    return manifest, items, encoded_in


def note_other_libraries(store: FeatureStore) -> None:
    """Says so when the store's items were first written with other versions of the libraries that make features
    than this job runs: the items it reuses and those it adds may differ by a release's rounding."""
    recorded, running = store.key().get(WRITTEN_WITH) or {}, library_versions()
    differ = [f"{name} {recorded[name]} -> {running.get(name, 'none')}" for name in sorted(recorded)
              if recorded[name] != running.get(name)]
    if differ:
        print(f"note: the store {store.uri} was made with other library versions than this job runs "
              f"({', '.join(differ)}); the items it reuses may differ from those it encodes by their rounding "
              "(`run.force: true` re-encodes every item)", flush=True)


def run_encodes(config: EncodeConfig) -> list[EncodeResult]:
    """The config's entry, or with `dataset.each_folder` one per folder directly under `dataset.path`, each encoded
    by a job of its own (what one job holds is one folder's windows): `run.folder_jobs` at a time. A folder that
    fails does not stop the others: the failures are raised together at the end, each named, the other entries
    written (a rerun finds them)."""
    if not config.dataset.each_folder:
        return [run_encode(config)]
    path = config.dataset.path.rstrip("/")
    if not storage.is_folder(path):
        raise FileNotFoundError(f"{path}: no such folder (dataset.each_folder reads the folders inside it)")
    listed = storage.list_folders(path)
    # `.cache` (what `huggingface-cli download --local-dir` leaves), `.git`, `_temporary`: not datasets
    folders = [f for f in listed if not f.startswith((".", "_"))]
    if not folders:
        raise ValueError(f"{path}: dataset.each_folder reads the folders directly inside it, and there are none")
    if len(folders) < len(listed):
        print(f"{path}: not datasets, not read: {sorted(set(listed) - set(folders))}")
    loose = [f for f in storage.list_files(path) if f.endswith(tuple(SERIES_READERS))]
    if loose:  # a job per folder: series files beside the folders belong to none
        print(f"{path}: series files outside its folders, not read (move each into a folder of its own): {loose}")
    configs = [dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, path=storage.join(path, f),
                                                                       each_folder=False)) for f in folders]
    outcomes: dict[int, EncodeResult | str] = {}
    for index, outcome in folder_outcomes(configs, config.run):
        outcomes[index] = outcome
        print(f"[{len(outcomes)}/{len(folders)}] {folders[index]}: {told(outcome)}", flush=True)
    results = [outcomes[i] for i in range(len(folders)) if not isinstance(outcomes[i], str)]
    failures = [f"{folders[i]}: {outcomes[i]}" for i in range(len(folders)) if isinstance(outcomes[i], str)]
    if failures:
        raise RuntimeError(f"{path}: {len(failures)} of {len(folders)} folders failed to encode (the other "
                           f"{len(results)} entries are written; a rerun finds them):\n  " + "\n  ".join(failures))
    print(f"{path}: {len(results)} entries, one per folder:\n  " + "\n  ".join(r.uri for r in results))
    return results


def told(outcome: EncodeResult | str) -> str:
    """A folder's outcome in a line: what a job run as a Ray task printed reaches no console."""
    if isinstance(outcome, str):
        return outcome
    counts = outcome.manifest["counts"]
    over = "" if outcome.over_length is None else f", {len(outcome.over_length)} over max_length"
    return (f"{'found' if outcome.reused else 'encoded'} {outcome.uri} ({counts['written']} samples, "
            f"{counts['rejected']} rejected{over})")


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def lost(error: Exception, out_of_memory: type) -> str:
    """A lost task's failure in a line (Ray's memory report runs to 60) and, when memory killed it, what helps."""
    told = failure(error).splitlines()[0]
    return told + (" (fewer run.folder_jobs, or run.folder_memory_gb reserved for each, keep the folders' tasks "
                   "within a node's memory)" if isinstance(error, out_of_memory) else "")


# what a folder's data raises (TooManyWindows, no series file, a record unreadable): that folder's failure alone
DATA_ERRORS = (ValueError, FileNotFoundError)


def encode_folder(config: EncodeConfig, s3: storage.Settings | None = None) -> EncodeResult | str:
    """A collection folder's entry, or why its data failed to encode, which stops none of the other folders. `s3`:
    the driver's settings, given to a Ray task."""
    if s3 is not None:
        s3.apply()
    try:
        return run_encode(config)
    except DATA_ERRORS as e:
        return failure(e)


def folder_outcomes(configs: list[EncodeConfig], run: RunConfig) -> Iterator[tuple[int, EncodeResult | str]]:
    """Each folder's outcome (by its position in `configs`) as it is known: one after another in this process,
    or, with `run.folder_jobs` > 1, that many at once as Ray tasks of a CPU each, spread over a cluster's nodes
    (a task lost with its worker or node is that folder's failure; an error of the code stops them all). Series
    entries found from their records are found here first (a listing, no task)."""
    if run.folder_jobs == 1:
        yield from enumerate(map(encode_folder, configs))
        return
    to_encode = []
    for index, folder in enumerate(configs):
        try:
            found = found_unchanged(folder, identity(folder)[2], time.perf_counter())
        except DATA_ERRORS as e:
            found = failure(e)
        if found:
            yield index, found
        else:
            to_encode.append(index)
    if not to_encode:
        return
    ray = join_ray(run, local_cpus=run.folder_jobs * (run.actors + 1))  # a folder's job may start its encoders
    print(f"{len(to_encode)} of {len(configs)} folders to read, {run.folder_jobs} at a time as Ray tasks", flush=True)
    memory = {"memory": int(run.folder_memory_gb * 2**30)} if run.folder_memory_gb else {}
    local = not (run.ray_address or os.environ.get("RAY_ADDRESS"))  # no autoscaler to add a larger node
    if memory and local and memory["memory"] > ray.cluster_resources().get("memory", 0):
        raise ValueError(f"run.folder_memory_gb {run.folder_memory_gb:g}: the local Ray instance has "
                         f"{ray.cluster_resources().get('memory', 0) / 2**30:.1f} GiB for tasks; no folder task "
                         "could start")
    encode = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **memory)(encode_folder)
    s3, waiting, running = storage.settings(), iter(to_encode), {}
    for index in itertools.islice(waiting, run.folder_jobs):
        running[encode.remote(configs[index], s3)] = index
    while running:
        (done,), _ = ray.wait(list(running), num_returns=1)
        index = running.pop(done)
        try:
            outcome = ray.get(done)
        except ray.exceptions.RayTaskError as e:  # our code failed, not the folder's data: stop, as in one process
            for other in running:
                ray.cancel(other)
            raise e.as_instanceof_cause()
        except ray.exceptions.RayError as e:  # the task lost: killed for memory past its retries, its node gone
            outcome = lost(e, ray.exceptions.OutOfMemoryError)
        yield index, outcome
        for index in itertools.islice(waiting, 1):
            running[encode.remote(configs[index], s3)] = index


def report_over_length(uri: str, config: EncodeConfig) -> list[dict] | None:
    """With `max_length`: prints how many samples exceed it by their text alone (training skips them with any
    projector) and with their features uncompressed (a projector's compression may bring these under)."""
    if not config.max_length:
        return None
    cache = FeatureCache(uri)
    text_only, whole = cache.over_length(config.max_length, lambda n: 0), cache.over_length(config.max_length)
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
    run_encodes(load_config(args.config, EncodeConfig, overrides))


# `python -m pipelines.encode ...`, the job command for `ray job submit`: same flags as `modrwkv encode`
if __name__ == "__main__":
    from pipelines.cli import main as cli_main  # the CLI imports this module: only the `-m` entry needs it

    sys.exit(cli_main(["encode", *sys.argv[1:]]))
