"""The driver-side training progress bar follows the steps rank 0 logs to MLflow."""

import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.async_logging.run_operations import RunOperations

from pipelines.tracking import MetricLogger, StepProgress, start_run


def test_step_progress_follows_the_logged_steps(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "progress", "run", {}, {})
    logger = MetricLogger(uri, run_id)
    with StepProgress(uri, run_id, total=5, desc="phase 1", every_s=0.05) as progress:
        for step in (1, 2, 3):
            logger.log({"loss": 1.0 / step}, step)
        deadline = time.monotonic() + 10  # the poll sets the count, then the loss: both awaited
        while (progress.bar.n, progress.bar.postfix) != (3, "loss=0.3333") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.bar.n == 3
        assert progress.bar.postfix == "loss=0.3333"
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # the bar only reads


def stuck_future(release: "threading.Event"):
    """A logging operation's future that completes once `release` is set (a tracking server not answering)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1).submit(release.wait)


def test_step_metrics_are_sent_in_the_background_and_all_land_by_flush(tmp_path, monkeypatch, capsys):
    """A step hands its batch to MLflow's logging thread and goes on; `flush` returns once every step's metrics are
    in the run, and counts and says what the server refused: it raised, at a run's last step, before its final
    checkpoint, for the figures of one minute of an outage days before."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "background", "run", {}, {})
    logger = MetricLogger(uri, run_id)
    modes = []
    real = logger.client.log_batch
    monkeypatch.setattr(logger.client, "log_batch", lambda *a, **k: modes.append(k["synchronous"]) or real(*a, **k))
    for step in range(1, 21):
        logger.log({"loss": 1.0 / step, "lr": 0.1}, step)
    logger.flush()
    assert modes == [False] * 20 and logger.pending == []
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    logger.log({"bad name/../": 1.0}, 21)  # MLflow refuses the name: seen at flush, not at the step
    assert logger.flush() == 1 and logger.pending == []
    assert f"MLflow run {run_id}: a batch of step metrics was not logged" in capsys.readouterr().out
    logger.log({"loss": 0.01}, 22)
    assert logger.flush() == 1  # the count is the run's, all told
    assert max(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")) == 22
    # a long run lets each batch go once it has landed, its failure said then, not at the last step; a step never
    # waits for one that has not
    logger.log({"bad name/../": 1.0}, 23)
    deadline = time.monotonic() + 10
    while not all(f.done() for f in logger.pending[0]._operation_futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.log({"loss": 0.01}, 24)
    assert logger.lost == 2 and len(logger.pending) == 1  # step 24's, in flight or not yet let go
    stuck = threading.Event()
    monkeypatch.setattr(logger.client, "log_batch", lambda *a, **k: RunOperations([stuck_future(stuck)]))
    logger.log({"loss": 0.01}, 25)
    step = threading.Thread(target=logger.log, args=({"loss": 0.01}, 26))
    step.start()
    step.join(30)  # step 25's batch has not landed (nor will it, until `stuck` is set): not waited for
    assert not step.is_alive() and len(logger.pending) >= 2
    stuck.set()
    assert logger.flush() == 2


def test_credentials_in_mlflows_own_error_logs_are_left_out(monkeypatch):
    """MLflow's background logging and system metrics monitor log the URL a request failed on, password and all."""
    import io
    import logging

    from pipelines.redaction import redact, redact_mlflow_logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(logging.getLogger("mlflow"), "handlers", [*logging.getLogger("mlflow").handlers, handler])
    redact_mlflow_logs()
    logging.getLogger("mlflow.utils.async_logging").error(
        "Failed to log run data: Exception: API request to %s failed", "http://alice:s3cretTOKEN@127.0.0.1:9/api")
    assert "API request to http://127.0.0.1:9/api failed" in stream.getvalue() and "s3cret" not in stream.getvalue()
    # a query's secrets (a presigned artifact URL's signature and key id), and a traceback's text
    try:
        raise ConnectionError("GET https://bucket.s3/key?X-Amz-Credential=AKIAXYZ%2F2026&X-Amz-Signature=9f8e&n=1 "
                              "and http://bob:hunter2@127.0.0.1:9/api")
    except ConnectionError:
        logging.getLogger("mlflow.store.artifact").exception("download failed: %s", "https://h/a?token=abc123")
    logged = stream.getvalue()
    assert "download failed: https://h/a?token=***\n" in logged and "X-Amz-Signature=***&n=1" in logged
    assert not any(secret in logged for secret in ("abc123", "AKIAXYZ", "9f8e", "hunter2"))
    assert "ConnectionError: GET https://bucket.s3/key?X-Amz-Credential=***&" in logged  # the traceback kept
    for url, kept in (("https://acct.blob.core.windows.net/c/b?sv=2024&sig=abc%2Bdef", "?sv=2024&sig=***"),
                      ("https://s3/k?AWSAccessKeyId=AKIA1&Signature=zz&Expires=9",
                       "?AWSAccessKeyId=***&Signature=***&"),
                      ("https://storage.googleapis.com/b/o?GoogleAccessId=sa%40p&Expires=1", "?GoogleAccessId=***&"),
                      ("http://127.0.0.1:5000/api/2.0/mlflow/runs/get?run_id=abc", "?run_id=abc")):
        assert kept in redact(url)


def test_a_run_whose_params_do_not_log_ends_failed_and_long_tags_are_cut_saying_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(Exception, match="exceeds"):
        start_run(uri, "params", "long key", {"k" * 300: 1}, {})
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("params").experiment_id])
    assert run.info.status == "FAILED"  # not RUNNING for ever
    run_id = start_run(uri, "params", "long tag", {"caches": ["c" * 100] * 100}, {"feature_caches": "x" * 9000})
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["feature_caches"].endswith("... (9000 characters, cut to 8000)")
    assert len(run.data.tags["feature_caches"]) == 8000 and len(run.data.params["caches"]) == 6000


