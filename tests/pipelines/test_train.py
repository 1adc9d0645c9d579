"""`modrwkv train` on CPU: 2 Ray Train workers, DeepSpeed ZeRO-2, the digits-VQA feature cache, MLflow."""

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from infra.local_ray import init_ray
from infra.signals import StoppedBySignal, signals_unwind
from modrwkv import RWKV7Config
from modrwkv.model_folder import read_encoders_record
from pipelines.config import from_dict
from pipelines.environment import cpu_description
from pipelines.metrics.ceilings import cache_samples
from pipelines.train import WORKER_ENV, TrainConfig, run_train, worker_env
from pipelines.train_setup import WHITEN_EPS, feature_stats, stats_shares
from preprocessing.cache.entry import FeatureCache
from tests.conftest import random_backbone
from tests.tiny_models import tiny_digits_cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("train")
    cache = tiny_digits_cache(root, "train", 64, shard_size=8)
    random_backbone(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)).save_pretrained(root / "backbone")
    return root, cache


@pytest.fixture(scope="module")
def mixed_cache(setup, tmp_path_factory) -> str:
    """LLaVA's mixed data (digits, text-only conversations, 3 over-long samples), encoded by setup's CLIP."""
    from tests.mixed_llava import mixed_llava_cache

    return mixed_llava_cache(tmp_path_factory.mktemp("mixed"), setup[0] / "clip")


def train_config(root: Path, cache: str, name: str, **phase1) -> TrainConfig:
    """Packed (the default) in rows of 64 tokens, about two digits samples each."""
    return from_dict(TrainConfig, {
        "name": name, "caches": [cache], "output_dir": str(root / "runs"), "max_length": 64, "pack_buffer": 16,
        "model": {"backbone": {"path": str(root / "backbone")}, "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2}}},
        "phase1": {"lr": 3e-3, "steps": 8, "global_batch": 16, "micro_batch": 4, **phase1},
        "phase2": {"lr": 1e-3, "steps": 4, "global_batch": 16, "micro_batch": 4},
        "scaling": {"workers": 2}, "deepspeed": {"zero_stage": 2},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "test-train",
                     "system_metrics_every_s": 1.0}})


