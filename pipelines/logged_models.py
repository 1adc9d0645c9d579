"""Trained ModRWKVs as MLflow logged models: each phase's final model belongs to its training run (with its step, the
feature caches it trained on and, once `modrwkv eval` scored it, its metrics); the registry holds the versions to
ship; `models:/...` names one wherever a model folder is taken.

A logged model is a pyfunc (`pipelines/serving.py`, built from code: nothing pickled) whose artifacts are the model
folder and the frozen encoders its caches came from, so `mlflow models serve` encodes media as training did.
"""

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from preprocessing.cache.entry import entry_name

MODEL_TYPE = "modrwkv"
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
MODEL_ARTIFACT = "model"
ENCODER_ARTIFACT = "encoder_{}"  # one per modality
PHASE_TAG, FOLDER_TAG = "modrwkv.phase", "modrwkv.model_dir"


def log_trained_model(uri: str, run_id: str, model_dir: Path, phase: int, step: int, caches: list,
                      encoder_dirs: dict[str, str], published: str | None = None) -> str:
    """Logs `model_dir` as a logged model of the run at `step`, with the encoders when it holds every weight (an
    adapter-only folder, phase I's, finds its backbone by path: it is compared and evaluated, not served, and its
    copy of the encoders would only fill the artifact store). Each cache (FeatureCache) is one of its datasets,
    through a `samples/<cache>` metric, its sample count (MLflow links a model to datasets by its metrics, one name
    per dataset). `published`: where users find the folder (an s3:// output's URI), which `model_id_of` matches;
    default: `model_dir` itself. Returns the model id."""
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.models import Model

    from modrwkv.model_folder import ADAPTER_FILE

    if (Path(model_dir) / ADAPTER_FILE).is_file():
        encoder_dirs = {}
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=logged_model_name(run.info.run_name), source_run_id=run_id,
        params=run.data.params, model_type=MODEL_TYPE,
        tags={PHASE_TAG: str(phase), FOLDER_TAG: published or str(Path(model_dir).absolute()),
              "modrwkv.encoders": json.dumps(sorted(encoder_dirs))})
    artifacts = {MODEL_ARTIFACT: str(model_dir),
                 **{ENCODER_ARTIFACT.format(m): str(d) for m, d in encoder_dirs.items()}}
    with fluent_tracking_uri(uri):  # Model.log writes through the fluent client
        Model.log(None, mlflow.pyfunc, name="model", run_id=run_id, model_id=model.model_id, step=step,
                  python_model=str(SERVED_MODEL_CODE), artifacts=artifacts,
                  # the environment is this project's (serve with --env-manager local); no requirement inference,
                  # which would load the model in a subprocess
                  pip_requirements=[f"modrwkv=={version('modrwkv')}"])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        Metric(f"samples/{entry_name(cache.uri)}", float(cache.manifest["counts"]["written"]), now, step,
               model_id=model.model_id,
               dataset_name=entry_name(cache.uri), dataset_digest=cache_digest(cache.uri)) for cache in caches])
    return model.model_id


def check_registered_name(name: str | None) -> None:
    """A registry name, refused at config load rather than after training: MLflow refuses / and :, and `@` would
    read as an alias in models:/NAME@alias."""
    if name is not None and (not name.strip() or any(c in name for c in "/:@")):
        raise ValueError(f"register_as {name!r}: a registered model's name is non-empty, without '/', ':' or '@'")


def logged_model_name(run_name: str | None) -> str:
    """`<run name>-model`, with what MLflow refuses in a logged model's name (/ : . % and quotes: run names such as
    "modrwkv-vision-1.5b-phase1" have them) as "-"."""
    return re.sub(r"[/:.%\"']", "-", f"{run_name or 'modrwkv'}-model")


@contextmanager
def fluent_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to `uri` for the block (some calls look nowhere else), then both
    places it lives restored as they were: MLflow's setting and MLFLOW_TRACKING_URI, which setting it overwrites."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # MLflow's own scoped setter

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def cache_digest(uri: str) -> str:
    return entry_name(uri).rsplit("-", 1)[-1]  # as `tracking.log_caches` names the run's dataset inputs


def encoder_dirs(caches: list, recorded: dict[str, dict]) -> dict[str, str]:
    """modality -> the encoder folder its caches were encoded with (from the cache manifest's config), for each
    modality the model records an encoder of (`encoder_store_keys`) whose folder is still there with the recorded
    weights; the others are left out with a note (serving that modality then needs the folder given)."""
    from preprocessing import storage
    from preprocessing.cache.key import hash_model_dir
    from preprocessing.local_copy import local_copy

    found = {}
    for cache in caches:
        key = recorded.get(cache.modality)
        folder = ((cache.manifest.get("config") or {}).get("encoder") or {}).get("model_dir")
        if cache.modality in found or not key or not folder:
            continue
        if storage.is_remote(folder) and storage.list_files(folder):
            folder = local_copy(folder)  # logged from this node's copy
        if Path(folder).is_dir() and hash_model_dir(folder) == key.get("weights_hash"):
            found[cache.modality] = str(Path(folder).absolute())
        else:
            print(f"note: the {cache.modality} encoder {folder} is gone or holds other weights; the logged model "
                  f"carries no {cache.modality} encoder")
    return found


