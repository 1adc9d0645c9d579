"""What a training run resolves before its first step, whichever driver runs it (Ray Train or one process):
the model config from the caches' feature widths, the feature statistics the projectors normalise with, the
output folders, and the encoder settings the trained model records."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modrwkv.checkpoint import read_config
from modrwkv.config import RWKV7Config
from modrwkv.model_folder import (ENCODER_SETTINGS, backbone_weights, file_sha256, read_backbone_source,
                                  read_encoders_record)
from modrwkv.multimodal import ModRWKVConfig
from preprocessing import storage
from preprocessing.cache.entry import FeatureCache, Share
from preprocessing.cache.index import item_sums
from preprocessing.local_copy import local_copy, publish, working_dir

from .caches import absolute, draw_weights, resolve_groups
from .config import ConfigError
from .train_config import WHITEN_EPS, PhaseConfig, TrainConfig
from .trainer import samples_per_row


def cache_shapes(caches: list[FeatureCache]) -> tuple[dict[str, int], int, int]:
    """(modality -> the cached feature width, the projector's input; the forecast horizon and the lookback
    length, 0 without series), from the first sample of each cache that has a feature item (text-only samples
    and empty shards are passed over)."""
    widths, horizon, lookback = {}, 0, 0
    for cache in caches:
        samples = (s for i in range(len(cache.shards)) for s in cache.read_shard(i))
        sample = next((s for s in samples if s.items), None)
        if sample is None:
            raise ValueError(f"{cache.uri}: no sample holds {cache.modality} features (text-only or empty cache)")
        widths[cache.modality] = int(sample.items[0].shape[-1])
        if cache.modality == "series":
            horizon, lookback = int(sample.target.shape[0]), int(sample.lookback.shape[0])
    return widths, horizon, lookback


def model_config(config: TrainConfig, backbone: RWKV7Config, caches: list[FeatureCache]) -> ModRWKVConfig:
    """The model for these caches: each projector's input width is its cache's feature width (a width set in
    the config must agree), WaveNet's input channels the cached series'."""
    widths, horizon, lookback = cache_shapes(caches)
    missing = set(widths) - set(config.model.projectors)
    if missing:
        raise ConfigError(f"model.projectors: the caches hold {sorted(missing)} features but no projector is "
                          "configured")
    wavenet = None
    if config.model.wavenet and "series" in widths:
        wavenet = dataclasses.replace(config.model.wavenet, in_channels=widths["series"])
        widths["series"] = wavenet.hidden  # WaveNet's output is trained, not cached
    projectors = {}
    for modality, p in config.model.projectors.items():
        if modality not in widths:
            continue
        if p.encoder_dim not in (0, widths[modality]):
            raise ConfigError(f"model.projectors.{modality}.encoder_dim: {p.encoder_dim}, but the cached features "
                              f"are {widths[modality]} wide")
        projectors[modality] = dataclasses.replace(p, encoder_dim=widths[modality])
    series = "series" in widths
    return ModRWKVConfig(backbone, projectors, horizon if series else 0, wavenet,
                         forecast_lookback=lookback if series and config.model.forecast_skip else 0)


def feature_stats(caches: list[FeatureCache], normalize: dict[str, str], max_shards: int = 16,
                  max_vectors: int = 262_144, whiten_eps: float = WHITEN_EPS) -> dict[str, dict]:
    """For each modality in `normalize` (modality -> "standardize" or "whiten"): the mean of the cached feature
    vectors, and their per-dimension std or ZCA whitening matrix Σ^(-1/2) (each eigenvalue raised by `whiten_eps`
    times their mean, so that near-empty directions are not blown up), over about `max_vectors` vectors (enough for
    stable statistics, cheap on a cluster's driver) shared among the modality's caches by their sample counts, each
    cache's from every k-th sample of up to `max_shards` of its shards with features, spread over them
    (`stats_shares`). A modality whose caches hold no feature vector at all is an error."""
    moments = {c.modality: [0, 0.0, 0.0] for c in caches if c.modality in normalize}  # [n, sum x, sum x x^T]
    for cache in caches:
        if cache.modality not in normalize:
            continue
        samples = sum(len(c) for c in caches if c.modality == cache.modality)
        for share in stats_shares(cache, max_vectors * len(cache) / samples, max_shards):
            items = [a for s in cache.read_share(share) for a in s.items]
            if items:
                n, total, outer = moments[cache.modality]
                x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in items]).astype(np.float64)
                moments[cache.modality] = [n + len(x), total + x.sum(0), outer + x.T @ x]
    stats = {}
    for modality, (n, total, outer) in moments.items():
        if not n:
            uris = ", ".join(c.uri for c in caches if c.modality == modality)
            raise ValueError(f"{uris}: no {modality} feature vectors to normalise with (text-only or empty); "
                             f"set model.projectors.{modality}.normalize: none, or train on a cache with features")
        mean = total / n
        covariance = outer / n - np.outer(mean, mean)
        stats[modality] = {"mean": mean.tolist()}
        if normalize[modality] == "standardize":
            stats[modality]["std"] = (np.sqrt(np.maximum(np.diag(covariance), 0.0)) + 1e-6).tolist()
        else:
            eigenvalues, vectors = np.linalg.eigh(covariance)
            eigenvalues = np.maximum(eigenvalues, 0.0) + whiten_eps * max(eigenvalues.mean(), 1e-12)
            stats[modality]["whitening"] = ((vectors / np.sqrt(eigenvalues)) @ vectors.T).tolist()
    return stats


def stats_shares(cache: FeatureCache, vectors: float, max_shards: int) -> list[Share]:
    """Every k-th sample of up to `max_shards` of the cache's shards holding features, evenly spread over them, k
    chosen from the index's lengths so that their items hold about `vectors` feature vectors: statistics of many
    images or utterances, read with their features alone, rather than of the first few hundred in key order."""
    index = cache.index(["shard", "item_tokens"])
    per_shard = np.bincount(index["shard"].to_numpy(), weights=item_sums(index, lambda n: n),
                            minlength=len(cache.shards))
    with_features = np.flatnonzero(per_shard)
    # no more shards than the vectors wanted need (a collection's small share of the budget: one or two)
    needed = math.ceil(vectors / per_shard[with_features].mean()) if len(with_features) else 0
    spread = np.linspace(0, len(with_features) - 1, min(max_shards, max(needed, 1)))
    chosen = with_features[np.unique(spread.round().astype(int))] if len(with_features) else with_features
    step = max(1, math.ceil(per_shard[chosen].sum() / max(vectors, 1)))
    return [Share(int(i), 0, step, len(range(0, cache.shards[i]["count"], step))) for i in chosen]


def skipped_in_caches(caches: list[FeatureCache], mm_config: ModRWKVConfig, max_length: int,
                      left_out: list[str] = ()) -> dict[str, int]:
    """The samples training will skip, counted from the manifests' recorded lengths before any worker starts
    (training skips and names them; printed per cache): {"over_length_in_caches": those over `max_length` with this
    model's projectors, "too_short_in_caches": those with an item its projector compresses to nothing,
    "in_entries_left_out": those of the collection entries `left_out` of the draw (`PhasePlan.left_out`)}."""
    over_total = short_total = 0
    small = [cache for cache in caches if cache.uri in left_out]
    if small:
        print(f"{len(small)} collection entries hold fewer samples than the workers and are left out of the draw "
              f"({sum(map(len, small))} samples): {', '.join(cache.uri for cache in small)}")
    for cache in (cache for cache in caches if cache.uri not in left_out):
        projector = mm_config.projectors[cache.modality]
        short = cache.compressed_to_nothing(projector.compressed_length)
        if short:
            print(f"{cache.uri}: {len(short)} of {len(cache)} samples have an item of fewer feature vectors than the "
                  f"{cache.modality} projector's compression kernel {projector.kernel} and will be skipped, "
                  f"e.g. {short[0]}")
        known = set(short)  # training tells such a sample too short before it counts its tokens
        over = [s for s in cache.over_length(max_length, projector.compressed_length) if s["key"] not in known]
        if over:
            print(f"{cache.uri}: {len(over)} of {len(cache)} samples are over max_length {max_length} and will be "
                  f"skipped, e.g. {over[0]['key']} ({over[0]['tokens']} tokens)")
        over_total, short_total = over_total + len(over), short_total + len(short)
    return {"over_length_in_caches": over_total, "too_short_in_caches": short_total,
            "in_entries_left_out": sum(map(len, small))}


def phase_dir(config: TrainConfig, phase: int) -> str:
    """Where a phase's folders (model/, adapter/, Ray's checkpoints) go: a local folder or an s3:// URI."""
    return storage.join(absolute(config.output_dir), config.name, f"phase{phase}")