def losses(client, run_id):
    return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_phase1_then_phase2_with_mlflow(setup):
    root, cache = setup
    config = train_config(root, cache, "digits", checkpoint_every=4)
    config.tracking.log_checkpoints = True  # phase I's step-4 checkpoint a logged model too
    one = run_train(config, phase=1)
    client = MlflowClient(config.tracking.tracking_uri)
    history = losses(client, one.run_id)
    assert len(history) == 8 and sum(history[-3:]) < sum(history[:3])

    # the engine's final checkpoint holds what phase I trains, exactly the adapter saved, and not the frozen
    # backbone (rebuilt from backbone_path on resume)
    states = (root / "runs" / "digits" / "phase1" / "ray").rglob("mp_rank_00_model_states.pt")
    module = torch.load(max(states, key=lambda p: p.stat().st_mtime), weights_only=True, map_location="cpu")["module"]
    adapter = load_file(one.model_dir / "adapter.safetensors")
    assert set(module) == set(adapter) and all(torch.equal(module[k], v) for k, v in adapter.items())
    assert not (one.model_dir / "model.safetensors").exists()
    # the projector whitens with the training features' statistics, computed by the driver: mean and ZCA matrix
    items = np.concatenate([s.items[0] for s in cache_samples(cache)]).astype(np.float64)
    stats = feature_stats([FeatureCache(cache)], {"image": "whiten"})["image"]
    eigenvalues, vectors = np.linalg.eigh(np.cov(items, rowvar=False, bias=True))
    eigenvalues = np.maximum(eigenvalues, 0) + WHITEN_EPS * eigenvalues.mean()
    assert np.allclose(stats["mean"], items.mean(0), atol=1e-6)
    assert np.allclose(stats["whitening"], (vectors / np.sqrt(eigenvalues)) @ vectors.T, atol=1e-4)
    standardized = feature_stats([FeatureCache(cache)], {"image": "standardize"})["image"]
    assert np.allclose(standardized["std"], items.std(0), atol=1e-5) and "whitening" not in standardized
    adapter = load_file(one.model_dir / "adapter.safetensors")
    saved = adapter["projectors.image.feature_whitening"].double()
    assert torch.allclose(saved, torch.tensor(stats["whitening"], dtype=torch.float64), atol=1e-4)

    config.packing = False  # phase II right-padded: both layouts train
    config.tracking.register_as = "digits-tiny"
    two = run_train(config, phase=2)
    history2 = losses(client, two.run_id)
    assert len(history2) == 4 and history2[-1] < history2[0]
    assert (two.model_dir / "model.safetensors").is_file()
    # inference encodes media as these caches were: the encoder's kind, settings and weights, recorded beside it
    recorded = read_encoders_record(two.model_dir)["image"]
    store = FeatureCache(cache).manifest["store"]
    assert recorded == {k: store.get(k) for k in ("kind", "dtype", "image_size", "layer", "weights_hash", "revision",
                                                  "precision", "lookback")}
    assert recorded["kind"] == "clip" and len(recorded["weights_hash"]) == 64

    run = client.get_run(two.run_id)
    assert run.data.tags["phase1_run_id"] == one.run_id and run.data.tags["phase"] == "2"
    assert run.data.params["phase2.lr"] == "0.001" and run.data.params["deepspeed.zero_stage"] == "2"
    assert cache.split("/")[-1] in run.data.tags["feature_cache_ids"]
    assert len(run.data.tags["mlflow.source.git.commit"]) in (40, len("unknown"))
    assert run.data.tags["env.torch"] == torch.__version__ and run.data.tags["env.cpu"] == cpu_description()
    for metric in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_s", "padding_fraction"):
        assert len(client.get_metric_history(two.run_id, metric)) == 4
    # the digits samples are all of one length: no padding; packed, rows of 64 hold two with some room left
    assert {m.value for m in client.get_metric_history(two.run_id, "padding_fraction")} == {0.0}
    packed = client.get_metric_history(one.run_id, "padding_fraction")
    assert len(packed) == 8 and all(0 < m.value < 0.5 for m in packed)
    for metric in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert client.get_metric_history(two.run_id, metric)  # one monitor on this one machine, no node prefix
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(two.run_id)}
    assert {"config.yaml", "loss_curve.png", "adapter"} <= artifacts
    for result, steps in ((one, [4, 8]), (two, [4])):  # each phase's final model a logged model of its run, at
        # its last step; phase I's kept checkpoint too
        found = client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = '{result.run_id}'")
        by_step = {next(iter({m.step for m in model.metrics})): model.model_id for model in found}
        assert sorted(by_step) == steps and by_step[steps[-1]] == result.model_id
    (version,) = client.search_model_versions("name = 'digits-tiny'")  # phase II's, registered by the driver
    assert version.source == f"models:/{two.model_id}"
    files = {a.path for a in client.list_artifacts(two.run_id) if a.path.startswith("model")}
    assert not files  # the folder lives in the logged model, not again among the run's artifacts
    for finished in (one.run_id, two.run_id):
        info = client.get_run(finished).info
        assert info.status == "FINISHED" and info.end_time is not None
        (used,) = client.get_run(finished).inputs.dataset_inputs  # the cache, as an MLflow dataset input
        assert used.dataset.name == cache.split("/")[-1] and used.dataset.digest == cache.split("-")[-1]
        assert cache in used.dataset.source and used.tags[0].value == "training"
    found = client.search_runs([run.info.experiment_id], "tags.phase = '1'")
    assert [r.info.run_id for r in found] == [one.run_id]


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # it exited meanwhile
        return ""


def registered_a_checkpoint(storage: Path) -> bool:
    """Whether Ray's controller has registered a checkpoint: its snapshot lists one (one being rewritten, which Ray
    truncates then writes, reads as not yet)."""
    for snapshot in storage.rglob("checkpoint_manager_snapshot.json"):
        try:
            return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
        except ValueError:
            return False
    return False


def first_checkpoint_registered(storage: Path, give_up: threading.Event) -> bool:
    """Waits until Ray's controller has registered a checkpoint; False where `give_up` is set first, or 600 s pass."""
    deadline = time.monotonic() + 600
    while not registered_a_checkpoint(storage):
        if give_up.wait(0.2) or time.monotonic() > deadline:
            return False
    return True


