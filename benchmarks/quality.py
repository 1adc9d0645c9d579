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
(copies of the caches' entries, with only their features, go to runs/gpu_demo/cache: carry runs/gpu_demo; the
stand-in backbone is trained there).

Each suite also runs a `Variant` of its shipped configs: benchmarks/experiments.py re-runs the experiments behind
the shipped defaults that way, scored on each task's val split (`--split val`: ceilings fit on the training split,
scored on val), so that a choice among arms leaves the test split's figures unbiased.
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)

from benchmarks.report import write_report  # noqa: E402
from pipelines.environment import cpu_description  # noqa: E402

SHAPES_DATA = Path("runs/shapes/data")
DEMO_EVALS = {"digits VQA": "configs/demo/eval_digits.yaml", "spoken digits": "configs/demo/eval_speech.yaml",
              "CO2 forecast": "configs/demo/eval_co2.yaml"}
DEMO_METRICS = {"digits VQA": ("accuracy",), "spoken digits": ("wer_en", "cer_zh"), "CO2 forecast": ("mse",)}
SUITE_CONFIGS = {  # suite -> its train config and its eval configs
    "demo": ("configs/demo/train.yaml", tuple(DEMO_EVALS.values())),
    "shapes": ("configs/quality/train_shapes.yaml", ("configs/quality/eval_shapes.yaml",)),
    "elnino": ("configs/quality/train_elnino.yaml", ("configs/quality/eval_elnino.yaml",)),
}
VARIANT_DATA = Path("runs/experiments/data")  # data sets other than the shipped ones, each in a folder of its own
SPLITS = ("train", "val", "test")  # an eval config reads the test split's encode YAML; its val twin is beside it
DATA_BUILDERS = {  # data a variant may build: module, builder, and the file each encode YAML then reads
    "shapes": ("preprocessing.shapes_data", "build_shapes",
               {f"configs/quality/encode_shapes_{split}.yaml": f"{split}.json" for split in SPLITS}),
    "speech": ("preprocessing.demo_data", "build_speech",
               {f"configs/demo/encode_speech_{split}.yaml": f"{split}.jsonl" for split in SPLITS}),
}


@dataclass(frozen=True)
class Variant:
    """What an experiment's arm (benchmarks/experiments.py) changes in a suite's shipped configs; every override is
    `--set`-style (dotted key -> value). The shipped suites run `SHIPPED`."""

    name: str = "quality"  # in the run names, so that arms do not share output folders
    train: dict = field(default_factory=dict)  # over the suite's train config
    encode: dict = field(default_factory=dict)  # encode YAML -> overrides of it (an encoder's layer, ...)
    # DATA_BUILDERS name -> its builder's keywords: a data set other than the shipped one, which the encode YAMLs
    # that read it are pointed at
    data: dict = field(default_factory=dict)


SHIPPED = Variant()


# ---- model scores -------------------------------------------------------------------------------------------
SINGLE_PROCESS = False  # --single-process: train with the core and evaluate in this process, no Ray
UNTRACKED = False  # --untracked: no MLflow (a machine without it)
CACHES: dict[str, str] = {}  # --caches: encode YAML -> its cache entry, for a machine without the data or encoders


def train_both_phases(config_path: str, seed: int, tracking_uri: str, variant: Variant = SHIPPED,
                      encode: dict | None = None):
    """Phases I and II of the train config with `variant`'s overrides; `encode`: encode YAML -> its overrides
    (`encode_overrides`). Returns phase II's model folder."""
    from pipelines.config import load_config
    from pipelines.train_config import TrainConfig
    from pipelines.train_local import run_single_process
    from pipelines.train_setup import phase_dir

    name = f"{Path(config_path).stem.removeprefix('train').strip('_') or 'demo'}-{variant.name}-s{seed}"
    config = load_config(config_path, TrainConfig, {**variant.train, "seed": seed, "name": name,
                                                    "tracking.tracking_uri": tracking_uri,
                                                    "tracking.experiment": "quality"})

    # a phase's own caches too: a variant's encode overrides (and --caches) reach every cache trained on
    config = config.with_caches(lambda c: cache_uri(c, (encode or {}).get(c)))
    if SINGLE_PROCESS:
        train = run_single_process
    else:
        from pipelines.train import run_train  # imports Ray

        train = run_train
    for phase in (1, 2):
        train(config, phase)
    return Path(phase_dir(config, 2)) / "model"


