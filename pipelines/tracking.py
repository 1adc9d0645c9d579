"""MLflow for training and evaluation runs: where to log, run creation on the driver, batched metric
logging from rank 0, and the loss-curve plot."""

import json
import os
import subprocess
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from tqdm import tqdm

from infra.cli import load_services
from infra.signals import StoppedBySignal, stop_received
from preprocessing.cache.entry import entry_name

from .config import to_dict
from .environment import environment_tags
from .plots import figure, save_figure
from .redaction import redact, redact_mlflow_logs

SERVICES_DIR = Path("runs/services")  # where `modrwkv services up` records what it started
redact_mlflow_logs()  # every process that tracks imports this module: drivers, Ray Train workers, evaluation actors


def tracking_uri(configured: str | None) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the server `modrwkv services up` started, else a
    local sqlite store (no server). A relative sqlite path is made absolute: Ray's workers run in another
    directory, where it would name another (empty) database."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_sqlite(uri)
    server = load_services(SERVICES_DIR).get("mlflow")
    if server is not None and server.alive():
        return server.tracking_uri
    SERVICES_DIR.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{SERVICES_DIR.parent.absolute() / 'mlflow.db'}"  # absolute: workers run elsewhere


def logged_config(config) -> dict:
    """A training config as its run logs it (params, config.yaml): the tracking URI without credentials."""
    data = to_dict(config)
    if data["tracking"]["tracking_uri"]:
        data["tracking"]["tracking_uri"] = redact(data["tracking"]["tracking_uri"])
    return data


def check_reachable_by_workers(uri: str, cluster: str | None) -> None:
    """Workers of a cluster (`cluster`: its address; None when the job starts its own local Ray) reach the tracking
    URI from their own machines (training's rank 0 its metrics, each node its system metrics, evaluation's actors a
    models:/ checkpoint): a store in a file on this machine would be another, empty file there, and their figures
    would be lost without an error (the default file, too, lies in the job's working directory, which Ray's job
    submission copies to a temporary one)."""
    if cluster and (uri.startswith(("sqlite:", "file:", ".")) or Path(uri).is_absolute()):
        raise ValueError(f"the tracking URI {uri} is a store in a file on this machine, which the workers of the Ray "
                         f"cluster at {cluster} cannot reach; give an MLflow server (the config's tracking_uri: "
                         "http://..., or MLFLOW_TRACKING_URI; `modrwkv services up` starts one)")


def absolute_sqlite(uri: str) -> str:
    """`sqlite:///runs/mlflow.db` (relative to here) as `sqlite:////<here>/runs/mlflow.db`; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training view


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created when missing, marked as model training (MLflow 3's UI would otherwise guess
    its kind). With a SQLite store (no server), artifacts go beside the database file; MLflow's default would be
    ./mlruns in whatever folder the job runs in."""
    found = client.get_experiment_by_name(name)
    if found:
        if EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").absolute().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def recorded_run(client, run_id: str):
    """The run a model folder records it was trained in, or None where this server has no such run (the folder was
    trained against another tracking server, or the run was deleted): what it links to is then left out."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        warnings.warn(f"run {run_id} is not on {redact(client.tracking_uri)}: {e.message}")  # once, where two look
        return None


MAX_PARAM, MAX_TAG = 6000, 8000  # MLflow's value lengths (a SQL store's columns refuse longer tags)


def within(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, saying so: a list of caches cut silently read as another, shorter one."""
    if len(value) <= limit:
        return value
    marker = f"... ({len(value)} characters, cut to {limit})"
    return value[: limit - len(marker)] + marker


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> str:
    """Creates the run on the driver (workers that restart after a failure keep logging into it); a run whose params
    cannot be logged ends FAILED, not RUNNING for ever."""
    client = MlflowClient(uri)
    tags = {"mlflow.source.git.commit": git_revision(), **tags}
    run = client.create_run(experiment_id(client, uri, experiment), run_name=run_name,
                            tags={k: within(str(v), MAX_TAG) for k, v in tags.items()})
    items = list(flatten(params).items())
    try:
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            client.log_batch(run.info.run_id, params=[Param(k, within(v, MAX_PARAM)) for k, v in items[i : i + 100]],
                             tags=[RunTag("modrwkv.config", "see params")] if i == 0 else [])
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    return run.info.run_id


def start_training_run(uri: str, config, phase: int, caches: list[str], tags: dict) -> str:
    """A training phase's run, for either driver: the config (as `logged_config` shows it), the phase and the caches
    it resolved as params; prints where the run is."""
    run_name = config.tracking.run_name or f"{config.name}-phase{phase}"
    run_id = start_run(uri, config.tracking.experiment, run_name,
                       {**logged_config(config), "phase": phase, "resolved_caches": caches}, tags)
    print(f"MLflow run {run_id} at {redact(uri)}")
    return run_id


