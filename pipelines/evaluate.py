"""`modrwkv eval --checkpoint runs/train/<name>/phase2/model --task vqa|asr|forecast --cache <entry or encode YAML>`

Ray Data batch inference over a feature cache (one actor per model copy, one shard per call): greedy
decoding for VQA and ASR, the forecast head for series. Predictions go to JSONL; metrics, a per-sample table
and plots (confusion matrix, forecast vs truth) go to MLflow, in a child run of the training run.
"""

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from . import tracking
from .config import load_config, parse_overrides

TASK_MODALITY = {"vqa": "image", "asr": "audio", "forecast": "series"}


@dataclass
class EvalConfig:
    checkpoint: str  # a ModRWKV save_pretrained folder written by `modrwkv train`
    task: Literal["vqa", "asr", "forecast"]
    cache: str  # a feature-cache entry, or an encode YAML (found in the cache or encoded first)
    out_dir: str = "runs/eval"
    max_new_tokens: int = 16
    actors: int = 1
    season: int = 1  # forecasting: the seasonal-naive baseline's period (1 = naive)
    tracking_uri: str | None = None
    experiment: str = "modrwkv"
    parent_run_id: str | None = None  # default: the run that trained the checkpoint


@dataclass
class EvalResult:
    metrics: dict[str, float]
    baselines: dict[str, float] = field(default_factory=dict)
    predictions: Path | None = None
    run_id: str | None = None
    seconds: float = 0.0


def load_model(checkpoint: str):
    """A trained ModRWKV: a full save, or an adapter-only one whose backbone path is recorded beside it."""
    from modrwkv.model import RWKV7
    from modrwkv.multimodal import ModRWKV

    from .train import BACKBONE_REF

    folder = Path(checkpoint)
    if (folder / "model.safetensors").is_file():
        return ModRWKV.from_pretrained(folder)
    reference = folder / BACKBONE_REF
    if not reference.is_file():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor {BACKBONE_REF} naming the backbone")
    path = Path(json.loads(reference.read_text())["path"])
    backbone = RWKV7.from_pretrained(path) if path.is_dir() else RWKV7.from_pretrained(path)
    return ModRWKV.from_pretrained(folder, backbone=backbone)


class Predictor:
    """A Ray Data actor: one model copy; each call predicts every sample of one cache shard."""

    def __init__(self, checkpoint: str, cache_uri: str, max_new_tokens: int):
        from modrwkv.tokenizer import WorldTokenizer
        from preprocessing.cache.reader import FeatureCache

        self.model = load_model(checkpoint).eval()
        self.tokenizer, self.cache, self.max_new_tokens = WorldTokenizer(), FeatureCache(cache_uri), max_new_tokens

    def predict(self, sample) -> dict:
        import torch

        from modrwkv.batching import sample_items
        from modrwkv.conversation import prompt_ids
        from modrwkv.generation import GenerationConfig, generate

        meta, items = sample["meta"], sample_items(sample)
        config = self.model.config
        lengths = [config.projectors[m].compressed_length(f.shape[0]) for m, f in items]
        user = next(t["text"] for t in meta["turns"] if t["role"] == "user")
        ids = torch.tensor([prompt_ids(self.tokenizer, user, lengths, sample["key"])])
        row = {"key": sample["key"], "language": meta.get("language")}
        with torch.no_grad():
            if meta["modality"] == "series":
                lookback = torch.from_numpy(sample["arrays"]["lookback"]).float()[None]
                forecast = self.model(ids, [items], series_lookback=lookback).forecast[0].numpy()
                row.update(prediction=forecast.tolist(), reference=sample["arrays"]["target"].tolist(),
                           lookback=sample["arrays"]["lookback"].tolist(), mean=meta["mean"], std=meta["std"])
                return row
            first, state = self.model.prefill(ids, [items])
            stop = tuple(self.tokenizer.encode("\n\n"))
            out = generate(self.model.backbone, [ids[0].tolist()],
                           GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=0, stop_tokens=stop),
                           state=state, first_logits=first)
        answer = next(t["text"] for t in meta["turns"] if t["role"] == "assistant")
        row.update(prediction=self.tokenizer.decode(out.tokens[0]).strip(), reference=answer)
        return row

    def __call__(self, batch: dict) -> dict:
        rows = [self.predict(s) for index in batch["shard"] for s in self.cache.read_shard(int(index))]
        return {"rows": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object)}