def evaluate(eval_path: str, checkpoint: Path, tracking_uri: str, encode: dict | None = None, split: str = "test"):
    """The eval config on its cache's `split` (`split_yaml`)."""
    from pipelines.config import load_config
    from pipelines.evaluate import EvalConfig, run_eval

    out_dir = checkpoint.parent.parent / "eval" / f"{Path(eval_path).stem}-{split}"
    config = load_config(eval_path, EvalConfig, {"checkpoint": str(checkpoint), "out_dir": str(out_dir),
                                                 "tracking_uri": tracking_uri, "experiment": "quality",
                                                 "actors": 0 if SINGLE_PROCESS else 1, "track": not UNTRACKED})
    yaml = split_yaml(config.cache, split)
    return run_eval(dataclasses.replace(config, cache=cache_uri(yaml, (encode or {}).get(yaml))))


def split_yaml(test_yaml: str, split: str) -> str:
    """The encode YAML of `split` beside an eval config's test one (encode_X_test.yaml -> encode_X_val.yaml)."""
    if not test_yaml.endswith("_test.yaml"):
        raise ValueError(f"{test_yaml}: an eval config's cache here is a test split's encode YAML (*_test.yaml)")
    path = test_yaml.removesuffix("_test.yaml") + f"_{split}.yaml"
    if not (ROOT / path).is_file():
        raise FileNotFoundError(f"{path}: no {split} split beside {test_yaml}")
    return path


def grouped_accuracy(predictions: Path, group_of_key) -> dict[str, float]:
    """Accuracy per group over the rows evaluation scored, as its own metrics do: a sample it skipped (named, with
    its reason, in the predictions file; counted by the run's rows_skipped) is scored as its empty prediction, wrong;
    one with no prediction at all is left out."""
    from pipelines.metrics.vqa import exact_match

    scores = defaultdict(list)
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        if "prediction" in row:
            scores[group_of_key(row["key"])].append(exact_match(row["prediction"], row["reference"]))
    return {group: float(np.mean(v)) for group, v in scores.items()}


# ---- suites -------------------------------------------------------------------------------------------------
def cache_uri(encode_yaml: str, overrides: dict | None = None) -> str:
    """The cache of an encode YAML with `overrides` (found in the cache, or encoded first), or the entry --caches
    gave for it."""
    from pipelines.caches import resolve_cache

    if CACHES:
        if overrides:
            raise SystemExit(f"{encode_yaml} is changed by this variant ({overrides}): --caches cannot give it")
        if encode_yaml not in CACHES:
            raise SystemExit(f"{encode_yaml} is not among the caches given; they cover {sorted(CACHES)}")
        return str(ROOT / CACHES[encode_yaml])
    return resolve_cache(encode_yaml, overrides)


def data_builder(name: str):
    module, builder, _ = DATA_BUILDERS[name]
    return getattr(importlib.import_module(module), builder)


def variant_data_folder(name: str, keywords: dict) -> Path:
    return VARIANT_DATA / "-".join([name, *(f"{k}-{v}" for k, v in sorted(keywords.items()))])


def encode_overrides(variant: Variant, build: bool = True) -> dict[str, dict]:
    """encode YAML -> its overrides: the variant's own, and the dataset paths of the data sets it asks for, each
    built (with `build`, when its folder lacks it) from its builder's keywords in a folder of its own."""
    overrides = {yaml: dict(o) for yaml, o in variant.encode.items()}
    for name, keywords in variant.data.items():
        folder, files = variant_data_folder(name, keywords), DATA_BUILDERS[name][2]
        if build and not all((folder / file).is_file() for file in files.values()):
            data_builder(name)(folder, **keywords)
        for yaml, file in files.items():
            overrides.setdefault(yaml, {})["dataset.path"] = str(folder / file)
    return overrides


def split_samples(encode_yaml: str, encode: dict[str, dict], split: str = "test") -> tuple[list, list]:
    """The training samples and those of `split` (test, val, or train itself) of the encode YAMLs `encode_yaml`
    names with "{}" for the split: what a ceiling is fit on and scored on."""
    from pipelines.metrics.ceilings import cache_samples

    yamls = [encode_yaml.format(s) for s in ("train", split)]
    train, scored = (cache_samples(cache_uri(yaml, encode.get(yaml))) for yaml in yamls)
    return train, scored