class MetricLogger:
    """Step metrics into one run, a batch a step, sent by MLflow's background logging thread: the step does not
    wait for the tracking server (a batch took 11-40 ms against the local one, 90-110 ms with its CPUs busy,
    `benchmarks/metric_logging.py`, while every other worker waited at the next all-reduce). `flush()` waits until
    every batch has landed; the batches a tracking server's outage lost are counted and said, never raised: a run
    of days must not fail at its last step, before its final checkpoint, for the figures of one minute."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.uri, self.run_id = MlflowClient(uri), uri, run_id
        self.pending, self.lost = [], 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        # the batches landed so far settled and let go, without waiting for any (MLflow retries a request for
        # minutes): a run of 100k steps held every one until its last, and said an outage of its first day then
        flying = []
        for operation in self.pending:
            if all(f.done() for f in operation._operation_futures):
                self.settle(operation)
            else:
                flying.append(operation)
        self.pending = flying
        now = int(time.time() * 1000)
        self.pending.append(self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()], synchronous=False))

    def flush(self) -> int:
        """Waits for every batch logged so far; returns how many of them the run has lost, all told."""
        pending, self.pending = self.pending, []
        for operation in pending:
            self.settle(operation)
        return self.lost

    def settle(self, operation) -> None:
        """Waits for one batch; a failure is counted and said."""
        try:
            operation.wait()
        except Exception as e:  # noqa: BLE001 - the tracking server's failure, not the run's
            self.lost += 1
            print(f"MLflow run {self.run_id}: a batch of step metrics was not logged ({redact(str(e))[:300]})",
                  flush=True)


def log_environment(uri: str, run_id: str, node: str | None) -> None:
    """This machine's CPU and package versions as the run's tags, `env.[<node>.]...`: what its figures can move
    with between machines."""
    tags = environment_tags(f"env.{node}." if node else "env.")
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def system_metrics(uri: str, run_id: str, node: str | None, every_s: float):
    """A started monitor logging this machine's CPU, memory, disk, network and (with nvidia-ml-py and a GPU) GPU
    use into the run as `system/[<node>/]...` every `every_s` seconds, until `finish()` or the run ends. A
    restarted worker continues its step numbers."""
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True, node_id=node,
                                   tracking_uri=uri)
    monitor.start()
    return monitor


class StepProgress:
    """A progress bar on the driver for a run whose workers log `metric` each step: it polls MLflow, the one
    place both sides reach (the workers may run on other machines)."""

    def __init__(self, uri: str, run_id: str, total: int, desc: str, metric: str = "loss", every_s: float = 2.0):
        self.client, self.run_id, self.metric, self.every_s = MlflowClient(uri), run_id, metric, every_s
        self.total, self.desc = total, desc

    def poll(self) -> None:
        try:  # the run's latest value (its whole history, read every 2 s, grew with the run)
            run = self.client.get_run(self.run_id)
        except Exception:  # noqa: BLE001 - a progress bar must never fail the job it reports on
            return
        # the latest values with their steps: RunData keeps the Metric entities it was built from (no public getter)
        last = next((m for m in getattr(run.data, "_metric_objs", ()) if m.key == self.metric), None)
        if last is not None:
            self.bar.update(max(0, min(self.total, last.step)) - self.bar.n)
            self.bar.set_postfix({self.metric: f"{last.value:.4f}"})

    def __enter__(self):
        self.bar = tqdm(total=self.total, desc=self.desc, unit="step")
        self.done = threading.Event()

        def watch():
            while not self.done.wait(self.every_s):
                self.poll()

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(timeout=2)  # a poll takes milliseconds; MLflow retries an unreachable server for minutes
        if not self.thread.is_alive():
            self.poll()
        self.bar.close()  # a late poll from a stuck thread then does nothing: tqdm ignores updates once closed


def log_caches(uri: str, run_id: str, cache_uris: list[str], context: str = "training",
               left_out: list[str] = ()) -> None:
    """Each feature cache as an MLflow dataset input (name = the cache folder, digest = its cache id, source =
    its URI), so the runs table shows which caches a run read and which runs share one; those `left_out` of the
    draw (collection entries smaller than the workers) listed in the run's `entries_left_out.txt`."""
    inputs = []
    for cache in cache_uris:
        name = entry_name(cache)
        with warnings.catch_warnings():  # a local path matches two registered source types, the same class
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(cache)
        dataset = MetaDataset(source, name=name, digest=name.rsplit("-", 1)[-1])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
    MlflowClient(uri).log_inputs(run_id, datasets=inputs)
    if left_out:
        MlflowClient(uri).log_text(run_id, "".join(f"{cache}\n" for cache in left_out), "entries_left_out.txt")


def log_skipped_samples(uri: str, run_id: str, skipped: list[dict]) -> None:
    """The samples training left out, one JSON object a line, as the run's `skipped_samples.jsonl` (none: no file)."""
    if not skipped:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "skipped_samples.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in skipped))
        MlflowClient(uri).log_artifact(run_id, str(path))


@contextmanager
def run_status(uri: str, run_id: str):
    """Ends the run FINISHED when the block completes, KILLED on Ctrl-C or a stop from outside (`kill`, `ray job
    stop`: `signals_unwind`), FAILED on any other exception (which propagates), each with its end time, so the runs
    table can be filtered by outcome."""
    client = MlflowClient(uri)
    try:
        yield
    except BaseException as e:
        stopped = isinstance(e, (KeyboardInterrupt, StoppedBySignal)) or stop_received()  # Ray's SystemExit(1) too
        client.set_terminated(run_id, "KILLED" if stopped else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def latest_per_step(history) -> list[tuple[int, float]]:
    """(step, value) of a metric's history, the last value logged at each step: the steps a run replays after a
    Ray Train restart from its last checkpoint are logged twice, and the replay's values are the run's."""
    return sorted({m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}.items())


def loss_curve(history: list[tuple[int, float]], path: Path, title: str) -> Path:
    fig = figure(figsize=(6, 3.5))
    ax = fig.subplots()
    steps, losses = zip(*history) if history else ((), ())
    ax.plot(steps, losses)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