def backbone_record(path: str) -> dict:
    """{"path": the backbone's absolute path or URI}; for a URI also the sha256 of its weights (from this node's
    copy), which a local path's record gets from the file itself (`write_records`)."""
    path = absolute(path)
    if not storage.is_remote(path):
        return {"path": path}
    return {"path": path, "sha256": file_sha256(backbone_weights(Path(local_copy(path))))}


def backbone_sha256(record: dict) -> str | None:
    """The sha256 of a backbone record's weights: the record's own (a URI's), else its local file's; None where
    this machine cannot read them."""
    if record.get("sha256"):
        return record["sha256"]
    weights = None if storage.is_remote(record["path"]) else backbone_weights(Path(record["path"]))
    return file_sha256(weights) if weights and weights.is_file() else None


# what makes two caches' features vectors of different spaces, however alike their widths (a revision: our code changed
# the features, as WavLM's 3 feeds Base unnormalised samples); other settings (an image size, a storage precision)
# change features within one space: `encoder_store_keys` notes those
FEATURE_SPACE = ("kind", "weights_hash", "layer", "revision")


def check_feature_spaces(caches: list[FeatureCache], phase1_model: Path | None, phase1_uri: str | None) -> None:
    """One adapter reads every cache of its modality: caches whose features come from other encoder weights or
    layers than each other's, or than those phase I's adapter learnt (`phase1_model`, its local copy), are refused
    before anything trains on them."""
    first = {modality: (f"phase I's model {phase1_uri}", {f: key.get(f) for f in FEATURE_SPACE})
             for modality, key in (read_encoders_record(phase1_model) if phase1_model else {}).items()}
    for cache in caches:
        if (store := cache.manifest.get("store")) is None:  # written by other code: nothing to compare
            continue
        space = {f: store.get(f) for f in FEATURE_SPACE}
        where, seen = first.setdefault(cache.modality, (cache.uri, space))
        if space != seen:
            remedy = ("train phase I on these caches, or encode them with phase I's encoder" if where.startswith(
                "phase I") else f"encode every {cache.modality} cache of the run with the same encoder and layer")
            raise ConfigError(f"{cache.uri}: its {cache.modality} features come from {space}, those of {where} from "
                              f"{seen}; one adapter cannot read both: {remedy}")


