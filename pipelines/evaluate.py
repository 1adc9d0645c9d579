"""`modrwkv eval --checkpoint runs/train/<name>/phase2/model --task vqa|asr|forecast --cache <entry or encode YAML>`

Ray Data batch inference over a feature cache (one actor per model copy, one shard per call), or with `actors: 0`
in this process (on the GPU when there is one: a one-GPU machine, a debugger), each sample predicted, and the
whole scored and plotted, by its task (`pipelines/eval_tasks.py`). Shards are written and scored as they arrive:
the driver holds a shard's rows at a time and what its task's scores need (a forecast's running sums; VQA and ASR
keep each row, their scores being over all answers at once). Predictions go to JSONL, in the cache's
order; metrics, a per-sample table (`table_rows` of them at most) and the plots go to MLflow, in a child run of the
training run (`track: false`: to disk only, with neither Ray nor MLflow imported).
"""

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from modrwkv.multimodal import ModRWKVConfig
from preprocessing import storage
from preprocessing.cache.entry import FeatureCache
from preprocessing.local_copy import publish, working_dir

from .caches import absolute, resolve_cache
from .config import from_dict, load_config, parse_overrides
from .environment import environment_tags, merged_tags, require_cuda
from .eval_tasks import TASKS, EvalTask, Tally, TaskName
from .logged_models import check_registered_name, local_model
from .row_sample import RowSample


@dataclass
class EvalConfig:
    checkpoint: str  # a model folder written by `modrwkv train` (a path or s3:// URI), or models:/...
    task: TaskName
    cache: str  # a feature-cache entry, or an encode YAML (found in the cache or encoded first)
    out_dir: str = "runs/eval"  # a folder or s3:// URI
    max_new_tokens: int = 16
    batch_size: int = 16  # prompts decoded together (vqa, asr), windows forecast together (forecast)
    quantize: Literal["none", "int8", "bf16"] = "none"  # the model's linear weights (modrwkv.quantize)
    actors: int = 1  # Ray Data prediction actors; 0: in this process, on the GPU when there is one
    gpus_per_actor: float = 0.0  # each actor's share of a GPU, which holds its model copy; 0: CPU actors
    season: int = 1  # forecasting: the seasonal-naive baseline's period (1 = naive)
    table_rows: int = 10_000  # the MLflow table's rows at most (a sample by key hash): every row is in the JSONL
    # the predictions file goes to MLflow up to this size; a larger one (ECL's is ~4 GB) is only named, in the tag
    # `predictions`, where out_dir holds it
    predictions_artifact_mb: float = 512.0
    tracking_uri: str | None = field(default=None, repr=False)  # not in the repr: it may hold credentials
    experiment: str = "modrwkv"
    parent_run_id: str | None = None  # default: the run that trained the checkpoint
    track: bool = True  # false: predictions, scores and plots on disk only, no MLflow run
    register_as: str | None = None  # registers the scored (logged) model as a version of this name, tagged with scores

    def __post_init__(self):
        check_registered_name(self.register_as)
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be 0 or more, not {self.gpus_per_actor}")
        if self.predictions_artifact_mb < 0:
            raise ValueError(f"predictions_artifact_mb must be 0 or more, not {self.predictions_artifact_mb}")
        if self.batch_size < 1 or self.table_rows < 0:
            raise ValueError(f"batch_size must be 1 or more and table_rows 0 or more, not {self.batch_size} and "
                             f"{self.table_rows}")
        for name, least in (("max_new_tokens", 1), ("actors", 0)):  # season: against the lookback, when known
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be {least} or more, not {getattr(self, name)}")
        if self.register_as and not self.track:
            raise ValueError(f"register_as {self.register_as!r} registers in MLflow, which track: false turns off")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    baselines: dict[str, float] = field(default_factory=dict)
    predictions: Path | None = None
    coverage: dict[str, int] = field(default_factory=dict)  # what the scores cover of the test set (`coverage`)
    predictors: list[dict[str, str]] = field(default_factory=list)  # where the predictions ran: `Predictor.environment`
    run_id: str | None = None
    seconds: float = 0.0