def write_caches(path: Path) -> None:
    """The demo suite's encode YAMLs (its training caches and the test splits it scores) and copies of their entries
    in a cache root beside FILE (with only the store items they use: `modrwkv cache cp`), for `--caches` on a
    machine without the data or the encoders."""
    from pipelines.config import load_config
    from pipelines.evaluate import EvalConfig
    from pipelines.train_config import TrainConfig
    from preprocessing.cache.copy import copy_entry

    root = path.absolute().parent / "cache"
    train_config, evals = SUITE_CONFIGS["demo"]
    read = {*load_config(train_config, TrainConfig).read_caches(), *(load_config(e, EvalConfig).cache for e in evals)}
    entries = {}
    for yaml in sorted(read):
        copied = copy_entry(cache_uri(str(yaml)), str(root), progress=False)
        entries[str(yaml)] = str(Path(copied.uri).relative_to(ROOT))
    path.write_text(json.dumps(entries, indent=1) + "\n")
    print(f"wrote {path}: {len(entries)} cache entries in {root} (carry that folder)")


def machine_description() -> str:
    import torch

    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {cpu_description()}, {os.cpu_count()} CPUs, {where}"


def demo_suite(seeds, tracking_uri, variant: Variant = SHIPPED, tasks=tuple(DEMO_EVALS), split: str = "test"
               ) -> list[dict]:
    """`tasks`: the demo tasks evaluated (all three; a variant that trains some of the caches alone names those);
    `split`: the one scored (test, val where arms are compared, or train: the fit)."""
    from pipelines.metrics.ceilings import ridge_forecast_mse, vqa_ceilings

    encode = encode_overrides(variant)
    rows = {(task, metric): {} for task in tasks for metric in DEMO_METRICS[task]}
    if "digits VQA" in tasks:
        digits = vqa_ceilings(*split_samples("configs/demo/encode_digits_{}.yaml", encode, split))["all"]
        rows["digits VQA", "accuracy"].update(ceiling=digits["ceiling"], baseline=digits["baseline"])
    if "CO2 forecast" in tasks:
        rows["CO2 forecast", "mse"]["ceiling"] = ridge_forecast_mse(*split_samples("configs/demo/encode_co2_{}.yaml",
                                                                                   encode, split))
    train_config, _ = SUITE_CONFIGS["demo"]
    for seed in seeds:
        started = time.perf_counter()
        checkpoint = train_both_phases(train_config, seed, tracking_uri, variant, encode)
        for task in tasks:
            result = evaluate(DEMO_EVALS[task], checkpoint, tracking_uri, encode, split)
            for metric in DEMO_METRICS[task]:
                rows[task, metric].setdefault("model", []).append(result.metrics[metric])
                if metric != "accuracy":  # empty transcript, seasonal naive: the same for every seed
                    rows[task, metric]["baseline"] = result.baselines[metric]
        for row in rows.values():
            row.setdefault("minutes", []).append((time.perf_counter() - started) / 60)
        # each seed's scores as it ends: a run cut short (a lent GPU's limit) still leaves the seeds it finished
        print(f"seed {seed} ({rows[next(iter(rows))]['minutes'][-1]:.1f} min): " + ", ".join(
            f"{task} {metric} {row['model'][-1]:.4g}" for (task, metric), row in rows.items()), flush=True)
    return [{"task": t, "metric": m, **row} for (t, m), row in rows.items()]


