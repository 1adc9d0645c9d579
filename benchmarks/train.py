"""Training throughput on the demo's digits cache (DINOv2 features, the demo's tiny RWKV-7, phase II):
samples/s with 1 vs 2 Ray Train workers under ZeRO-2, and ZeRO stage 1 vs 2 with 2 workers; then the time a step
waits for its input with the cache on local disk vs in S3 (a local moto endpoint), shards read ahead or not.

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


def config(out: Path, cache: str, workers: int, stage: int, steps: int, prefetch: int = 4):
    from pipelines.config import from_dict
    from pipelines.train import TrainConfig

    return from_dict(TrainConfig, {
        "name": "bench", "caches": [cache], "output_dir": str(out), "prefetch_threads": prefetch,
        "model": {"backbone": {"path": "runs/demo/backbone"}, "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2}}},
        "phase1": {"lr": 1e-3, "steps": 1, "global_batch": 16, "micro_batch": 8},
        "phase2": {"lr": 1e-3, "steps": steps, "global_batch": 16, "micro_batch": 8},  # 1 worker accumulates 2 micro-batches
        "deepspeed": {"zero_stage": stage}, "scaling": {"workers": workers, "max_failures": 0},
        "tracking": {"tracking_uri": f"sqlite:///{(out / 'mlflow.db').absolute()}", "experiment": "bench"}})


def mean_after_first(client, run_id: str, metric: str) -> float:
    per_step = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)[1:]
    return sum(m.value for m in per_step) / len(per_step)


def copy_to_s3(cache: str, bucket: str) -> str:
    from preprocessing import storage

    uri = f"s3://{bucket}/cache/{Path(cache).name}"
    for path in sorted(Path(cache).iterdir()):
        storage.write_atomic(f"{uri}/{path.name}", path.read_bytes())
    return uri


def input_wait(out: Path, cache: str, s3_cache: str, steps: int) -> list[dict]:
    """Phase II with 2 workers from each cache copy, shards read ahead (the default) or on the training thread."""
    from mlflow import MlflowClient

    from pipelines.train import run_train

    rows = []
    for where, uri in (("local disk", cache), ("S3 (moto)", s3_cache)):
        for prefetch in (0, 4):
            result = run_train(config(out, uri, 2, 2, steps, prefetch), phase=2)
            client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
            rows.append({"cache": where, "prefetch_threads": prefetch,
                         "data_wait_s": mean_after_first(client, result.run_id, "data_wait_s"),
                         "samples_per_s": mean_after_first(client, result.run_id, "samples_per_s")})
    return rows


def main():
    import ray
    from mlflow import MlflowClient

    from benchmarks.encode import encode_config, prepare
    from infra.s3_server import start_s3, stop_s3
    from pipelines.encode import run_encode
    from pipelines.train import run_train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    prepare()
    out = (Path(args.out) / "train-work").absolute()
    s3 = start_s3(out / "s3")
    os.environ.update(s3.env())  # before Ray starts: its workers inherit the endpoint
    s3.create_bucket("bench")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    cache = run_encode(encode_config(Path("runs/cache"), 2)).uri
    run_train(config(out, cache, 2, 2, args.steps), phase=1)  # phase II starts from a phase I output
    rows = []
    for workers, stage in CASES:
        result = run_train(config(out, cache, workers, stage, args.steps), phase=2)
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        rows.append({"workers": workers, "zero_stage": stage, "wall_s": result.seconds,
                     "samples_per_s": mean_after_first(client, result.run_id, "samples_per_s")})
    waits = input_wait(out, cache, copy_to_s3(cache, "bench"), 36)  # 2.25 epochs of each worker's 4 shards
    ray.shutdown()
    stop_s3(s3)
    base = rows[0]["samples_per_s"]
    lines = ["| workers | ZeRO | samples/s | vs 1 worker | job wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['zero_stage']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x | {r['wall_s']:.0f} |"
              for r in rows]
    local = waits[1]["data_wait_s"]
    lines += ["", "| cache | reader threads | input wait per step, ms | vs local, read ahead | samples/s |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['cache']} | {r['prefetch_threads']} | {r['data_wait_s'] * 1e3:.1f} | {r['data_wait_s'] / local:.2f}x "
              f"| {r['samples_per_s']:.1f} |" for r in waits]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 CPU per worker"
    write_report(args.out, "train", machine, rows + waits, lines)


if __name__ == "__main__":
    main()