def train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this test's Ray instance (started by this process: they descend from it)."""
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in command_line(p)]


def kill_a_worker_after_first_checkpoint(storage: Path, killed: list):
    """Waits until Ray's controller has registered a checkpoint, then kills a worker of this test's Ray instance,
    never another job's; none if no checkpoint comes."""
    if not first_checkpoint_registered(storage, threading.Event()):
        return
    workers = train_workers()
    if workers:
        allocator = {k: workers[0].environ().get(k) for k in WORKER_ENV}
        workers[0].kill()
        killed.append((workers[0].pid, allocator))


@pytest.mark.slow
def test_training_resumes_after_a_worker_is_killed(setup, mixed_cache):
    root, _ = setup
    cache = mixed_cache  # with over-long samples: those left out before the failure stay named after it
    config = train_config(root, cache, "fault", steps=12, checkpoint_every=3)
    config.deepspeed.zero_stage = 1  # its text-only samples: ZeRO-2 is refused (`check_reduction_order`)
    config.scaling.max_failures = 1
    killed = []
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint,
                               args=(root / "runs" / "fault" / "phase1" / "ray", killed))
    watcher.start()
    result = run_train(config, phase=1)
    watcher.join()
    (pid, allocator), = killed
    assert not psutil.pid_exists(pid)
    assert allocator == worker_env()  # the workers keep large blocks in one heap (or as a user sets it)
    assert result.metrics["step"] == 12
    client = MlflowClient(config.tracking.tracking_uri)
    resumed = client.get_metric_history(result.run_id, "resumed_from_step")
    assert resumed and resumed[0].value % 3 == 0 and 3 <= resumed[0].value < 12
    assert max(m.step for m in client.get_metric_history(result.run_id, "loss")) == 12
    # the data position is saved with each checkpoint and restored from it (not replayed): where each rank's
    # stream stands after 12 steps x 2 micro-batches of 4 packed rows
    last = sorted((root / "runs" / "fault" / "phase1" / "ray").rglob("mp_rank_00_model_states.pt"))
    state = torch.load(max(last, key=lambda p: p.stat().st_mtime), weights_only=True, map_location="cpu")
    assert state["step"] == 12 and len(state["data_positions"]) == 2
    assert state["module"] and not any(k.startswith("backbone.") for k in state["module"])  # frozen: not saved
    expected = [stream_after(config, cache, 24, rank, 2) for rank in (0, 1)]
    assert state["data_positions"] == [position for position, _ in expected]
    # every over-long sample drawn named once, at its step, those of the steps before the failure too
    artifact = Path(client.download_artifacts(result.run_id, "skipped_samples.jsonl", str(root / "fault")))
    named = [json.loads(line) for line in artifact.read_text().splitlines()]
    assert named == [{**s, "rank": rank} for rank, (_, skipped) in enumerate(expected) for s in skipped]
    assert len(named) >= 10 and client.get_metric_history(result.run_id, "skipped_over_length")[-1].value == len(named)