class Predictor:
    """A Ray Data actor: one model copy; each call predicts every sample of one cache shard, and names the machine it
    ran on (`environment`: its CPU, GPUs, packages and the model's device), which may not be the driver's."""

    def __init__(self, checkpoint: str, cache_uri: str, task: EvalTask, quantize: str = "none", device: str = "cpu",
                 tracking_uri: str | None = None, s3: storage.Settings | None = None):
        if s3:  # the driver's S3 settings (and tracking URI), for a Ray actor
            s3.apply()
        # the model package imports torch: actors only, not the driver
        from modrwkv.inference import prepare_for_inference
        from modrwkv.tokenizer import WorldTokenizer

        from .trained_model import load_trained_model

        if device == "cuda":
            require_cuda("gpus_per_actor")
        # a full save, or an adapter-only one with its backbone recorded beside it; an s3:// folder or a logged
        # model (models:/..., from the driver's tracking server): this node's copy
        folder = local_model(checkpoint, configured_uri=tracking_uri).model_dir
        model = load_trained_model(str(folder)).to(device)
        self.model = prepare_for_inference(model, quantization=quantize)
        self.tokenizer, self.cache, self.task = WorldTokenizer(), FeatureCache(cache_uri), task
        self.environment = json.dumps({**environment_tags(""), "device": device})

    def __call__(self, batch: dict) -> dict:
        """One record a shard: its rows (a JSON list) and this actor's environment."""
        rows = [self.task.predict(self.model, self.tokenizer, list(self.cache.read_shard(int(index))))
                for index in batch["shard"]]
        return {"rows": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object),
                "environment": np.array([self.environment] * len(rows), dtype=object)}


def predicted_shards(config: EvalConfig, cache_uri: str, task: EvalTask,
                     environments: dict[str, None]) -> Iterator[list[dict]]:
    """Each shard's predicted rows, shard by shard in the cache's order; the environments of the processes that
    predicted them added to `environments` (JSON, in the order first seen)."""
    n_shards = len(FeatureCache(cache_uri).shards)
    shards = (predict_here(config, cache_uri, task) if config.actors == 0
              else predict_with_ray(config, cache_uri, task, n_shards))
    for batch in tqdm(shards, total=n_shards, desc=f"eval {config.task}", unit="shard"):
        environments.update(dict.fromkeys(batch["environment"]))
        for rows in batch["rows"]:
            yield json.loads(rows)


def predict_here(config: EvalConfig, cache_uri: str, task: EvalTask):
    """Each shard's predicted rows, from this process."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor(config.checkpoint, cache_uri, task, config.quantize, device, config.tracking_uri)
    for index in range(len(predictor.cache.shards)):
        yield predictor({"shard": [index]})


def predict_with_ray(config: EvalConfig, cache_uri: str, task: EvalTask, n_shards: int):
    """Each shard's predicted rows, from Ray Data actors."""
    import ray  # only when actors predict

    from infra.local_ray import init_ray

    if not ray.is_initialized():
        init_ray(log_to_driver=False)
    ds = ray.data.from_items([{"shard": i} for i in range(n_shards)], override_num_blocks=n_shards)
    ds = ds.map_batches(Predictor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.actors),
                        num_gpus=config.gpus_per_actor or None,
                        fn_constructor_kwargs=actor_arguments(config, cache_uri, task))
    ds.context.execution_options.preserve_order = True  # the predictions file in the cache's order, run after run
    return ds.iter_batches(batch_size=None)


def actor_arguments(config: EvalConfig, cache_uri: str, task: EvalTask) -> dict:
    """The prediction actors' constructor arguments. The tracking URI, which may hold credentials, travels as the S3
    settings do, as a variable the actor sets (`storage.Settings`): Ray shows the arguments' text, never its values."""
    env = {**storage.environment(), **({"MLFLOW_TRACKING_URI": config.tracking_uri} if config.tracking_uri else {})}
    return {"checkpoint": config.checkpoint, "cache_uri": cache_uri, "task": task, "quantize": config.quantize,
            "device": "cuda" if config.gpus_per_actor else "cpu", "s3": storage.Settings(env)}


