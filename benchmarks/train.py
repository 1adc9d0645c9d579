"""Training throughput on the demo's digits cache (DINOv2 features, the demo's tiny RWKV-7, phase II):
samples/s with 1 vs 2 Ray Train workers under ZeRO-2, and ZeRO stage 1 vs 2 with 2 workers.

Each case is a real `run_train` (Ray Train + DeepSpeed, MLflow to a local SQLite file); samples/s is the mean
of the per-step figures after the first step, the same global batch in every case.

    python benchmarks/train.py [--out benchmarks/out] [--steps 12]
"""

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's files
os.chdir(ROOT)

import torch  # noqa: E402

from benchmarks.report import write_report  # noqa: E402

CASES = [(1, 2), (2, 1), (2, 2)]  # (workers, ZeRO stage)


def config(out: Path, cache: str, workers: int, stage: int, steps: int):
    from pipelines.config import from_dict
    from pipelines.train import TrainConfig

    return from_dict(TrainConfig, {
        "name": "bench", "caches": [cache], "output_dir": str(out),
        "model": {"backbone": {"path": "runs/demo/backbone"}, "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2}}},
        "phase1": {"lr": 1e-3, "steps": 1, "global_batch": 16, "micro_batch": 8},
        "phase2": {"lr": 1e-3, "steps": steps, "global_batch": 16, "micro_batch": 8},  # 1 worker accumulates 2 micro-batches
        "deepspeed": {"zero_stage": stage}, "scaling": {"workers": workers, "max_failures": 0},
        "tracking": {"tracking_uri": f"sqlite:///{(out / 'mlflow.db').absolute()}", "experiment": "bench"}})


def main():
    import ray
    from mlflow import MlflowClient

    from benchmarks.encode import encode_config, prepare
    from pipelines.encode import run_encode
    from pipelines.train import run_train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    prepare()
    out = (Path(args.out) / "train-work").absolute()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    cache = run_encode(encode_config(Path("runs/cache"), 2)).uri
    run_train(config(out, cache, 2, 2, args.steps), phase=1)  # phase II starts from a phase I output
    rows = []
    for workers, stage in CASES:
        result = run_train(config(out, cache, workers, stage, args.steps), phase=2)
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        per_step = sorted(client.get_metric_history(result.run_id, "samples_per_s"), key=lambda m: m.step)[1:]
        rows.append({"workers": workers, "zero_stage": stage, "samples_per_s": sum(m.value for m in per_step) / len(per_step),
                     "wall_s": result.seconds})
    ray.shutdown()
    base = rows[0]["samples_per_s"]
    lines = ["| workers | ZeRO | samples/s | vs 1 worker | job wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['zero_stage']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x | {r['wall_s']:.0f} |"
              for r in rows]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 CPU per worker"
    write_report(args.out, "train", machine, rows, lines)


if __name__ == "__main__":
    main()