@pytest.mark.slow
def test_a_run_that_fails_for_good_names_its_skipped_samples(setup, mixed_cache):
    """No restart left: the run ends FAILED, and the samples left out up to the last checkpoint Ray registered are
    named in it, those the stream drew up to that step (a worker killed between its save and Ray's record of it
    named later ones before)."""
    from ray.train import Result, TrainingFailedError

    root, _ = setup
    config = train_config(root, mixed_cache, "failed", steps=12, checkpoint_every=3)
    config.deepspeed.zero_stage = 1  # its text-only samples: ZeRO-2 is refused (`check_reduction_order`)
    config.scaling.max_failures = 0
    killed = []
    storage = root / "runs" / "failed" / "phase1" / "ray"
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(storage, killed))
    watcher.start()
    with pytest.raises(TrainingFailedError):
        run_train(config, phase=1)
    watcher.join()
    assert killed
    client = MlflowClient(config.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id],
                                "tags.mlflow.runName LIKE 'failed%'")
    assert run.info.status == "FAILED"
    (ray_run,) = storage.glob("failed-phase1-*")
    step = Result.from_path(str(ray_run)).checkpoint.get_metadata()["step"]
    expected = [stream_after(config, mixed_cache, 2 * step, rank, 2) for rank in (0, 1)]
    artifact = Path(client.download_artifacts(run.info.run_id, "skipped_samples.jsonl", str(root / "failed")))
    named = [json.loads(line) for line in artifact.read_text().splitlines()]
    assert named and named == [{**s, "rank": rank} for rank, (_, skipped) in enumerate(expected) for s in skipped]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_during_training_stops_its_workers_and_ends_the_run_killed(setup, signum):
    """Ctrl-C, or SIGTERM (`kill`, `ray job stop`), during `modrwkv train`'s `fit`. Ray Train's `fit` takes Ctrl-C for
    itself (it aborts the run, then exits 1) and leaves its handler installed: the run ended FAILED, and a later
    Ctrl-C called the finished run's controller. A SIGTERM's exit, raised in Ray's wait for the run, came out of
    `fit` as SystemExit(1) (Ray's), or as Ray's own SIGTERM handler's exit (15: `ray.init` installs it), and the run
    ended FAILED. Now both abort Ray's run, end the MLflow run KILLED and leave the process as outside `fit`:
    KeyboardInterrupt, or exit status 143."""
    root, cache = setup
    name = f"stopped-{signum.name.lower()}"
    config = train_config(root, cache, name, steps=60, checkpoint_every=3)  # far from done when stopped
    storage = root / "runs" / name / "phase1" / "ray"
    stop_waiting = threading.Event()

    def signal_after_first_checkpoint():
        if first_checkpoint_registered(storage, stop_waiting):
            os.kill(os.getpid(), signum)

    watcher = threading.Thread(target=signal_after_first_checkpoint)
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signum, lambda *_: None)  # a late one (a run ended otherwise) must not stop the tests
    try:
        handlers = {s: signal.getsignal(s) for s in handlers_before}
        with (pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else StoppedBySignal) as raised,
              signals_unwind()):  # as `modrwkv train` runs it
            init_ray(ignore_reinit_error=True)  # `run_train`'s, Ray being up already here: it took SIGTERM
            watcher.start()
            run_train(config, phase=1)
        assert {s: signal.getsignal(s) for s in handlers} == handlers  # Ray's SIGINT handler gone, no other left
        assert signum == signal.SIGINT or raised.value.code == 128 + signal.SIGTERM
    finally:
        stop_waiting.set()
        if watcher.ident:
            watcher.join()
        for s, handler in handlers_before.items():
            signal.signal(s, handler)
    client = MlflowClient(config.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id],
                                f"tags.mlflow.runName LIKE '{name}%'")
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) < 60
    gone_by = time.monotonic() + 60  # Ray's abort stopped the workers
    while train_workers() and time.monotonic() < gone_by:
        time.sleep(0.5)
    assert not train_workers()


def test_a_run_that_fails_raises_its_own_error_and_names_the_samples_of_the_checkpoint_it_resumed(setup, monkeypatch,
                                                                                                   capsys):
    """Naming the skipped samples when `fit` fails must not hide why it failed (an S3 or MLflow error raised in its
    place); and a resumed run that fails before its first checkpoint names those of the one it resumed."""
    from ray.train import Checkpoint

    import pipelines.train as train

    root, cache = setup

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise RuntimeError("worker died")

    def storage_down(*args, **kwargs):
        raise OSError("S3 unreachable")

    monkeypatch.setattr(train, "TorchTrainer", Failing)
    monkeypatch.setattr(train.Result, "from_path", storage_down)
    with pytest.raises(RuntimeError, match="worker died"):
        run_train(train_config(root, cache, "hidden"), phase=1)
    assert "could not be named in the run: S3 unreachable" in capsys.readouterr().err

    monkeypatch.undo()
    resumed = root / "resumed"
    resumed.mkdir()
    Checkpoint(str(resumed)).set_metadata({"skipped_samples": [{"key": "long-0", "reason": "over_length", "rank": 1}]})
    assert train.registered_checkpoint(str(root / "no-ray-run-yet"), None, Checkpoint(str(resumed))).get_metadata()[
        "skipped_samples"] == [{"key": "long-0", "reason": "over_length", "rank": 1}]
    assert train.registered_checkpoint(str(root / "no-ray-run-yet"), None, None) is None