def encoder_store_keys(caches: list[FeatureCache]) -> dict[str, dict]:
    """modality -> the feature store key of its caches: the encoder settings inference must reproduce, and for series
    the lookback of their windows when they agree on one (None when not). Where a modality's caches came from
    different settings of one encoder (`check_feature_spaces` refused different encoders), the record keeps what they
    share (the encoder's kind, weights and layer, which phase II checks its caches against) and names the settings
    that differ, with a note; inference then takes the encoder's defaults for those. A modality one of whose manifests
    records none (a cache written by other code) is left out (chat then needs its kind), with a note."""
    keys: dict[str, list[dict | None]] = {}
    for cache in caches:
        keys.setdefault(cache.modality, []).append(cache.manifest.get("store"))
    agreed = {}
    for modality, found in keys.items():
        if None in found:
            print(f"note: a {modality} cache records no encoder settings; the model records none for {modality}")
            continue
        differing = [k for k in ENCODER_SETTINGS if any(key.get(k) != found[0].get(k) for key in found)]
        agreed[modality] = {k: v for k, v in found[0].items() if k not in differing}
        if differing:
            agreed[modality]["differing"] = differing
            print(f"note: the {modality} caches come from different encoder settings ({', '.join(differing)}); the "
                  "model records the encoder without them, and inference takes its defaults for them")
    if "series" in agreed:  # the window inference cuts from a longer series
        lookbacks = {c.manifest["dataset"]["lookback"] for c in caches if c.modality == "series"}
        agreed["series"] = {**agreed["series"], "lookback": lookbacks.pop() if len(lookbacks) == 1 else None}
    return agreed