def register(uri: str, model_id: str, name: str, tags: dict[str, str] | None = None) -> int:
    """A new version of the registered model `name` (created when missing) holding the logged model, unless one
    already holds it; returns its number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    held = [v for v in client.search_model_versions(f"source_path = 'models:/{model_id}'") if v.name == name]
    if held:
        return int(held[0].version)
    model = client.get_logged_model(model_id)
    with fluent_tracking_uri(uri):  # the registry looks the logged model up through the fluent client
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=model.source_run_id,
                                              tags=tags, model_id=model_id)
    print(f"registered {name} version {version.version} (logged model {model_id})")
    return int(version.version)


def model_id_of(uri: str, reference: str) -> str | None:
    """The logged model a checkpoint reference names: `models:/<id>`, `models:/NAME/VERSION` (or `latest`),
    `models:/NAME@alias`, or a folder a training run logged (found by its run and folder tags); None when it names no
    logged model."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if str(reference).startswith("models:/"):
        name = str(reference).removeprefix("models:/")
        if "@" in name:
            source = client.get_model_version_by_alias(*name.split("@", 1)).source
        elif "/" in name:
            name, version = name.split("/", 1)
            if version.lower() == "latest":  # as MLflow reads models:/NAME/latest: the newest version
                newest = client.search_model_versions(f"name = '{name}'", max_results=1,
                                                      order_by=["version_number DESC"])
                if not newest:
                    raise ValueError(f"{reference}: no version of {name!r} is registered")
                version = newest[0].version
            source = client.get_model_version(name, version).source
        elif name.startswith("m-"):  # a logged model's own id
            return name
        else:
            raise ValueError(f"{reference}: a registered model needs its version or alias: models:/{name}/VERSION, "
                             f"models:/{name}/latest or models:/{name}@ALIAS (or give a logged model's models:/m-...)")
        return source.removeprefix("models:/") if source.startswith("models:/m-") else None
    from modrwkv.model_folder import read_backbone_source
    from preprocessing.local_copy import local_copy

    from .caches import absolute
    from .tracking import recorded_run

    run_id = (read_backbone_source(local_copy(reference)) or {}).get("run_id")
    run = run_id and recorded_run(client, run_id)
    if not run:
        return None
    experiment = run.info.experiment_id
    folder = absolute(reference)
    found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    matches = [m for m in found if m.tags.get(FOLDER_TAG) == folder]
    return max(matches, key=lambda m: m.creation_timestamp).model_id if matches else None


def eval_metrics(metrics: dict[str, float], model_id: str | None, cache_uri: str) -> list:
    """An evaluation's metrics as MLflow records, on the model they scored when it is a logged one, with the
    evaluation cache as their dataset."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0, model_id=model_id, dataset_name=entry_name(cache_uri),
                   dataset_digest=cache_digest(cache_uri)) for k, v in metrics.items()]


def link_eval(uri: str, eval_run_id: str, model_id: str, metrics: dict[str, float], cache_uri: str) -> None:
    """The scored model as the eval run's input (the run names it) and each registered version of it tagged with
    the scores, `eval.<cache>.<metric>`."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelInput

    client = MlflowClient(uri)
    client.log_inputs(eval_run_id, models=[LoggedModelInput(model_id)])
    client.set_tag(eval_run_id, "modrwkv.model_id", model_id)
    for registered in client.search_model_versions(f"source_path = 'models:/{model_id}'"):
        for k, v in metrics.items():
            client.set_model_version_tag(registered.name, registered.version, f"eval.{entry_name(cache_uri)}.{k}",
                                         f"{v:.6g}")


@dataclass
class LocalModel:
    model_dir: Path  # what ModRWKV.from_pretrained takes
    encoder_dirs: dict[str, str] = field(default_factory=dict)  # modality -> encoder folder, when the model has them


def local_model(reference: str, configured_uri: str | None = None) -> LocalModel:
    """A model folder as it is (this node's copy of an s3:// one), or a logged or registered model (`models:/<id>`,
    `models:/NAME/VERSION`, `models:/NAME@alias`; from the tracking server `configured_uri`, else the usual one)
    downloaded once a node, as a local copy of `models:/<id>` (`preprocessing/local_copy.py`), with the encoders it
    carries."""
    from preprocessing.local_copy import local_copy, node_copy

    if not str(reference).startswith("models:/"):
        return LocalModel(Path(local_copy(reference)))
    import mlflow
    from mlflow.models import Model

    from .tracking import tracking_uri

    uri = tracking_uri(configured_uri)
    model_id = model_id_of(uri, reference)
    if model_id is None:
        raise ValueError(f"{reference}: a model version registered from files, not from a ModRWKV logged model")

    def download(incoming: Path) -> None:
        incoming.mkdir()
        with fluent_tracking_uri(uri):
            mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(incoming))

    # a logged model never changes: its id is its version
    target = node_copy(f"models:/{model_id}", "model", {"model_id": model_id}, download)
    artifacts = Model.load(str(target)).flavors["python_function"].get("artifacts", {})
    paths = {name: target / spec["path"] for name, spec in artifacts.items()}
    if MODEL_ARTIFACT not in paths:
        raise ValueError(f"{reference}: not a ModRWKV logged model (its artifacts are {sorted(paths)})")
    prefix = ENCODER_ARTIFACT.format("")
    encoders = {name.removeprefix(prefix): str(p) for name, p in paths.items() if name.startswith(prefix)}
    return LocalModel(paths[MODEL_ARTIFACT], encoders)