def test_a_job_joining_a_cluster_refuses_a_tracking_store_in_a_local_file(setup, monkeypatch):
    """On a cluster, rank 0 and every node's monitor log from their own machines: a SQLite file on the driver's
    would be a different, empty database there. The job stops before it starts a run; a server URI passes."""
    from pipelines.tracking import check_reachable_by_workers

    root, cache = setup
    config = train_config(root, cache, "joining")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` gives the entrypoint
    with pytest.raises(ValueError, match="cannot reach; give an MLflow server"):
        run_train(config, phase=1)
    client = MlflowClient(config.tracking.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "attributes.run_name = 'joining-phase1'")
    for local in ("sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "./mlruns"):
        with pytest.raises(ValueError, match="store in a file on this machine"):
            check_reachable_by_workers(local, "ray://head:10001")
        check_reachable_by_workers(local, None)  # a local Ray of its own: the workers share this machine
    for server in ("http://10.0.0.1:5000", "https://mlflow.example.com", "databricks"):
        check_reachable_by_workers(server, "ray://head:10001")


def test_a_users_allocator_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert worker_env() == {**WORKER_ENV, "MALLOC_ARENA_MAX": "4"} != WORKER_ENV


def stream_after(config: TrainConfig, cache: str, micro_batches: int, rank: int, world: int) -> tuple[dict, list]:
    """A fresh data stream's position after `micro_batches` of the phase I run's, and the over-long samples it
    left out on the way, by optimizer step."""
    from modrwkv.batching import Collator
    from modrwkv.tokenizer import WorldTokenizer
    from pipelines.train_setup import model_config
    from pipelines.trainer import MicroBatches, accumulation_steps

    model = model_config(config, RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16),
                         [FeatureCache(cache)])
    collator = Collator(WorldTokenizer(), model, config.max_length, skip_bad_samples=True)
    stream = MicroBatches([FeatureCache(cache)], collator, config.phase1.micro_batch, rank, world, config.seed,
                          pack_buffer=config.pack_buffer)
    batches = [next(stream)[1] for _ in range(micro_batches)]
    assert sum(len(b.sample_ids) for b in batches) > micro_batches * config.phase1.micro_batch  # rows hold several
    accumulation = accumulation_steps(config.phase1, world)
    return stream.position(), [{**s, "step": i // accumulation + 1} for i, b in enumerate(batches) for s in b.skipped]


def test_backbone_config_from_an_rwkv_lm_pth_or_a_folder(tmp_path):
    """A train config may name an RWKV-LM .pth (sizes read from the weights' shapes) or a saved folder."""
    from modrwkv.checkpoint import read_config

    config = RWKV7Config(vocab_size=128, n_layer=3, n_embd=64, head_size=16)
    backbone = random_backbone(config)
    torch.save(backbone.state_dict(), tmp_path / "model.pth")
    backbone.save_pretrained(tmp_path / "folder")
    assert read_config(tmp_path / "model.pth") == config
    assert read_config(tmp_path / "folder") == config


def test_cache_shapes_pass_over_text_only_samples_and_empty_shards(tmp_path):
    from modrwkv.conversation import Turn
    from modrwkv.conversation import Sample
    from pipelines.train_setup import cache_shapes
    from tests.cache_entries import write_entry

    turns = [Turn("user", "Say yes."), Turn("assistant", "yes")]
    text = Sample("t0", "image", turns)
    image = Sample("i0", "image", turns, items=[np.zeros((5, 12), np.float16)])
    for name, shards in (("mixed", [[text], [], [image]]), ("text", [[text]])):
        write_entry(str(tmp_path / name), shards)
    assert cache_shapes([FeatureCache(tmp_path / "mixed")]) == ({"image": 12}, 0, 0)
    with pytest.raises(ValueError, match="no sample holds image features"):
        cache_shapes([FeatureCache(tmp_path / "text")])


def test_the_model_records_the_encoder_settings_its_caches_agree_on_and_names_the_others(tmp_path, capsys):
    from modrwkv.conversation import Sample
    from modrwkv.conversation import Turn
    from modrwkv.model_folder import write_records
    from pipelines.config import ConfigError
    from pipelines.train_setup import check_feature_spaces, encoder_store_keys
    from tests.cache_entries import write_entry

    sample = Sample("i0", "image", [Turn("user", "<image>\nSay yes."), Turn("assistant", "yes")],
                    items=[np.zeros((5, 12), np.float16)])
    dinov2 = {"modality": "image", "kind": "dinov2", "layer": 8, "image_size": 224}
    for name, encoder in (("a", dinov2), ("b", dinov2), ("c", {**dinov2, "image_size": 448}), ("d", None)):
        write_entry(str(tmp_path / name), [[sample]], encoder=encoder)
    opened = {name: FeatureCache(tmp_path / name) for name in "abcd"}
    assert encoder_store_keys([opened["a"], opened["b"]]) == {"image": dinov2}
    write_entry(str(tmp_path / "limits"), [[sample]], encoder={**dinov2, "limits": {"max_image_pixels": 4}})
    assert encoder_store_keys([opened["a"], FeatureCache(tmp_path / "limits")])["image"].get("differing") is None
    mixed = encoder_store_keys([opened["a"], opened["c"]])
    assert mixed == {"image": {"modality": "image", "kind": "dinov2", "layer": 8, "differing": ["image_size"]}}
    assert "different encoder settings (image_size)" in capsys.readouterr().out
    # phase I trained on both sizes: phase II's caches are still checked against its encoder
    (tmp_path / "phase1").mkdir()
    write_records(tmp_path / "phase1", encoders=mixed)
    write_entry(str(tmp_path / "layer6"), [[sample]], encoder={**dinov2, "layer": 6})
    check_feature_spaces([opened["c"]], tmp_path / "phase1", "phase1")
    with pytest.raises(ConfigError, match="those of phase I's model phase1 from"):
        check_feature_spaces([FeatureCache(tmp_path / "layer6")], tmp_path / "phase1", "phase1")
    # a cache written by other code records no encoder: nothing to record, and training goes on
    assert encoder_store_keys([opened["d"]]) == {} and "records no encoder settings" in capsys.readouterr().out
    assert encoder_store_keys([opened["a"], opened["d"]]) == {}

    # series: the windows' lookback recorded when every cache agrees on one; caches of two lookbacks keep the encoder
    def series_cache(lookback: int):
        return SimpleNamespace(modality="series", manifest={"store": {"modality": "series", "kind": "raw"},
                                                            "dataset": {"lookback": lookback}})

    assert encoder_store_keys([series_cache(96), series_cache(96)])["series"] == {
        "modality": "series", "kind": "raw", "lookback": 96}
    assert encoder_store_keys([series_cache(96), series_cache(512)])["series"]["lookback"] is None


def test_caches_from_other_encoders_than_each_other_or_phase_ones_are_refused(tmp_path):
    """Another layer, other weights or another revision of our code's features (WavLM's 2 and 3 feed the encoder
    differently scaled samples): another feature space, which the one adapter of a modality cannot read beside the
    first (however alike the widths); another image size is one space."""
    from modrwkv.conversation import Sample, Turn
    from modrwkv.model_folder import ENCODERS_FILE
    from pipelines.config import ConfigError
    from pipelines.train_setup import check_feature_spaces
    from tests.cache_entries import write_entry

    sample = Sample("i0", "image", [Turn("user", "<image>\nSay yes."), Turn("assistant", "yes")],
                    items=[np.zeros((5, 12), np.float16)])
    dinov2 = {"modality": "image", "kind": "dinov2", "layer": 8, "weights_hash": "a" * 64, "image_size": 224,
              "revision": 2}
    encoders = {"a": dinov2, "size": {**dinov2, "image_size": 448}, "layer": {**dinov2, "layer": 6},
                "weights": {**dinov2, "weights_hash": "b" * 64}, "revision": {**dinov2, "revision": 3}, "other": None}
    for name, encoder in encoders.items():
        write_entry(str(tmp_path / name), [[sample]], encoder=encoder)
    opened = {name: FeatureCache(tmp_path / name) for name in encoders}
    check_feature_spaces([opened["a"], opened["size"], opened["other"]], None, None)
    for name in ("layer", "weights", "revision"):
        with pytest.raises(ConfigError, match=f"{opened[name].uri}: its image features come from .*, those of "
                                              f"{opened['a'].uri} from"):
            check_feature_spaces([opened["a"], opened[name]], None, None)
    (tmp_path / "phase1").mkdir()  # phase II: against the encoder phase I's adapter learnt
    (tmp_path / "phase1" / ENCODERS_FILE).write_text(json.dumps({"image": encoders["layer"]}))
    with pytest.raises(ConfigError, match=f"{opened['a'].uri}: .*, those of phase I's model uri-of-phase1 from"):
        check_feature_spaces([opened["a"]], tmp_path / "phase1", "uri-of-phase1")
    check_feature_spaces([opened["layer"]], tmp_path / "phase1", "uri-of-phase1")


def test_feature_stats_come_from_samples_spread_over_shards_and_over_the_modalitys_caches(tmp_path):
    """40 shards of 8 vectors whose values are their shard's number, a budget of about 64 vectors: the samples of 8
    shards spread from the first to the last (no more shards read than the budget needs), not the first 8 shards'
    (mean 3.5); a second cache of 10s as large shares the budget by samples, not left out once the first has
    filled it."""
    from modrwkv.conversation import Sample, Turn
    from tests.cache_entries import write_entry

    turns = [Turn("user", "<image>"), Turn("assistant", "yes")]

    def shards(n: int, value, prefix: str) -> list[list[Sample]]:
        return [[Sample(f"{prefix}{i}-{j}", "image", turns, items=[np.full((4, 2), value(i), np.float16)])
                 for j in range(2)] for i in range(n)]

    write_entry(str(tmp_path / "counting"), shards(40, lambda i: i, "c"))
    write_entry(str(tmp_path / "tens"), shards(40, lambda i: 10, "t"))
    counting = FeatureCache(tmp_path / "counting")
    shares = stats_shares(counting, 64, 16)
    assert [s.shard for s in shares] == [0, 6, 11, 17, 22, 28, 33, 39]
    assert {(s.first, s.step, s.count) for s in shares} == {(0, 1, 2)}
    assert len(stats_shares(counting, 320, 16)) == 16  # at most max_shards
    assert [tuple(s) for s in stats_shares(counting, 3, 16)] == [(0, 0, 3, 1)]  # one shard, every 3rd sample
    mean = feature_stats([counting], {"image": "standardize"}, max_vectors=64)["image"]["mean"]
    assert mean == pytest.approx([19.5, 19.5], abs=0.1)
    both = feature_stats([counting, FeatureCache(tmp_path / "tens")], {"image": "standardize"}, max_vectors=128)
    assert both["image"]["mean"] == pytest.approx([(19.5 + 10) / 2] * 2, abs=0.1)


def test_feature_stats_read_on_past_text_only_shards_and_name_a_cache_without_features(tmp_path):
    """LLaVA-like data may open with shards of text-only samples: the statistics come from the first shards with
    features, not a division by no vectors; a cache with none is named."""
    from modrwkv.conversation import Sample, Turn
    from tests.cache_entries import write_entry

    turns = [Turn("user", "Say yes."), Turn("assistant", "yes")]
    text = [Sample(f"t{i}", "image", turns) for i in range(2)]
    image = [Sample("i0", "image", turns, items=[np.array([[1.0, 2.0], [3.0, 2.0]], np.float16)])]
    write_entry(str(tmp_path / "late"), [text] * 16 + [image])
    write_entry(str(tmp_path / "text"), [text] * 3)
    stats = feature_stats([FeatureCache(tmp_path / "late")], {"image": "standardize"})
    assert stats["image"]["mean"] == [2.0, 2.0] and stats["image"]["std"] == pytest.approx([1.0, 1e-6])
    with pytest.raises(ValueError, match=f"{tmp_path / 'text'}: no image feature vectors to normalise with"):
        feature_stats([FeatureCache(tmp_path / "text")], {"image": "whiten"})