@dataclass
class PhasePlan:
    """One phase as both drivers start it: its settings, caches (URIs and opened), model config, phase I's
    model folder (phase II; a path or URI) and backbone record, where its output goes (`destination`, a folder or
    an s3:// URI) and the local folder the driver writes it in (`out`, created)."""

    hp: PhaseConfig
    caches: list[str]
    opened: list[FeatureCache]
    model: ModRWKVConfig
    init_from: str | None
    phase1_source: dict | None
    destination: str
    out: Path
    backbone: dict  # what the model folders record of it (`backbone_record`)
    weights: list[float]  # each cache's in the draw of micro-batches (`caches.draw_weights`)
    left_out: list[str]  # collection entries with fewer samples than workers, never drawn (`caches.too_small`)
    whiten_eps: float = WHITEN_EPS

    @property
    def drawn(self) -> list[FeatureCache]:
        """The caches training draws from: the datasets its logged models name (not those `left_out`)."""
        return [cache for cache in self.opened if cache.uri not in self.left_out]

    def publish(self) -> str:
        """The model folders written in `out` copied to an s3:// destination (nothing to do for a local one);
        returns where the model folder now is."""
        publish(self.out, self.destination, ("model", "adapter"))
        return storage.join(self.destination, "model")

    def feature_stats(self) -> dict[str, dict]:
        """Phase I: the statistics its projectors normalise with; phase II reads phase I's saved buffers."""
        if self.init_from is not None:
            return {}
        normalized = {m: p.normalize for m, p in self.model.projectors.items() if p.normalize != "none"}
        drawn = [cache for cache, weight in zip(self.opened, self.weights) if weight]  # as training reads them
        return feature_stats(drawn, normalized, whiten_eps=self.whiten_eps)


def per_packed_draw(weights: list[float], caches: list[FeatureCache], mm_config: ModRWKVConfig,
                    config: TrainConfig, world: int) -> list[float]:
    """Weights of samples as weights of packed micro-batches: a cache of short samples fills a row with more of them,
    so it is drawn that much less often, and every cache's samples are read at the rate its weight gives."""
    drawn = []
    for weight, cache in zip(weights, caches, strict=True):
        if weight:
            compressed = mm_config.projectors[cache.modality].compressed_length
            buffer = min(config.pack_buffer, cache.samples_of(0, world))  # as MicroBatches caps it
            per_row = samples_per_row(cache.sample_tokens(compressed), config.max_length, buffer, config.seed)
            print(f"{cache.uri}: {per_row:.2f} samples a packed row")
            weight /= per_row
        drawn.append(weight)
    return drawn


def check_reduction_order(caches: list[FeatureCache], ds) -> None:
    """ZeRO-2, and ZeRO-1 with overlap_comm, reduce each gradient as the backward produces it, in buckets they
    assume every worker fills in one order (deepspeedai/DeepSpeed#2343). A micro-batch of a media cache whose
    samples are all text-only leaves the projector to the trainer's x0 term, so its gradients come first on that
    worker and last on the others: tensors summed with other tensors, silently (measured: RESULTS.md, "A step's
    objective across micro-batches and workers"). Refused here."""
    if not (ds.zero_stage == 2 or (ds.zero_stage == 1 and ds.overlap_comm)):
        return
    mode = "ZeRO-2" if ds.zero_stage == 2 else "ZeRO-1 with overlap_comm"
    for cache in caches:
        if cache.modality != "series" and (n := cache.text_only()):
            raise ConfigError(f"{cache.uri}: {n} of {len(cache)} samples are text-only, and under {mode} a worker "
                              f"whose micro-batch holds no {cache.modality} item reduces its gradients in another "
                              "order than the others (DeepSpeed assumes one order; its reduction then mixes tensors): "
                              "set deepspeed.zero_stage: 1 without overlap_comm (optimizer states still partitioned, "
                              "gradients reduced once a step in parameter order), or train on one worker")