def log_to_mlflow(config: EvalConfig, model_dir: Path, cache_uri: str, result: EvalResult, table: RowSample,
                  plots: list[Path]) -> str:
    """A child run of the training run: metrics (on the logged model they scored, when the checkpoint is one),
    baselines, the per-sample table (a sample of the scored rows when there are more than `table_rows`) and the
    plots."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from modrwkv.model_folder import read_backbone_source  # imports torch: see Predictor

    from . import tracking
    from .logged_models import eval_metrics, link_eval, model_id_of, register

    uri = tracking.tracking_uri(config.tracking_uri)
    model_id = model_id_of(uri, config.checkpoint)
    if config.register_as:
        if model_id is None:
            raise ValueError(f"{config.checkpoint}: not a logged model on this tracking server (trained without "
                             "MLflow, or against another server?); nothing to register")
        register(uri, model_id, config.register_as)
    client = MlflowClient(uri)
    parent = config.parent_run_id or (read_backbone_source(model_dir) or {}).get("run_id")
    # a parent given is required; the one the folder records may live on another server (a top-level run then)
    parent_run = client.get_run(parent) if config.parent_run_id else parent and tracking.recorded_run(client, parent)
    if parent_run:
        experiment_id = parent_run.info.experiment_id
    else:
        parent, experiment_id = None, tracking.experiment_id(client, uri, config.experiment)
    # where it scored (env.*) and where the model predicted (env.predictors.*: each actor's, merged)
    tags = {"task": config.task, "checkpoint": str(config.checkpoint), **environment_tags(),
            **merged_tags(result.predictors, "env.predictors.")}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=f"eval-{config.task}", tags=tags)
    run_id = run.info.run_id
    with tracking.run_status(uri, run_id):  # FINISHED, or FAILED when logging fails (never left RUNNING)
        # what decides the scores beside the model and the cache; a quantized model's scores carry the quantization
        # in their names, so that they never pass for the model's own (on the logged model, in its versions' tags)
        settings = {"task": config.task, "cache": cache_uri, "quantize": config.quantize,
                    "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size, "season": config.season,
                    "table_rows": config.table_rows}
        scores = (result.metrics if config.quantize == "none"
                  else {f"{k}_{config.quantize}": v for k, v in result.metrics.items()})
        client.log_batch(run_id, metrics=eval_metrics(scores, model_id, cache_uri) + eval_metrics(
            {f"baseline_{k}": v for k, v in result.baselines.items()} | result.coverage, None, cache_uri),
            params=[Param(k, str(v)) for k, v in settings.items()])
        if model_id:
            link_eval(uri, run_id, model_id, scores, cache_uri)
        rows = table.rows()
        if rows:
            columns = {k: [json.dumps(r[k]) if isinstance(r[k], list) else r[k] for r in rows]
                       for k in ("key", "reference", "prediction", "stopped", "language") if k in rows[0]}
            mlflow.set_tracking_uri(uri)
            mlflow.log_table(columns, artifact_file=f"eval_{config.task}.json", run_id=run_id)
        client.set_tag(run_id, "table", f"{len(rows)} of the {table.seen} predicted rows (every row when they are "
                                        "no more than table_rows; else those whose keys hash lowest)")
        published = storage.join(absolute(config.out_dir), result.predictions.name)
        size = result.predictions.stat().st_size
        if size <= config.predictions_artifact_mb * 2**20:
            client.log_artifact(run_id, str(result.predictions))
            client.set_tag(run_id, "predictions", f"{published} (and an artifact of this run)")
        else:
            client.set_tag(run_id, "predictions", f"{published} ({size / 2**20:,.0f} MiB: over predictions_artifact_mb "
                                                  f"{config.predictions_artifact_mb:g}, not an artifact of this run)")
        for plot in plots:
            client.log_artifact(run_id, str(plot))
    return run_id


def run_eval(config: EvalConfig) -> EvalResult:
    start = time.perf_counter()
    if config.track or config.checkpoint.startswith("models:/"):  # before anything is predicted
        from . import tracking

        tracking.check_reachable_by_workers(tracking.tracking_uri(config.tracking_uri), os.environ.get("RAY_ADDRESS"))
    cache_uri = resolve_cache(config.cache)
    task = TASKS[config.task].from_config(config)
    modality = FeatureCache(cache_uri).modality
    if modality != task.modality:
        raise ValueError(f"{cache_uri}: a {modality} cache cannot be evaluated as {config.task}")
    # the model folder here (prediction actors resolve the checkpoint the same way on their nodes)
    model_dir = local_model(config.checkpoint, configured_uri=config.tracking_uri).model_dir
    check_model_fits(config, ModRWKVConfig.read(model_dir), FeatureCache(cache_uri))
    if config.checkpoint.startswith("models:/"):  # the actors download it from the server this driver found
        from .tracking import tracking_uri

        config = replace(config, tracking_uri=tracking_uri(config.tracking_uri))
    out = working_dir(config.out_dir)
    predictions = out / predictions_name(config, model_dir, cache_uri)
    environments = {}
    scored = write_and_score(predicted_shards(config, cache_uri, task, environments), task, predictions,
                             config.table_rows)
    if not scored.table.seen:
        raise ValueError(f"{cache_uri}: no row to score: " + (f"every sample was skipped, e.g. {scored.first_reason}"
                                                              if scored.skipped else "the cache holds no sample"))
    metrics, baselines = scored.tally.result()
    if scored.skipped:
        metrics["rows_skipped"] = scored.skipped
        print(f"eval {config.task}: {scored.skipped} samples skipped, e.g. {scored.first_reason}")
    result = EvalResult(metrics, baselines, predictions, coverage(config, cache_uri, scored),
                        predictors=[json.loads(e) for e in environments])
    plots = task.plots(scored.tally, out)
    publish(out, config.out_dir, (predictions.name, *(p.name for p in plots)))
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    # printed before MLflow is reached: a tracking server that fails then loses no score
    print(f"eval {config.task} on {scored.scored} samples: {shown}; predictions in "
          f"{storage.join(config.out_dir, predictions.name)}")
    if config.track:
        result.run_id = log_to_mlflow(config, model_dir, cache_uri, result, scored.table, plots)
    result.seconds = time.perf_counter() - start
    return result


def predictions_name(config: EvalConfig, model_dir: Path, cache_uri: str) -> str:
    """predictions_<task>_<digest>.jsonl, the digest of what decides them (the model folder, here or as this node's
    copy of a logged model, with its files' sizes and modification times, so that a model trained again into the
    same folder is another; its quantization, the cache, the decoding settings): another model or quantization
    evaluated into the same out_dir keeps the file an earlier run's tag names; the same evaluation rewrites its own."""
    folder = Path(model_dir).absolute()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    decided = [str(folder), files, config.quantize, cache_uri, config.max_new_tokens, config.season]
    return f"predictions_{config.task}_{hashlib.sha256(json.dumps(decided).encode()).hexdigest()[:10]}.jsonl"