def predict_all(config: EvalConfig, cache_uri: str) -> list[dict]:
    import ray
    from tqdm import tqdm

    from preprocessing.cache.reader import FeatureCache

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    n_shards = len(FeatureCache(cache_uri).shards)
    ds = ray.data.from_items([{"shard": i} for i in range(n_shards)], override_num_blocks=n_shards)
    ds = ds.map_batches(Predictor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.actors),
                        fn_constructor_kwargs={"checkpoint": config.checkpoint, "cache_uri": cache_uri,
                                               "max_new_tokens": config.max_new_tokens})
    rows = []
    with tqdm(total=n_shards, desc=f"eval {config.task}", unit="shard") as bar:
        for batch in ds.iter_batches(batch_size=None):
            rows += [json.loads(r) for r in batch["rows"]]
            bar.update(1)
    return sorted(rows, key=lambda r: r["key"])


def score(task: str, rows: list[dict], season: int) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, baselines). VQA: exact match after VQAv2 normalisation, beside chance over the answer set.
    ASR: WER on English and CER on Mandarin, beside the empty transcript. Forecasting: MSE/MAE on both scales
    and MASE, beside the seasonal-naive forecast."""
    from .metrics.asr import character_error_rate, word_error_rate
    from .metrics.forecast import forecast_errors, mase, seasonal_naive
    from .metrics.vqa import mean_exact_match

    if task == "vqa":
        predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        return {"accuracy": mean_exact_match(predictions, references)}, {"accuracy": 1 / len(set(references))}
    if task == "asr":
        metrics, baselines = {}, {}
        for language, rate in (("en", word_error_rate), ("zh", lambda r, h: character_error_rate(r, h, "zh"))):
            mine = [r for r in rows if r["language"] == language]
            if mine:
                references = [r["reference"] for r in mine]
                result = rate(references, [r["prediction"] for r in mine])
                metrics[f"{result.metric}_{language}"] = result.rate
                baselines[f"{result.metric}_{language}"] = rate(references, [""] * len(mine)).rate
        return metrics, baselines
    prediction, target, lookback = (np.array([r[k] for r in rows]) for k in ("prediction", "reference", "lookback"))
    mean, std = (np.array([[r[k]] for r in rows]) for k in ("mean", "std"))
    naive = seasonal_naive(lookback, target.shape[1], season)
    metrics = {**forecast_errors(prediction, target, mean, std), "mase": mase(prediction, target, lookback, season)}
    baselines = {**forecast_errors(naive, target, mean, std), "mase": mase(naive, target, lookback, season)}
    return metrics, baselines


def confusion_png(rows: list[dict], path: Path) -> Path | None:
    """Reference vs prediction counts, when the answers form a small closed set (e.g. digit words)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["reference"] for r in rows})
    if not 2 <= len(labels) <= 30:
        return None
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels) + 1), dtype=int)  # last column: any other answer
    for r in rows:
        counts[index[r["reference"]], index.get(r["prediction"], len(labels))] += 1
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels) + 1), labels + ["other"], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="prediction", ylabel="reference", title="confusion matrix")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, n, ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def forecast_png(rows: list[dict], path: Path, n: int = 4) -> Path:
    """Lookback, truth and forecast of the first windows, on the original scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = rows[:: max(len(rows) // n, 1)][:n]
    fig, axes = plt.subplots(len(picked), 1, figsize=(7, 2.2 * len(picked)), squeeze=False)
    for ax, r in zip(axes[:, 0], picked):
        lookback, truth, forecast = (np.asarray(r[k]) * r["std"] + r["mean"]
                                     for k in ("lookback", "reference", "prediction"))
        future = np.arange(len(lookback), len(lookback) + len(truth))
        ax.plot(np.arange(len(lookback)), lookback, color="gray", label="lookback")
        ax.plot(future, truth, color="black", label="truth")
        ax.plot(future, forecast, color="tab:red", label="forecast")
        ax.set_title(r["key"], fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_mlflow(config: EvalConfig, result: EvalResult, rows: list[dict], plots: list[Path]) -> str:
    """A child run of the training run: metrics, baselines, the per-sample table and the plots."""
    import mlflow
    from mlflow import MlflowClient

    from .train import BACKBONE_REF

    uri = tracking.tracking_uri(config.tracking_uri)
    parent = config.parent_run_id
    reference = Path(config.checkpoint) / BACKBONE_REF
    if parent is None and reference.is_file():
        parent = json.loads(reference.read_text()).get("run_id")
    client = MlflowClient(uri)
    if parent:
        experiment_id = client.get_run(parent).info.experiment_id
    else:
        experiment_id = tracking.experiment_id(client, uri, config.experiment)
    tags = {"task": config.task, "checkpoint": str(config.checkpoint)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=f"eval-{config.task}", tags=tags)
    run_id = run.info.run_id
    for name, value in {**result.metrics, **{f"baseline_{k}": v for k, v in result.baselines.items()}}.items():
        client.log_metric(run_id, name, float(value))
    table = {k: [json.dumps(r[k]) if isinstance(r[k], list) else r[k] for r in rows]
             for k in ("key", "reference", "prediction", "language") if k in rows[0]}
    mlflow.set_tracking_uri(uri)
    mlflow.log_table(table, artifact_file=f"eval_{config.task}.json", run_id=run_id)
    client.log_artifact(run_id, str(result.predictions))
    for plot in plots:
        client.log_artifact(run_id, str(plot))
    client.set_terminated(run_id)
    return run_id


def run_eval(config: EvalConfig) -> EvalResult:
    from preprocessing.cache.reader import FeatureCache

    from .train import resolve_caches

    start = time.perf_counter()
    cache_uri = resolve_caches([config.cache])[0]
    modality = FeatureCache(cache_uri).modality
    if modality != TASK_MODALITY[config.task]:
        raise ValueError(f"{cache_uri}: a {modality} cache cannot be evaluated as {config.task}")
    rows = predict_all(config, cache_uri)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / f"predictions_{config.task}.jsonl"
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics, baselines = score(config.task, rows, config.season)
    result = EvalResult(metrics, baselines, predictions)
    plots = [p for p in (confusion_png(rows, out / "confusion_matrix.png") if config.task == "vqa" else None,
                         forecast_png(rows, out / "forecast_vs_truth.png") if config.task == "forecast" else None) if p]
    result.run_id = log_to_mlflow(config, result, rows, plots)
    result.seconds = time.perf_counter() - start
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"eval {config.task} on {len(rows)} samples: {shown}; predictions in {predictions}")
    return result


def main(args: argparse.Namespace) -> None:
    overrides = {**parse_overrides(args.set), **{k: v for k, v in {
        "checkpoint": args.checkpoint, "task": args.task, "cache": args.cache, "out_dir": args.out_dir}.items()
        if v is not None}}
    if args.config:
        config = load_config(args.config, EvalConfig, overrides)
    else:
        from .config import from_dict

        config = from_dict(EvalConfig, overrides)
    run_eval(config)


# `python -m pipelines.evaluate ...`, the job command for `ray job submit`: same flags as `modrwkv eval`
if __name__ == "__main__":
    import sys

    from pipelines.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