def test_step_progress_survives_a_server_that_does_not_answer(monkeypatch):
    """A poll stuck in MLflow's retries of an unreachable server (minutes) does not hold up the job at its end (the
    bar waits 2 s for it, then closes without it), and leaves the bar as it was."""
    import threading

    answer = threading.Event()

    def stuck(run_id):
        answer.wait(60)
        raise ConnectionError("the tracking server did not answer")

    with StepProgress("http://127.0.0.1:9", "no-such-run", total=2, desc="phase 1", every_s=0.01) as progress:
        monkeypatch.setattr(progress.client, "get_run", stuck)
        time.sleep(0.05)  # a poll is under way, stuck
    assert progress.thread.is_alive() and progress.bar.n == 0  # closed while the poll was still stuck
    answer.set()
    progress.thread.join(10)


def test_run_status_ends_runs_finished_failed_or_killed_with_an_end_time(tmp_path):
    import pytest

    from infra.signals import StoppedBySignal
    from pipelines.tracking import run_status

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    outcomes = {}
    errors = {"ok": None, "crash": RuntimeError("boom"), "exit": SystemExit(1), "ctrl-c": KeyboardInterrupt(),
              "kill": StoppedBySignal(143)}  # `kill` or `ray job stop`, unwound by `signals_unwind`
    for name, error in errors.items():
        run_id = start_run(uri, "status", name, {}, {})
        if error is None:
            with run_status(uri, run_id):
                pass
        else:
            with pytest.raises(type(error)), run_status(uri, run_id):
                raise error
        info = client.get_run(run_id).info
        outcomes[name] = info.status
        assert info.end_time is not None and info.end_time >= info.start_time
    assert outcomes == {"ok": "FINISHED", "crash": "FAILED", "exit": "FAILED", "ctrl-c": "KILLED", "kill": "KILLED"}