def check_model_fits(config: EvalConfig, model: ModRWKVConfig, cache: FeatureCache) -> None:
    """Refuses, before any prediction, a model that cannot take the task (no projector for its modality; no
    forecast head, another horizon than the windows' or a skip reading a longer lookback) and a seasonal-naive
    period the lookback cannot hold."""
    modality = cache.modality
    if modality not in model.projectors:
        raise ValueError(f"{config.checkpoint}: the model has no {modality} projector (it has "
                         f"{', '.join(model.projectors) or 'none'}); it cannot be evaluated on {cache.uri}")
    if config.task != "forecast":
        return
    window = cache.manifest["dataset"]
    if model.forecast_horizon != window["horizon"]:
        raise ValueError(f"{config.checkpoint}: the model forecasts {model.forecast_horizon or 'no'} steps, "
                         f"{cache.uri}'s windows hold a horizon of {window['horizon']}")
    if model.forecast_lookback > window["lookback"]:
        raise ValueError(f"{config.checkpoint}: the model's forecast skip reads a lookback of "
                         f"{model.forecast_lookback} steps, {cache.uri}'s windows hold {window['lookback']}")
    if not 1 <= config.season < window["lookback"]:
        raise ValueError(f"season {config.season}: the seasonal-naive period must be 1 or more and shorter than "
                         f"the lookback ({window['lookback']} steps in {cache.uri})")


