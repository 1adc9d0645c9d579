"""Learning quality: every task trained with its shipped recipe and scored beside its ceiling (a simple model on
the same cached features) and its trivial baseline, as mean ± std over seeds, with wall time.

- demo suite (configs/demo/train.yaml: one training per seed serves all three tasks):
  digits VQA (ceiling: logistic-regression probe; baseline: majority answer), spoken digits (English WER,
  Mandarin CER; baseline: the empty transcript; no simple ceiling), CO2 forecasting (MSE in ppm²; ceiling:
  ridge on the normalised lookback; baseline: seasonal naive, 52 weeks);
- shapes suite (configs/quality/train_shapes.yaml on `modrwkv data shapes`): accuracy per question type
  (colour, shape, position, count, yes/no) beside a probe per type and the type's majority answer;
- El Nino suite (configs/quality/train_elnino.yaml): monthly sea-surface temperature (statsmodels), MSE in °C²
  beside ridge on the lookback and seasonal naive (12 months).

Ceilings and majority baselines come from `pipelines/metrics/ceilings.py` (deterministic: one value, no std).
Runs train through the real pipeline (Ray Train + DeepSpeed on 2 CPU workers), tracked in a SQLite MLflow
store under --out; with --single-process, training (the core) and evaluation run in this process, on the GPU
when there is one.

    python benchmarks/quality.py [--seeds 0 1 2] [--suites demo shapes elnino] [--out benchmarks/out]

A machine without the demo's data and encoders (a lent GPU) is given the demo's caches instead:
    python benchmarks/quality.py --write-caches runs/gpu_demo/caches.json          # here, after `make demo`
    python benchmarks/quality.py --suites demo --single-process --untracked --caches runs/gpu_demo/caches.json
(the caches' entries under runs/cache travel with the file; the stand-in backbone is trained there).
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import write_report  # noqa: E402
from pipelines.environment import cpu_description  # noqa: E402

SHAPES_DATA = Path("runs/shapes/data")
DEMO_CONFIGS = Path("configs/demo")
DEMO_EVALS = {"digits VQA": "configs/demo/eval_digits.yaml", "spoken digits": "configs/demo/eval_speech.yaml",
              "CO2 forecast": "configs/demo/eval_co2.yaml"}


# ---- model scores -------------------------------------------------------------------------------------------
SINGLE_PROCESS = False  # --single-process: train with the core and evaluate in this process, no Ray
UNTRACKED = False  # --untracked: no MLflow (a machine without it)
CACHES: dict[str, str] = {}  # --caches: encode YAML -> its cache entry, for a machine without the data or encoders


def train_both_phases(config_path: str, seed: int, tracking_uri: str):
    from pipelines.config import load_config
    from pipelines.train_config import TrainConfig
    from pipelines.train_local import run_single_process
    from pipelines.train_setup import phase_dir

    name = f"{Path(config_path).stem.removeprefix('train').strip('_') or 'demo'}-quality-s{seed}"
    config = load_config(config_path, TrainConfig, {"seed": seed, "name": name,
                                                    "tracking.tracking_uri": tracking_uri,
                                                    "tracking.experiment": "quality"})
    config = dataclasses.replace(config, caches=[cache_uri(c) for c in config.caches])
    if SINGLE_PROCESS:
        train = run_single_process
    else:
        from pipelines.train import run_train  # imports Ray

        train = run_train
    for phase in (1, 2):
        train(config, phase)
    return phase_dir(config, 2) / "model"


def evaluate(eval_path: str, checkpoint: Path, tracking_uri: str):
    from pipelines.config import load_config
    from pipelines.evaluate import EvalConfig, run_eval

    out_dir = checkpoint.parent.parent / "eval" / Path(eval_path).stem
    config = load_config(eval_path, EvalConfig, {"checkpoint": str(checkpoint), "out_dir": str(out_dir),
                                                 "tracking_uri": tracking_uri, "experiment": "quality",
                                                 "actors": 0 if SINGLE_PROCESS else 1, "track": not UNTRACKED})
    return run_eval(dataclasses.replace(config, cache=cache_uri(config.cache)))


def grouped_accuracy(predictions: Path, group_of_key) -> dict[str, float]:
    from pipelines.metrics.vqa import exact_match

    scores = defaultdict(list)
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        scores[group_of_key(row["key"])].append(exact_match(row["prediction"], row["reference"]))
    return {group: float(np.mean(v)) for group, v in scores.items()}


# ---- suites -------------------------------------------------------------------------------------------------
def cache_uri(encode_yaml: str) -> str:
    from pipelines.caches import resolve_caches

    if CACHES:
        if encode_yaml not in CACHES:
            raise SystemExit(f"{encode_yaml} is not among the caches given; they cover {sorted(CACHES)}")
        return str(ROOT / CACHES[encode_yaml])
    return resolve_caches([encode_yaml])[0]


def write_caches(path: Path) -> None:
    """The demo's encode YAMLs and their entries (relative to the repository), for `--caches` elsewhere."""
    entries = {str(y): str(Path(cache_uri(str(y))).relative_to(ROOT)) for y in sorted(DEMO_CONFIGS.glob("encode_*.yaml"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")
    print(f"wrote {path}: {len(entries)} cache entries under {ROOT / 'runs/cache'} (carry that folder with it)")


def machine_description() -> str:
    import torch

    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {cpu_description()}, {os.cpu_count()} CPUs, {where}"


def demo_suite(seeds, tracking_uri) -> list[dict]:
    from pipelines.metrics.ceilings import cache_samples, ridge_forecast_mse, vqa_ceilings

    train, test = (cache_samples(cache_uri(f"configs/demo/encode_{n}.yaml")) for n in ("digits_train", "digits_test"))
    digits = vqa_ceilings(train, test)["all"]
    co2_train, co2_test = (cache_samples(cache_uri(f"configs/demo/encode_co2_{n}.yaml")) for n in ("train", "test"))
    rows = {("digits VQA", "accuracy"): {"ceiling": digits["ceiling"], "baseline": digits["baseline"]},
            ("spoken digits", "wer_en"): {}, ("spoken digits", "cer_zh"): {},
            ("CO2 forecast", "mse"): {"ceiling": ridge_forecast_mse(co2_train, co2_test)}}
    for seed in seeds:
        started = time.perf_counter()
        checkpoint = train_both_phases("configs/demo/train.yaml", seed, tracking_uri)
        for task, eval_path in DEMO_EVALS.items():
            result = evaluate(eval_path, checkpoint, tracking_uri)
            for (row_task, metric), row in rows.items():
                if row_task == task:
                    row.setdefault("model", []).append(result.metrics[metric])
                    if metric != "accuracy":  # empty transcript, seasonal naive: the same for every seed
                        row["baseline"] = result.baselines[metric]
        for row in rows.values():
            row.setdefault("minutes", []).append((time.perf_counter() - started) / 60)
    return [{"task": t, "metric": m, **row} for (t, m), row in rows.items()]


def shapes_suite(seeds, tracking_uri) -> list[dict]:
    from pipelines.metrics.ceilings import cache_samples, vqa_ceilings
    from preprocessing.shapes_data import COLOURS, SHAPES, build_shapes

    build_shapes(SHAPES_DATA)  # the shipped size, in seconds; the feature store re-encodes only images that changed
    kinds = {r["id"]: r["type"] for split in ("train", "test")
             for r in json.loads((SHAPES_DATA / f"{split}.json").read_text())}
    train, test = (cache_samples(cache_uri(f"configs/quality/encode_shapes_{n}.yaml")) for n in ("train", "test"))
    references = vqa_ceilings(train, test, lambda s: kinds[s.meta["id"]], {"yesno": [*COLOURS, *SHAPES]})
    rows = {kind: {**ref} for kind, ref in references.items()}
    for seed in seeds:
        started = time.perf_counter()
        checkpoint = train_both_phases("configs/quality/train_shapes.yaml", seed, tracking_uri)
        result = evaluate("configs/quality/eval_shapes.yaml", checkpoint, tracking_uri)
        for kind, accuracy in grouped_accuracy(result.predictions, kinds.__getitem__).items():
            rows[kind].setdefault("model", []).append(accuracy)
            rows[kind].setdefault("minutes", []).append((time.perf_counter() - started) / 60)
    return [{"task": f"shapes VQA: {kind}", "metric": "accuracy", **row} for kind, row in rows.items()]


def elnino_suite(seeds, tracking_uri) -> list[dict]:
    """The second real series: monthly El Nino sea-surface temperature, trained alone."""
    from pipelines.metrics.ceilings import cache_samples, ridge_forecast_mse

    train, test = (cache_samples(cache_uri(f"configs/quality/encode_elnino_{n}.yaml")) for n in ("train", "test"))
    row = {"ceiling": ridge_forecast_mse(train, test)}
    for seed in seeds:
        started = time.perf_counter()
        result = evaluate("configs/quality/eval_elnino.yaml",
                          train_both_phases("configs/quality/train_elnino.yaml", seed, tracking_uri), tracking_uri)
        row.setdefault("model", []).append(result.metrics["mse"])
        row["baseline"] = result.baselines["mse"]  # seasonal naive: the same for every seed
        row.setdefault("minutes", []).append((time.perf_counter() - started) / 60)
    return [{"task": "El Nino forecast", "metric": "mse", **row}]


# ---- report -------------------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return f"{np.mean(value):.3f} ± {np.std(value):.3f}" if value else "—"
    return f"{value:.3f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy (higher is better)", [r for r in rows if r["metric"] == "accuracy"]),
              ("error (lower is better)", [r for r in rows if r["metric"] != "accuracy"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for ax, (title, group) in zip(axes, panels):
        x = np.arange(len(group))
        bars = ((-0.27, "model", "tab:blue"), (0, "ceiling", "tab:green"), (0.27, "baseline", "tab:gray"))
        for offset, key, colour in bars:
            values = [np.mean(r[key]) if r.get(key) is not None and np.size(r[key]) else np.nan for r in group]
            errors = [np.std(r[key]) if isinstance(r.get(key), list) else 0 for r in group]
            ax.bar(x + offset, values, 0.27, yerr=errors, color=colour, label=key, capsize=2)
        ax.set_xticks(x, [f"{r['task']}\n{r['metric']}" for r in group], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        if group and group[0]["metric"] != "accuracy":
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--suites", nargs="+", choices=["demo", "shapes", "elnino"],
                        default=["demo", "shapes", "elnino"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--single-process", action="store_true",
                        help="train (the training core) and evaluate in this process, on the GPU when there is one, "
                             "instead of Ray Train + DeepSpeed and Ray Data")
    parser.add_argument("--untracked", action="store_true", help="no MLflow (with --single-process)")
    parser.add_argument("--caches", type=Path,
                        help="the demo suite's cache entries, as --write-caches wrote them: no data or encoders needed")
    parser.add_argument("--write-caches", type=Path, metavar="FILE",
                        help="encode the demo's caches (when missing), list them in FILE for --caches, and stop")
    args = parser.parse_args()
    if args.untracked and not args.single_process:
        parser.error("--untracked needs --single-process (Ray Train's driver tracks every run)")
    if args.caches and set(args.suites) != {"demo"}:
        parser.error("--caches serves the demo suite alone: add --suites demo")
    global SINGLE_PROCESS, UNTRACKED
    SINGLE_PROCESS, UNTRACKED = args.single_process, args.untracked
    os.chdir(ROOT)  # the shipped configs use paths relative to the repository
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = None if UNTRACKED else f"sqlite:///{out / 'quality_mlflow.db'}"
    if args.caches:
        import torch

        from pipelines.demo_backbone import pretrained_backbone

        CACHES.update(json.loads(args.caches.read_text()))
        pretrained_backbone(Path("runs/demo/backbone"), device="cuda" if torch.cuda.is_available() else "cpu")
        rows = demo_suite(args.seeds, tracking_uri)
    else:
        import ray

        from pipelines.demo import prepare_assets

        prepare_assets()
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        try:
            if args.write_caches:
                return write_caches(args.write_caches)
            rows = []
            if "demo" in args.suites:
                rows += demo_suite(args.seeds, tracking_uri)
            if "shapes" in args.suites:
                rows += shapes_suite(args.seeds, tracking_uri)
            if "elnino" in args.suites:
                rows += elnino_suite(args.seeds, tracking_uri)
        finally:
            ray.shutdown()
    plot(rows, out / "quality.png")
    machine = (f"{machine_description()}; seeds {args.seeds}; "
               f"trained {'in one process' if SINGLE_PROCESS else 'by Ray Train + DeepSpeed'}")
    lines = ["| task | metric | model (mean ± std) | ceiling | baseline | minutes per seed |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {fmt(r.get('model'))} | {fmt(r.get('ceiling'))} | "
              f"{fmt(r.get('baseline'))} | {np.mean(r.get('minutes', [np.nan])):.1f} |" for r in rows]
    lines.append("\nceiling: logistic-regression probe (VQA) or ridge (forecast) on the same cached features; "
                 "baseline: majority answer, empty transcript, seasonal naive (52 weeks, 12 months). Minutes cover training "
                 "and evaluation; a demo training serves its three tasks.")
    write_report(out, "quality", machine, rows, lines)


if __name__ == "__main__":
    main()