def test_a_stop_that_ray_carried_as_its_own_exit_ends_the_run_killed(tmp_path):
    """A SIGTERM raised in `ray.get`'s wait comes out of it as SystemExit(1), Ray's: still the job's stop."""
    import signal

    import pytest

    from infra.signals import StoppedBySignal, signals_unwind
    from pipelines.tracking import run_status
    from tests.conftest import signal_self

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "status", "stopped in ray.get", {}, {})
    with pytest.raises(StoppedBySignal), signals_unwind(), run_status(uri, run_id):
        try:
            signal_self(signal.SIGTERM)
        except StoppedBySignal:
            raise SystemExit(1) from None
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_the_caches_a_run_read_are_its_datasets_and_those_left_out_of_the_draw_are_named(tmp_path):
    from pipelines.tracking import log_caches

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "caches", "run", {}, {})
    caches = [str(tmp_path / f"series-raw-{i:016x}") for i in range(3)]
    log_caches(uri, run_id, caches, left_out=caches[1:2])
    client = MlflowClient(uri)
    assert [d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs] == [Path(c).name for c in caches]
    named = Path(client.download_artifacts(run_id, "entries_left_out.txt", str(tmp_path))).read_text()
    assert named == f"{caches[1]}\n"


def test_a_relative_sqlite_uri_is_made_absolute_for_workers_elsewhere(tmp_path, monkeypatch):
    from pipelines.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/env.db"


def test_a_tracking_uri_with_credentials_is_never_printed_logged_or_shown(tmp_path, monkeypatch, capsys):
    """MLFLOW_TRACKING_URI=https://user:token@host (or the config's): the drivers' line, the run's params and
    config.yaml, and what Ray shows (the train loop config's repr, the eval actors' arguments) name the host only."""
    import dataclasses

    from pipelines import tracking
    from pipelines.config import from_dict
    from pipelines.evaluate import EvalConfig, actor_arguments
    from pipelines.train import log_artifacts
    from pipelines.train_config import TrainConfig
    from pipelines.train_loop import WorkerConfig

    secret = "https://alice:s3cretTOKEN@mlflow.example.com:8443/prefix"
    assert tracking.redact(secret) == "https://mlflow.example.com:8443/prefix"
    assert tracking.redact(f"API request to {secret}/api failed: 401") == (  # MLflow's errors name the URL
        "API request to https://mlflow.example.com:8443/prefix/api failed: 401")
    for plain in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "s3://bucket/key@1"):
        assert tracking.redact(plain) == plain
    phase = {"lr": 1e-3, "steps": 1, "global_batch": 1, "micro_batch": 1}
    config = from_dict(TrainConfig, {"name": "t", "model": {"backbone": {"path": "b"}, "projectors": {"image": {}}},
                                     "phase1": phase, "phase2": phase, "caches": ["c"], "scaling": {"workers": 1},
                                     "tracking": {"tracking_uri": secret}})
    store, real = f"sqlite:///{tmp_path / 'mlflow.db'}", tracking.start_run
    monkeypatch.setattr(tracking, "start_run", lambda uri, *args: real(store, *args))  # no server at example.com
    run_id = tracking.start_training_run(secret, config, 1, ["c"], {})
    assert capsys.readouterr().out == f"MLflow run {run_id} at https://mlflow.example.com:8443/prefix\n"
    client = MlflowClient(store)
    assert client.get_run(run_id).data.params["tracking.tracking_uri"] == "https://mlflow.example.com:8443/prefix"
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "adapter.safetensors").write_bytes(b"")
    log_artifacts(store, run_id, config, tmp_path / "out", 1)
    assert "s3cret" not in (Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    fields = {f.name: None for f in dataclasses.fields(WorkerConfig)}
    assert "s3cret" not in repr(WorkerConfig(**{**fields, "tracking_uri": secret})) + repr(config)

    evaluation = EvalConfig(checkpoint="models:/m-1", task="vqa", cache="c", tracking_uri=secret)
    arguments = actor_arguments(evaluation, "c", None)
    assert "s3cret" not in repr(arguments) + repr(evaluation)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "restored after the test")
    arguments["s3"].apply()  # what the actor does first: it then downloads the model from the driver's server
    assert tracking.tracking_uri(arguments.get("tracking_uri")) == secret


def test_a_step_replayed_after_a_restart_plots_its_latest_value():
    from mlflow.entities import Metric

    from pipelines.tracking import latest_per_step

    logged = [Metric("loss", v, t, s) for s, v, t in ((1, 3.0, 10), (2, 2.5, 11), (3, 9.9, 12),  # failed in step 3
                                                      (3, 2.0, 20), (2, 2.5, 19), (4, 1.5, 21))]  # resumed at 1
    assert latest_per_step(logged) == [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.5)]