def check_phase1_backbone(backbone: dict, phase1_source: dict, init_from: str) -> None:
    """Phase II trains phase I's adapter on the backbone it learnt with: a config naming another checkpoint of the
    same shape would load without a word. Compared by the weights' sha256 where the path differs (or the record is
    a URI's, whose hash `backbone_record` took anyway); one path is taken for the same weights."""
    if backbone["path"] == phase1_source.get("path") and "sha256" not in backbone:
        return
    recorded = phase1_source.get("sha256")
    if recorded is None:  # a record without a hash (weights not found when phase I saved): nothing to compare
        return
    sha256 = backbone_sha256(backbone)
    if sha256 is None:
        raise ConfigError(f"model.backbone.path: {backbone['path']}: no backbone weights there")
    if sha256 != recorded:
        raise ConfigError(f"model.backbone.path: {backbone['path']} holds other weights (sha256 {sha256[:12]}) than "
                          f"the backbone phase I's model {init_from} learnt on, {phase1_source.get('path')} "
                          f"(sha256 {recorded[:12]}): phase II trains that adapter on that backbone; point "
                          "model.backbone.path at it, or train phase I again on this one")


def phase1_config(planned: ModRWKVConfig, trained: ModRWKVConfig, init_from: str) -> ModRWKVConfig:
    """Phase II trains the model phase I saved (`trained`), whatever this config now says: a projector setting
    changed since (compression, adapter width, normalisation), a forecast over another horizon or lookback, or a
    modality phase I trained no projector for is refused here, naming the setting, not taken in silence. Returns
    phase I's config: what the workers load, and what the packed draw, the skip counts and a resume's check of the
    data order must read."""
    for modality, p in planned.projectors.items():
        if modality not in trained.projectors:
            raise ConfigError(f"{init_from}: phase I trained no {modality} projector, and phase II's caches hold "
                              f"{modality} features: train phase I on {modality} features too")
        was = trained.projectors[modality]
        for name in (f.name for f in dataclasses.fields(p)):
            if getattr(p, name) != getattr(was, name):
                raise ConfigError(f"model.projectors.{modality}.{name}: {getattr(p, name)} in this config, "
                                  f"{getattr(was, name)} in phase I's model {init_from}, which phase II trains on: "
                                  "set it back, or train phase I again with it")
    if "series" in planned.projectors:
        # a forecast skip reads the last forecast_lookback values of any lookback at least that long (`lookback_window`)
        reads = (planned.forecast_lookback >= trained.forecast_lookback) if trained.forecast_lookback else (
            not planned.forecast_lookback)
        for name, setting, same in (
                ("forecast_horizon", "the series caches' horizon",
                 planned.forecast_horizon == trained.forecast_horizon),
                ("forecast_lookback", "model.forecast_skip, or the series caches' lookback", reads),
                ("series_encoder", "model.wavenet", planned.series_encoder == trained.series_encoder)):
            if not same:
                raise ConfigError(f"{setting}: gives {name} {getattr(planned, name)} here, "
                                  f"{getattr(trained, name)} in phase I's model {init_from}, which phase II trains "
                                  "on: set it back, or train phase I again with it")
    return trained


def plan_phase(config: TrainConfig, phase: int, world: int) -> PhasePlan:
    """`world`: the workers that will train (each reads samples of its own from every cache it draws)."""
    hp = config.phase1 if phase == 1 else config.phase2
    groups = resolve_groups(config.phase_caches(hp))
    caches = [uri for group in groups for uri in group]
    opened = [FeatureCache(uri) for uri in caches]  # each manifest read once per start
    if world > 1:
        check_reduction_order(opened, config.deepspeed)
    weights, left_out = draw_weights(hp.mix, groups, [len(c) for c in opened], world)
    backbone = backbone_record(config.model.backbone.path)
    mm_config = model_config(config, read_config(local_copy(backbone["path"])), opened)
    init_from = phase1_source = phase1_model = None
    if phase == 2:
        init_from = storage.join(phase_dir(config, 1), "model")
        try:
            phase1_model = Path(local_copy(init_from))
            phase1_source = read_backbone_source(phase1_model)
        except FileNotFoundError:  # no such remote folder
            phase1_source = None
        if phase1_source is None:
            raise FileNotFoundError(f"{init_from}: no phase I output; run `modrwkv train --phase 1` first")
        check_phase1_backbone(backbone, phase1_source, init_from)
        mm_config = phase1_config(mm_config, ModRWKVConfig.read(phase1_model), init_from)
    check_feature_spaces(opened, phase1_model, init_from)
    if config.packing:
        weights = per_packed_draw(weights, opened, mm_config, config, world)
    destination = phase_dir(config, phase)
    out = working_dir(destination)
    return PhasePlan(hp, caches, opened, mm_config, init_from, phase1_source, destination, out, backbone, weights,
                     left_out, config.model.whiten_eps)