def shapes_suite(seeds, tracking_uri, variant: Variant = SHIPPED, split: str = "test") -> list[dict]:
    from pipelines.config import load_config
    from pipelines.encode import EncodeConfig
    from pipelines.metrics.ceilings import vqa_ceilings
    from preprocessing.shapes_data import COLOURS, SHAPES, build_shapes

    if "shapes" not in variant.data:
        build_shapes(SHAPES_DATA)  # the shipped size, in seconds; the feature store re-encodes only images that changed
    encode = encode_overrides(variant)
    shapes_yaml = "configs/quality/encode_shapes_{}.yaml"
    kinds = {r["id"]: r["type"] for part in ("train", split) for r in json.loads(
        Path(load_config(shapes_yaml.format(part), EncodeConfig, encode.get(shapes_yaml.format(part))).dataset.path)
        .read_text())}
    references = vqa_ceilings(*split_samples(shapes_yaml, encode, split), lambda s: kinds[s.meta["id"]],
                              {"yesno": [*COLOURS, *SHAPES]})
    rows = {kind: {**ref} for kind, ref in references.items()}
    train_config, (eval_config,) = SUITE_CONFIGS["shapes"]
    for seed in seeds:
        started = time.perf_counter()
        checkpoint = train_both_phases(train_config, seed, tracking_uri, variant, encode)
        result = evaluate(eval_config, checkpoint, tracking_uri, encode, split)
        for kind, accuracy in grouped_accuracy(result.predictions, kinds.__getitem__).items():
            rows[kind].setdefault("model", []).append(accuracy)
            rows[kind].setdefault("minutes", []).append((time.perf_counter() - started) / 60)
    return [{"task": f"shapes VQA: {kind}", "metric": "accuracy", **row} for kind, row in rows.items()]


def elnino_suite(seeds, tracking_uri, variant: Variant = SHIPPED, split: str = "test") -> list[dict]:
    """The second real series: monthly El Nino sea-surface temperature, trained alone."""
    from pipelines.metrics.ceilings import ridge_forecast_mse

    encode = encode_overrides(variant)
    row = {"ceiling": ridge_forecast_mse(*split_samples("configs/quality/encode_elnino_{}.yaml", encode, split))}
    train_config, (eval_config,) = SUITE_CONFIGS["elnino"]
    for seed in seeds:
        started = time.perf_counter()
        checkpoint = train_both_phases(train_config, seed, tracking_uri, variant, encode)
        result = evaluate(eval_config, checkpoint, tracking_uri, encode, split)
        row.setdefault("model", []).append(result.metrics["mse"])
        row["baseline"] = result.baselines["mse"]  # seasonal naive: the same for every seed
        row.setdefault("minutes", []).append((time.perf_counter() - started) / 60)
    return [{"task": "El Nino forecast", "metric": "mse", **row}]


SUITES = {"demo": demo_suite, "shapes": shapes_suite, "elnino": elnino_suite}


# ---- report -------------------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        if len(value) < 2:  # one seed has no spread: "± 0.000" would claim that seeds agree
            return f"{value[0]:.3f} (one seed)" if value else "—"
        return f"{np.mean(value):.3f} ± {np.std(value, ddof=1):.3f}"  # the seeds' sample std
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
            errors = [np.std(r[key], ddof=1) if isinstance(r.get(key), list) and len(r[key]) > 1 else 0
                      for r in group]
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
    parser.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the split scored: test (the quality tables), or val (where recipes are compared)")
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
        rows = demo_suite(args.seeds, tracking_uri, split=args.split)
    else:
        import ray

        from infra.local_ray import init_ray
        from pipelines.demo import prepare_assets

        prepare_assets()
        init_ray(local={"num_cpus": 3}, include_dashboard=False, log_to_driver=False)
        try:
            if args.write_caches:
                return write_caches(args.write_caches)
            rows = [row for name, suite in SUITES.items() if name in args.suites
                    for row in suite(args.seeds, tracking_uri, split=args.split)]
        finally:
            ray.shutdown()
    plot(rows, out / "quality.png")
    machine = (f"{machine_description()}; seeds {args.seeds}; the {args.split} split; "
               f"trained {'in one process' if SINGLE_PROCESS else 'by Ray Train + DeepSpeed'}")
    lines = ["| task | metric | model (mean ± std) | ceiling | baseline | minutes per seed |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {fmt(r.get('model'))} | {fmt(r.get('ceiling'))} | "
              f"{fmt(r.get('baseline'))} | {np.mean(r.get('minutes', [np.nan])):.1f} |" for r in rows]
    lines.append("\nceiling: logistic-regression probe (VQA) or ridge (forecast) on the same cached features; "
                 "baseline: majority answer, empty transcript, seasonal naive (52 weeks, 12 months); ± is the "
                 "seeds' sample std (ddof 1). Minutes cover training and evaluation; a demo training serves its "
                 "three tasks.")
    write_report(out, "quality", machine, rows, lines)


if __name__ == "__main__":
    main()
