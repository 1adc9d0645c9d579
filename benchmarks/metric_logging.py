"""What logging a training step's metrics costs the step: `MetricLogger` (shipped: the batch goes to MLflow's
background logging thread) against the synchronous batch every step made before, rank 0 waiting for the tracking
server while the other workers wait at the next all-reduce. `--steps` steps of `--metrics` metrics into one run each
on a local MLflow server (SQLite, one worker; started here on 127.0.0.1 and stopped by its pid), the two ways
alternated `--rounds` times: the time the step loop spends in `log`, and until every batch has landed.

    python benchmarks/metric_logging.py [--steps 100] [--metrics 12] [--rounds 2] [--out benchmarks/out]
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)


def synchronous_logger(uri: str, run_id: str):
    """The logger before: each step's batch sent and waited for."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)

    class Synchronous:
        def log(self, metrics: dict, step: int) -> None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

        def flush(self) -> None:
            pass

    return Synchronous()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--metrics", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from benchmarks.report import write_report
    from infra.mlflow_server import start_mlflow
    from pipelines.environment import cpu_description
    from pipelines.tracking import MetricLogger

    ways = {"background (shipped)": MetricLogger, "synchronous (before)": synchronous_logger}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_mlflow(Path(tmp)) as server:
        client = MlflowClient(server.tracking_uri)
        experiment = client.create_experiment("metric-logging")
        for round_ in range(args.rounds):
            for way, make in ways.items():
                run_id = client.create_run(experiment).info.run_id
                logger = make(server.tracking_uri, run_id)
                started = time.perf_counter()
                for step in range(1, args.steps + 1):
                    logger.log({f"metric_{i}": step * 0.1 + i for i in range(args.metrics)}, step)
                in_loop = time.perf_counter() - started
                logger.flush()
                landed = time.perf_counter() - started
                if len(client.get_metric_history(run_id, "metric_0")) != args.steps:
                    raise RuntimeError(f"{way}: not every step's metrics landed")
                rows.append({"way": way, "round": round_, "steps": args.steps, "metrics": args.metrics,
                             "ms_per_step_in_loop": 1000 * in_loop / args.steps, "seconds_until_landed": landed})
                print(rows[-1], file=sys.stderr, flush=True)
    lines = ["| way | round | steps x metrics | ms a step spends logging | s until all landed |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['way']} | {r['round']} | {r['steps']} x {r['metrics']} | {r['ms_per_step_in_loop']:.2f} | "
              f"{r['seconds_until_landed']:.2f} |" for r in rows]
    machine = (f"{cpu_description()}, {os.cpu_count()} CPUs, {platform.machine()}; MLflow server on 127.0.0.1 "
               "(SQLite, one worker)")
    write_report(args.out, "metric_logging", machine, rows, lines)


if __name__ == "__main__":
    main()