@dataclass
class Scored:
    tally: Tally
    table: RowSample  # the MLflow table's rows, of the predicted ones (`seen`)
    scored: int = 0  # rows the scores are over: the predicted, and the skipped its task scores as unanswered
    skipped: int = 0  # samples the model could not take
    first_reason: str | None = None
    truncated: int = 0  # answers cut at max_new_tokens before they ended their turn


def coverage(config: EvalConfig, cache_uri: str, scored: Scored) -> dict[str, int]:
    """What the scores cover: the rows predicted (those a task does not score, as ASR's in other languages, are
    counted apart), the test samples the encode rejected (a published test set's figures are over all of its
    samples), and the answers cut short; printed when some were left out or cut."""
    counts = FeatureCache(cache_uri).manifest["counts"]
    covered = {"rows_predicted": scored.table.seen, "rejected_at_encode": counts["rejected"],
               "rows_truncated": scored.truncated}
    if counts["rejected"]:
        print(f"eval {config.task}: the encode rejected {counts['rejected']} of the {counts['read']} test samples it "
              f"read (see {storage.join(cache_uri, 'rejects.jsonl')}): {scored.table.seen} were predicted")
    if scored.truncated:
        print(f"eval {config.task}: {scored.truncated} answers reached max_new_tokens {config.max_new_tokens} "
              "before ending their turn (scored as cut: raise max_new_tokens if they were)")
    return covered


def write_and_score(shards: Iterable[list[dict]], task: EvalTask, predictions: Path, table_rows: int) -> Scored:
    """Each shard's rows written to the predictions file and added to the task's scores as it arrives."""
    scored = Scored(task.tally(), RowSample(table_rows))
    with predictions.open("w") as file:
        for rows in shards:
            saved = [task.saved(r) for r in rows]
            file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in saved)
            # a sample the model cannot take is not predicted: counted, named with its reason in the file, and
            # scored as unanswered where its task can (`EvalTask.unanswered`), else left out of the scores
            skipped = [r for r in rows if "skipped" in r]
            scored.skipped += len(skipped)
            scored.first_reason = scored.first_reason or next((r["skipped"] for r in skipped), None)
            taken = [r for r in rows if "skipped" not in r or "prediction" in r]
            scored.tally.add(taken)
            scored.scored += len(taken)
            scored.truncated += sum(r.get("stopped") is False for r in taken)
            scored.table.add([r for r in saved if "skipped" not in r])
    return scored


def main(args: argparse.Namespace) -> None:
    overrides = {**parse_overrides(args.set), **{k: v for k, v in {
        "checkpoint": args.checkpoint, "task": args.task, "cache": args.cache, "out_dir": args.out_dir,
        "quantize": args.quantize, "register_as": args.register_as}.items()
        if v is not None}}
    if args.config:
        config = load_config(args.config, EvalConfig, overrides)
    else:
        config = from_dict(EvalConfig, overrides)
    run_eval(config)


# `python -m pipelines.evaluate ...`, the job command for `ray job submit`: same flags as `modrwkv eval`
if __name__ == "__main__":
    import sys

    from pipelines.cli import main as cli_main  # the CLI imports this module: only the `-m` entry needs it

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
