"""The driver-side training progress bar follows the steps rank 0 logs to MLflow."""

import time

from mlflow import MlflowClient

from pipelines.tracking import MetricLogger, StepProgress, start_run


def test_step_progress_follows_the_logged_steps(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "progress", "run", {}, {})
    logger = MetricLogger(uri, run_id)
    with StepProgress(uri, run_id, total=5, desc="phase 1", every_s=0.05) as progress:
        for step in (1, 2, 3):
            logger.log({"loss": 1.0 / step}, step)
        deadline = time.monotonic() + 10
        while progress.bar.n < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.bar.n == 3
        assert progress.bar.postfix == "loss=0.3333"
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # the bar only reads


def test_step_progress_survives_an_unreachable_server(tmp_path):
    started = time.monotonic()
    with StepProgress("http://127.0.0.1:9", "no-such-run", total=2, desc="phase 1", every_s=0.01) as progress:
        time.sleep(0.05)
    assert progress.bar.n == 0
    assert time.monotonic() - started < 10  # the job is not held up by the bar's retries
