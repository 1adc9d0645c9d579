"""The training core in one process (`modrwkv train --single-process`), and the same core under Ray Train and
DeepSpeed computing the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from modrwkv import RWKV7, RWKV7Config
from modrwkv.checkpoint import WEIGHTS_FILE, CheckpointError
from modrwkv.multimodal import ModRWKV
from pipelines.cli import main
from pipelines.config import from_dict, to_dict
from pipelines.train import TrainConfig, run_train
from pipelines.train_local import run_single_process
from pipelines.trained_model import load_trained_model
from pipelines.trainer import LocalEngine
from preprocessing import local_copy, storage
from tests.conftest import random_backbone
from tests.services import BUCKET
from tests.tiny_models import tiny_digits_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    cache = tiny_digits_cache(root, "train", 48, shard_size=8)
    random_backbone(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)).save_pretrained(root / "backbone")
    return root, cache


@pytest.fixture(scope="module")
def mixed_cache(setup, tmp_path_factory) -> str:
    """LLaVA's mixed data (digits, text-only conversations, 3 over-long samples), encoded by setup's CLIP."""
    from tests.mixed_llava import mixed_llava_cache

    return mixed_llava_cache(tmp_path_factory.mktemp("mixed"), setup[0] / "clip")


@pytest.fixture(scope="module")
def short_item_cache(tmp_path_factory) -> tuple[str, set[str]]:
    """16 image samples, 4 of them with 2 feature vectors, fewer than the image projector's compression kernel 3
    (as 50 ms of audio is 2 WavLM frames); and the keys of those 4."""
    import numpy as np

    from modrwkv.conversation import Sample, Turn
    from tests.cache_entries import write_entry

    rng = np.random.default_rng(0)
    turns = [Turn("user", "<image>\nWhich digit?"), Turn("assistant", "seven")]
    samples = [Sample(f"{'short' if i % 4 == 0 else 'whole'}-{i}", "image", turns,
                      items=[rng.normal(size=(2 if i % 4 == 0 else 9, 32)).astype(np.float16)]) for i in range(16)]
    uri = str(tmp_path_factory.mktemp("short") / "entry")
    write_entry(uri, [samples[:8], samples[8:]])
    return uri, {s.key for s in samples if len(s.items[0]) == 2}


@pytest.fixture(scope="module")
def unanswered_cache(tmp_path_factory) -> tuple[str, set[str]]:
    """16 image samples, 12 of them a question with no answer (as encoding wrote them before it rejected such
    samples); and the keys of those 12."""
    import numpy as np

    from modrwkv.conversation import Sample, Turn
    from tests.cache_entries import write_entry

    rng = np.random.default_rng(0)
    asked = [Turn("user", "<image>\nWhich digit?")]
    samples = [Sample(f"{'asked' if i % 4 else 'answered'}-{i}", "image",
                      asked + ([] if i % 4 else [Turn("assistant", "seven")]),
                      items=[rng.normal(size=(9, 32)).astype(np.float16)]) for i in range(16)]
    uri = str(tmp_path_factory.mktemp("unanswered") / "entry")
    write_entry(uri, [samples[:8], samples[8:]])
    return uri, {s.key for s in samples if len(s.turns) == 1}


def config_for(root: Path, cache: str, name: str, **top) -> TrainConfig:
    return from_dict(TrainConfig, {
        "name": name, "caches": [cache], "output_dir": str(root / "runs"), "max_length": 64, "pack_buffer": 16,
        "model": {"backbone": {"path": str(root / "backbone")},
                  "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2}}},
        "phase1": {"lr": 3e-3, "steps": 6, "global_batch": 8, "micro_batch": 4},
        "phase2": {"lr": 1e-3, "steps": 3, "global_batch": 8, "micro_batch": 4},
        "scaling": {"workers": 1}, "deepspeed": {"zero_stage": 0}, **top})


def test_local_engine_accumulates_clips_and_steps_at_the_boundary():
    """Two micro-steps of loss L_i: the optimizer sees the gradient of (L_1 + L_2) / 2, clipped to the global
    norm asked for, once, at the second step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = LocalEngine(model, optimizer, accumulation=2, grad_clip=0.05)
    xs = [torch.randn(4, 3) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine(xs[0]).square().sum())
    engine.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no step inside the accumulation
    engine.backward(engine(xs[1]).square().sum())
    engine.step()

    loss = sum(reference(x).square().sum() for x in xs) / 2
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    assert engine.get_global_grad_norm() == pytest.approx(float(norm), rel=1e-5)
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * g * min(1.0, 0.05 / float(norm)), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next accumulation


def test_a_step_reads_the_device_once_whatever_it_accumulates(device_reads):
    """The micro-steps' losses stay on the device; each optimizer step reads its metrics back as one tensor (one
    all-reduce across workers) and then the gradient norm, for 1 micro-step or 3. The batch's layout stays on the
    host (a `meta` device stands for the GPU), its features go to the device."""
    from itertools import cycle

    from modrwkv.batching import Collator
    from modrwkv.tokenizer import WorldTokenizer
    from pipelines.train_config import PhaseConfig
    from pipelines.trainer import optimizer_for, to_device, train_steps
    from tests.modrwkv.test_multimodal import packing_samples, tiny_model

    collator = Collator(WorldTokenizer(), tiny_model().config, max_length=400)
    batch = collator.pack([collator.encode_all(packing_samples())[0]])
    moved = to_device(collator.pack([collator.encode_all(packing_samples())[0]]), torch.device("meta"))
    assert moved.input_ids.is_cpu and moved.labels.is_cpu and moved.cu_seqlens.is_cpu
    assert all(f.is_meta for items in moved.features for _, f in items)
    reads, metrics = {}, []
    for accumulation in (1, 3):
        model = tiny_model(seed=accumulation)
        model.set_phase(2)
        hp = PhaseConfig(lr=1e-3, steps=2, global_batch=accumulation, micro_batch=1)
        optimizer = optimizer_for(model, hp)
        engine = LocalEngine(model, optimizer, accumulation, grad_clip=1.0)
        device_reads.clear()
        train_steps(engine, optimizer, cycle([("image", batch)]), hp, on_step=lambda step, m: metrics.append(m))
        reads[accumulation] = list(device_reads)
    assert reads[1] == reads[3] == ["tolist", "__float__"] * 2
    assert all(m["loss"] > 0 and m["loss_image"] == m["loss"] and m["grad_norm"] > 0 for m in metrics)
    for m in metrics:
        assert m["tokens_per_s"] / m["samples_per_s"] == pytest.approx(batch.n_tokens / len(batch.sample_ids))


def one_step(batches, **model_args) -> tuple[float, float]:
    """(loss, gradient norm) of one optimizer step over `batches`, (modality, batch) pairs, one per micro-step, by
    the training core in one process, from one initial model."""
    from pipelines.train_config import PhaseConfig
    from pipelines.trainer import optimizer_for, train_steps
    from tests.modrwkv.test_multimodal import tiny_model

    model = tiny_model(seed=1, **model_args)
    model.set_phase(2)
    hp = PhaseConfig(lr=1e-3, steps=1, global_batch=len(batches), micro_batch=1, grad_clip=0.0)
    engine = LocalEngine(model, optimizer_for(model, hp), len(batches), grad_clip=0.0)
    metrics = []
    train_steps(engine, engine.optimizer, iter(batches), hp, on_step=lambda step, m: metrics.append(m))
    return metrics[0]["loss"], metrics[0]["grad_norm"]


def series_windows(n: int) -> list:
    """`n` forecasting samples of unequal lookbacks (series projector width 8) and 4 target values each."""
    import numpy as np

    from modrwkv.conversation import Sample, Turn

    rng = np.random.default_rng(0)
    return [Sample(f"w{i}", "series", [Turn("user", "<series>\nForecast the next 4 values.")],
                   items=[rng.standard_normal((6 + 3 * i, 8)).astype(np.float32)],
                   target=rng.standard_normal(4).astype(np.float32)) for i in range(n)]


def test_a_step_minimises_one_loss_however_its_batch_is_split_or_packed():
    """Four samples whose answers run from 2 to 13 tokens, one optimizer step: the same loss and gradient (norm) as
    one padded micro-batch, as four micro-batches of one accumulated, or packed into one row or two. Before, each
    micro-batch's token mean counted once: alone in a micro-batch the 2-token answer weighed a quarter of the step,
    in a packed row 2 tokens in 30."""
    from modrwkv.batching import Collator
    from modrwkv.multimodal import ModRWKV
    from modrwkv.tokenizer import WorldTokenizer
    from tests.modrwkv.test_multimodal import packing_samples, tiny_model

    collator = Collator(WorldTokenizer(), tiny_model().config, max_length=400)
    samples = packing_samples()[:4]
    encoded = collator.encode_all(samples)[0]
    answers = sorted(len(ModRWKV.learned_positions(collator([s]).labels, None)[0]) for s in samples)
    assert answers[0] <= 3 and answers[-1] >= 10  # answers of very different lengths
    whole = one_step([("image", collator(samples))])
    for split in ([collator([s]) for s in samples], [collator.pack([encoded])],
                  [collator.pack([encoded[:2]]), collator.pack([encoded[2:]])], [collator(samples[:1]),
                                                                                 collator(samples[1:])]):
        assert one_step([("image", b) for b in split]) == pytest.approx(whole, rel=1e-4)


def test_a_step_of_answers_and_forecasts_weighs_each_task_by_its_samples():
    """A step of two image samples (answers of 2 and 13 tokens) and two forecast windows, in one micro-batch of each
    modality, in four of one, or packed: one loss and gradient, and that loss is half the image samples' token-mean
    cross-entropy plus half the windows' mean squared error, as one forward of each modality gives them. Before, a
    micro-batch's mean counted once, whatever it held; summing each task's step mean instead would have weighed the
    forecast as much as all the answers whatever its share of the samples."""
    import torch

    from modrwkv.batching import Collator
    from modrwkv.tokenizer import WorldTokenizer
    from tests.modrwkv.test_multimodal import packing_samples, run, tiny_model

    model = tiny_model(seed=1, forecast_horizon=4)
    collator = Collator(WorldTokenizer(), model.config, max_length=400)
    images, windows = packing_samples()[:2], series_windows(2)
    with torch.no_grad():
        expected = 0.5 * float(run(model, collator(images)).lm_loss) + 0.5 * float(
            run(model, collator(windows)).forecast_loss)
    together = one_step([("image", collator(images)), ("series", collator(windows))], forecast_horizon=4)
    assert together[0] == pytest.approx(expected, rel=1e-5)
    ones = [("image", collator([s])) for s in images] + [("series", collator([w])) for w in windows]
    assert one_step(ones, forecast_horizon=4) == pytest.approx(together, rel=1e-4)
    packed = [("image", collator.pack([collator.encode_all(images)[0]])),
              ("series", collator.pack([collator.encode_all(windows)[0]]))]
    assert one_step(packed, forecast_horizon=4) == pytest.approx(together, rel=1e-4)


def test_a_step_of_forecasts_alone_updates_the_lm_head_as_deepspeed_does():
    """The LM head reads only labelled positions, and a forecast has none: its gradient stayed None in one process,
    where AdamW then skips the tensor (no decay, no momentum), while ZeRO's flat partition gets a zero gradient and
    decays it. Touched like every idle tensor, it gets the zero gradient in one process too."""
    from modrwkv.batching import Collator
    from modrwkv.tokenizer import WorldTokenizer
    from pipelines.train_config import PhaseConfig
    from pipelines.trainer import optimizer_for, train_steps
    from tests.modrwkv.test_multimodal import tiny_model

    model = tiny_model(seed=1, forecast_horizon=4)
    model.set_phase(2)
    head = model.backbone.head.weight.detach().clone()
    hp = PhaseConfig(lr=1e-3, steps=1, global_batch=1, micro_batch=1, grad_clip=0.0, weight_decay=0.1)
    engine = LocalEngine(model, optimizer_for(model, hp), 1, grad_clip=0.0)
    batch = Collator(WorldTokenizer(), model.config, max_length=400)(series_windows(2))
    train_steps(engine, engine.optimizer, iter([("series", batch)]), hp)
    decayed = model.backbone.head.weight.detach()
    factor = float((decayed * head).sum() / (head * head).sum())  # a zero gradient moves it by decay alone
    assert factor < 1 - 1e-6 and torch.allclose(decayed, head * factor, rtol=0, atol=1e-7)


def test_adamw_takes_rwkv_lms_epsilon_unless_the_phase_sets_another():
    from pipelines.train_config import PhaseConfig
    from pipelines.trainer import optimizer_for
    from tests.modrwkv.test_multimodal import tiny_model

    model = tiny_model()
    model.set_phase(1)
    assert {g["eps"] for g in optimizer_for(model, PhaseConfig(lr=1e-3, steps=2, global_batch=8)).param_groups} == {
        1e-18}  # rwkv7.md's reference
    hp = PhaseConfig(lr=1e-3, steps=2, global_batch=8, adam_eps=1e-8)
    assert {g["eps"] for g in optimizer_for(model, hp).param_groups} == {1e-8}
    with pytest.raises(ValueError, match="adam_eps must be between 0 and 1, not 0"):
        PhaseConfig(lr=1e-3, steps=2, global_batch=8, adam_eps=0)
    # an optimizer state resumed from a checkpoint brings its own eps: the phase's replaces it at the first step
    from itertools import repeat

    from modrwkv.batching import Collator
    from modrwkv.tokenizer import WorldTokenizer
    from pipelines.trainer import train_steps
    from tests.modrwkv.test_multimodal import packing_samples

    resumed = optimizer_for(model, hp)
    batch = Collator(WorldTokenizer(), model.config, max_length=400)(packing_samples()[:1])
    train_steps(LocalEngine(model, resumed, 1, grad_clip=1.0), resumed, repeat(("image", batch)),
                PhaseConfig(lr=1e-3, steps=1, global_batch=1, micro_batch=1))
    assert {g["eps"] for g in resumed.param_groups} == {1e-18}


def test_a_resumed_optimizer_decays_as_the_phase_now_says():
    """An optimizer state saved under weight_decay 0.01 brings 0.01 back in its decayed group; the phase's 0.1
    replaces it from the first step (the other groups stay undecayed)."""
    from itertools import repeat

    from modrwkv.batching import Collator
    from modrwkv.tokenizer import WorldTokenizer
    from pipelines.train_config import PhaseConfig
    from pipelines.trainer import optimizer_for, train_steps
    from tests.modrwkv.test_multimodal import packing_samples, tiny_model

    model = tiny_model()
    model.set_phase(2)
    saved = optimizer_for(model, PhaseConfig(lr=1e-3, steps=2, global_batch=8, weight_decay=0.01)).state_dict()
    hp = PhaseConfig(lr=1e-3, steps=1, global_batch=1, micro_batch=1, weight_decay=0.1)
    resumed = optimizer_for(model, hp)
    resumed.load_state_dict(saved)
    assert sorted(g["weight_decay"] for g in resumed.param_groups) == [0.0, 0.0, 0.01]
    batch = Collator(WorldTokenizer(), model.config, max_length=400)(packing_samples()[:1])
    train_steps(LocalEngine(model, resumed, 1, grad_clip=1.0), resumed, repeat(("image", batch)), hp)
    assert sorted(g["weight_decay"] for g in resumed.param_groups) == [0.0, 0.0, 0.1]


def test_the_deepspeed_config_takes_the_cores_accumulation():
    from pipelines.train_config import DeepSpeedConfig, PhaseConfig
    from pipelines.deepspeed_engine import deepspeed_config

    hp = PhaseConfig(lr=1e-3, steps=1, global_batch=16, micro_batch=4, grad_clip=0.5)
    config = deepspeed_config(hp, DeepSpeedConfig(zero_stage=2), world=2, on_gpu=False)
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2} and config["bf16"] == {"enabled": False}
    assert "data_types" not in config  # fp32 parameters: gradients are summed in fp32 already
    on_gpu = deepspeed_config(hp, DeepSpeedConfig(zero_stage=2), world=2, on_gpu=True)
    assert on_gpu["bf16"] == {"enabled": True} and on_gpu["data_types"] == {"grad_accum_dtype": "fp32"}
    with pytest.warns(UserWarning, match="zero_stage 0 on a GPU sums each step's 2 micro-batch gradients in bf16"):
        assert "data_types" not in deepspeed_config(hp, DeepSpeedConfig(zero_stage=0), world=2, on_gpu=True)
    with pytest.raises(ValueError, match="not a multiple of micro_batch x workers = 12"):
        deepspeed_config(hp, DeepSpeedConfig(), world=3, on_gpu=False)
    overlapped = deepspeed_config(hp, DeepSpeedConfig(zero_stage=1, overlap_comm=True), world=2, on_gpu=True)
    assert overlapped["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    with pytest.raises(ValueError, match="overlap_comm .* needs zero_stage 1 or 2"):
        DeepSpeedConfig(zero_stage=0, overlap_comm=True)
    with pytest.raises(ValueError, match="offload_optimizer .* needs zero_stage 1 or 2"):
        DeepSpeedConfig(zero_stage=0, offload_optimizer=True)


def test_single_process_phase1_then_phase2_learn_and_load_no_cluster_framework(setup, tmp_path):
    """One process, no tracking URI: phase I's loss falls, phase II starts from phase I's folder; neither Ray,
    DeepSpeed nor MLflow is imported (run in a fresh interpreter, which then lists what it loaded)."""
    root, cache = setup
    config = config_for(root, cache, "local", output_dir=str(tmp_path / "runs"))
    script = f"""
import json, sys
from pipelines.config import from_dict
from pipelines.train_config import TrainConfig
from pipelines.train_local import run_single_process
from pipelines.trained_model import load_trained_model
config = from_dict(TrainConfig, json.loads({json.dumps(json.dumps(to_dict(config)))}))
result = {{}}
for phase in (1, 2):
    folder, history = run_single_process(config, phase, device="cpu")
    result[phase] = {{"folder": str(folder), "losses": [h["loss"] for h in history]}}
result["loaded"] = sorted({{m.split(".")[0] for m in sys.modules}} & {{"ray", "deepspeed", "mlflow"}})
print("RESULT" + json.dumps(result))
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT")[-1])
    assert result["loaded"] == []
    phase1, phase2 = result["1"], result["2"]
    assert len(phase1["losses"]) == 6 and sum(phase1["losses"][-2:]) < sum(phase1["losses"][:2])
    assert (Path(phase1["folder"]) / "adapter.safetensors").is_file()
    assert not (Path(phase1["folder"]) / "model.safetensors").exists()  # phase I saves the adapter only
    assert len(phase2["losses"]) == 3 and (Path(phase2["folder"]) / "model.safetensors").is_file()
    assert phase2["losses"][0] < phase1["losses"][0]  # phase II starts where phase I ended, not from scratch


def test_registering_without_mlflow_is_refused_before_training(setup, tmp_path, monkeypatch):
    """One process tracks only when told where; a --register-as without that trained, then registered nothing."""
    root, cache = setup
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = config_for(root, cache, "unregistered", output_dir=str(tmp_path / "runs"),
                        tracking={"register_as": "digits"})
    with pytest.raises(ValueError, match="tracking.register_as 'digits': registering needs MLflow"):
        run_single_process(config, 2, device="cpu")
    assert not (tmp_path / "runs").exists()


def test_gradient_checkpointing_recomputes_each_block_and_trains_the_same(setup, tmp_path, monkeypatch):
    """The config's switch reaches the backbone: every block runs under torch's checkpoint (its forward again in
    the backward pass), and phase I's losses are those of the run that keeps its activations."""
    import modrwkv.model

    root, cache = setup
    wrapped = []

    def counting(function, *args, **kwargs):
        wrapped.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(modrwkv.model, "checkpoint", counting)
    losses = {}
    for on in (False, True):
        config = config_for(root, cache, f"checkpointing-{on}", output_dir=str(tmp_path / "runs"),
                            gradient_checkpointing=on)
        losses[on] = [h["loss"] for h in run_single_process(config, phase=1, device="cpu")[1]]
        assert bool(wrapped) == on
    assert len(wrapped) % 2 == 0 and len(wrapped) >= 6 * 2  # both blocks, in every micro-step
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_outputs_and_backbone_in_s3_need_no_shared_folder(setup, s3_server, tmp_path, monkeypatch):
    """output_dir and the backbone as s3:// URIs: phase I publishes its folder to S3; phase II, on what stands for
    another node (its own local copies, none of phase I's local folders), reads phase I's output and the backbone
    from S3 and publishes its own beside it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    root, cache = setup
    base = f"s3://{BUCKET}/trainer-outputs"
    storage.copy_tree(str(root / "backbone"), f"{base}/backbone")
    config = config_for(root, cache, "remote", output_dir=f"{base}/runs")
    config.model.backbone.path = f"{base}/backbone"
    losses = {}
    for phase in (1, 2):
        monkeypatch.setenv(local_copy.ROOT_ENV, str(tmp_path / f"node{phase}" / "copies"))
        folder, history = run_single_process(config, phase, device="cpu")
        losses[phase] = [h["loss"] for h in history]
        assert folder.is_relative_to(tmp_path / f"node{phase}")
        published = storage.list_tree(f"{base}/runs/remote/phase{phase}")
        assert {name: size for name, (size, _) in published.items()} == {
            str(p.relative_to(folder.parent)): p.stat().st_size for p in folder.parent.rglob("*")
            if p.is_file() and p.name != local_copy.UPLOADED}
        assert (folder.parent / local_copy.UPLOADED).read_text() == f"{base}/runs/remote/phase{phase}"  # prunable
    assert sorted(published) == ["adapter/adapter.safetensors", "adapter/modrwkv_config.json",
                                 "model/backbone_source.json", "model/encoders.json", "model/model.safetensors",
                                 "model/modrwkv_config.json"]
    fetched = sorted(p.name for p in (tmp_path / "node2" / "copies").glob("*/*") if p.is_dir())
    assert fetched == ["backbone", "model"]  # the backbone and phase I's model, from S3
    assert losses[2][0] < losses[1][0]  # phase II starts where phase I ended

    # a third node opens phase I's adapter-only model: its backbone, recorded by URI and sha256, comes from S3
    monkeypatch.setenv(local_copy.ROOT_ENV, str(tmp_path / "node3" / "copies"))
    phase1 = f"{base}/runs/remote/phase1/model"
    opened = load_trained_model(phase1)
    expected = ModRWKV.from_pretrained(local_copy.local_copy(phase1), backbone=RWKV7.from_pretrained(root / "backbone"))
    assert all(torch.equal(a, b) for a, b in zip(opened.state_dict().values(), expected.state_dict().values()))
    assert main(["export", "--to", "hf", phase1, str(tmp_path / "export")]) == 0  # the CLI opens it the same way
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == opened.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in opened.state_dict().items())
    other = tmp_path / "other-backbone"
    random_backbone(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16), seed=1).save_pretrained(other)
    storage.copy_tree(str(other), f"{base}/backbone")
    with pytest.raises(CheckpointError, match=f"its backbone {base}/backbone now holds other weights"):
        load_trained_model(phase1)


@pytest.mark.slow
def test_the_ray_deepspeed_run_computes_the_single_process_losses(setup, ray_local, tmp_path):
    """One worker, ZeRO off, the same data: Ray Train + DeepSpeed and one process give the same loss at every
    step of phase I (the engines differ; the core is the same)."""
    root, cache = setup
    tracking = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "equality",
                "system_metrics_every_s": 0}
    distributed = run_train(config_for(root, cache, "ray", tracking=tracking), phase=1)
    history = MlflowClient(tracking["tracking_uri"]).get_metric_history(distributed.run_id, "loss")
    ray_losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    _, local = run_single_process(config_for(root, cache, "one", tracking=tracking), phase=1, device="cpu")
    local_losses = [h["loss"] for h in local]
    assert len(ray_losses) == len(local_losses) == 6
    assert local_losses == pytest.approx(ray_losses, rel=1e-5)


@pytest.mark.slow
def test_a_ray_run_with_its_output_in_s3_resumes_from_a_checkpoint_uri(setup, ray_local, s3_server, tmp_path,
                                                                        monkeypatch, short_item_cache):
    """Under an s3:// output_dir Ray Train keeps its checkpoints in S3; `--resume-from` one of them by URI
    continues there: the resumed run's steps 4-6 have the first run's losses (weights, optimizer and data position
    restored), and the model folder is published to S3."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)  # the workers get these from the driver (Ray's may have started without)
    root, cache = setup
    tracking = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "resume", "system_metrics_every_s": 0}
    base = f"s3://{BUCKET}/trainer-resume"
    config = config_for(root, cache, "resume", output_dir=base, tracking=tracking)
    config.phase1.checkpoint_every = 3
    first = run_train(config, phase=1)
    client = MlflowClient(tracking["tracking_uri"])
    losses = {m.step: m.value for m in client.get_metric_history(first.run_id, "loss")}
    assert first.model_uri == f"{base}/resume/phase1/model" and storage.exists(f"{first.model_uri}/adapter.safetensors")
    ray_storage = f"{base}/resume/phase1/ray"
    checkpoints = sorted({"/".join(name.split("/")[:2]) for name in storage.list_tree(ray_storage)
                          if name.endswith("mp_rank_00_model_states.pt")})  # <run>/checkpoint_<time>, oldest first
    assert len(checkpoints) == 2  # steps 3 and 6, the two kept
    resumed = run_train(config, phase=1, resume_from=f"{ray_storage}/{checkpoints[0]}")
    assert [m.value for m in client.get_metric_history(resumed.run_id, "resumed_from_step")] == [3]
    tags = client.get_run(resumed.run_id).data.tags  # the run it continues: a new one, linked to it
    assert tags["resumed_from_run_id"] == first.run_id and tags["resumed_from"] == f"{ray_storage}/{checkpoints[0]}"
    again = {m.step: m.value for m in client.get_metric_history(resumed.run_id, "loss")}
    assert sorted(again) == [4, 5, 6]
    assert [again[s] for s in (4, 5, 6)] == pytest.approx([losses[s] for s in (4, 5, 6)], rel=1e-5)
    runs = len(client.search_runs([client.get_run(first.run_id).info.experiment_id]))
    with pytest.raises(ValueError, match=r"saved at step 6, the last of phase 1's 6: nothing to resume .* "
                                         r"with phase1.steps raised it trains on, its lr from then on the longer"):
        run_train(config, phase=1, resume_from=f"{ray_storage}/{checkpoints[1]}")
    other = config_for(root, short_item_cache[0], "resume", output_dir=base, tracking=tracking)
    with pytest.raises(ValueError, match=f"saved over the entry {Path(cache).name} cannot resume a run that reads "
                                         f"{Path(short_item_cache[0]).name} in its place"):
        run_train(other, phase=1, resume_from=f"{ray_storage}/{checkpoints[0]}")
    with pytest.raises(ValueError, match="a phase 1 checkpoint cannot resume phase 2"):
        run_train(config, phase=2, resume_from=f"{ray_storage}/{checkpoints[0]}")
    assert len(client.search_runs([client.get_run(first.run_id).info.experiment_id])) == runs  # refused before one


def test_a_bf16_backbone_folder_trains_in_fp32(tmp_path):
    """Training keeps fp32 master weights: bf16 is computed by autocast or DeepSpeed, never stored in the optimizer."""
    from modrwkv.multimodal import ModRWKVConfig, ProjectorConfig
    from pipelines.trainer import build_model

    config = RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=32)
    random_backbone(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    mm = ModRWKVConfig(config, {"image": ProjectorConfig(encoder_dim=8, model_dim=64)})
    model = build_model(str(tmp_path / "bf16"), mm, None, {}, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_failed_single_process_run_ends_failed_with_what_the_cluster_driver_logs(setup, mixed_cache, tmp_path,
                                                                                   monkeypatch):
    """A crash at step 4 (a CUDA out-of-memory, say) ends the MLflow run FAILED, with its end time, not RUNNING
    forever; it holds the over-long count known before training (as the cluster driver logs it), the steps it
    took and the over-long samples it had skipped by then."""
    import pipelines.train_local

    root, _ = setup
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = config_for(root, mixed_cache, "crash", max_length=96,
                        tracking={"tracking_uri": uri, "experiment": "crash", "system_metrics_every_s": 0})
    train_steps = pipelines.train_local.train_steps

    def crashing_at_step_4(*args, on_step, **kwargs):
        def step(number: int, metrics: dict) -> None:
            on_step(number, metrics)
            if number == 4:
                raise RuntimeError("CUDA out of memory (simulated)")

        return train_steps(*args, on_step=step, **kwargs)

    monkeypatch.setattr(pipelines.train_local, "train_steps", crashing_at_step_4)
    with pytest.raises(RuntimeError, match="simulated"):
        run_single_process(config, phase=1, device="cpu")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FAILED" and run.info.end_time
    assert [m.value for m in client.get_metric_history(run_id, "over_length_in_caches")] == [3]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    named = [json.loads(line) for line in
             Path(client.download_artifacts(run_id, "skipped_samples.jsonl", str(tmp_path))).read_text().splitlines()]
    assert named and {r["key"] for r in named} <= {"long-0", "long-1", "long-2"} and {r["step"] for r in named} <= {
        1, 2, 3, 4}


def test_a_collection_entry_smaller_than_the_workers_is_left_out_before_they_start(setup, short_item_cache,
                                                                                    monkeypatch, capsys):
    """A phase's plan for 20 workers over a collection of two entries (48 and 16 samples): the small one is never
    drawn (weight 0, with no mix or with one), counted and named; its too-short samples are not counted as skips too."""
    import pipelines.train_setup
    from pipelines.train_setup import plan_phase, skipped_in_caches

    root, digits = setup
    small, _ = short_item_cache
    monkeypatch.setattr(pipelines.train_setup, "resolve_groups", lambda entries: [[digits, small]])
    for mix in (None, [2.0]):
        config = config_for(root, "collection.yaml", "left-out", packing=False, phase1={
            "lr": 3e-3, "steps": 6, "global_batch": 20, "micro_batch": 1, "mix": mix})
        plan = plan_phase(config, 1, world=20)
        assert plan.weights == ([48, 0] if mix is None else [2.0, 0.0]) and plan.left_out == [small]
    config.packing = True  # a worker's buffer holds its 2 of the 48 samples, packed 1 and 1, or 2 in a row of 64
    packed = plan_phase(config, 1, world=20)
    assert packed.weights[0] == pytest.approx(2.0 / 1.5) and packed.weights[1] == 0
    assert f"{digits}: 1.50 samples a packed row" in capsys.readouterr().out
    skips = skipped_in_caches(plan.opened, plan.model, 64, plan.left_out)
    assert skips == {"over_length_in_caches": 0, "too_short_in_caches": 0, "in_entries_left_out": 16}
    assert "1 collection entries hold fewer samples than the workers" in capsys.readouterr().out
    assert plan_phase(config, 1, world=16).left_out == []


def test_bucketed_reduction_across_workers_is_refused_for_a_cache_with_text_only_samples(setup, mixed_cache):
    """A text-only micro-batch on one worker would have ZeRO-2, or ZeRO-1 with overlap_comm, reduce its gradients in
    another order than its peer's (RESULTS.md); refused before workers start, naming the cache, the count and the
    way out. One worker, or ZeRO-1 without overlap_comm, or a cache whose samples all hold an image, is planned."""
    from pipelines.config import ConfigError
    from pipelines.train_setup import plan_phase

    root, digits = setup
    for deepspeed, mode in (({"zero_stage": 2}, "ZeRO-2"), ({"zero_stage": 1, "overlap_comm": True},
                                                            "ZeRO-1 with overlap_comm")):
        config = config_for(root, mixed_cache, "bucketed", max_length=96, deepspeed=deepspeed)
        with pytest.raises(ConfigError, match=rf"{mixed_cache}: \d+ of \d+ samples are text-only, and under {mode} "
                                              ".* set deepspeed.zero_stage: 1 without overlap_comm"):
            plan_phase(config, 1, world=2)
        plan_phase(config, 1, world=1)
        plan_phase(config_for(root, digits, "bucketed", deepspeed=deepspeed), 1, world=2)
    plan_phase(config_for(root, mixed_cache, "bucketed", max_length=96, deepspeed={"zero_stage": 1}), 1, world=2)


def save_phase1(config: TrainConfig, model_config, backbone: Path) -> None:
    """A phase I output folder as training writes it (adapter-only, its backbone recorded), untrained."""
    from pipelines.train_setup import phase_dir

    model = ModRWKV(model_config, backbone=RWKV7.from_pretrained(backbone))
    model.save_pretrained(Path(phase_dir(config, 1)) / "model", adapter_only=True,
                          backbone_source={"path": str(backbone)})


def test_phase2_plans_the_model_phase1_saved_and_refuses_settings_changed_since(setup, mixed_cache, tmp_path):
    """Phase II trains phase I's saved model: its plan (the packed draw, the skip counts, a resume's data order) reads
    phase I's projectors, also those of a modality phase II does not read; a projector setting changed in the config
    since, a modality phase I has no projector for, or another backbone of the same shape is refused by name before
    anything starts, not ignored."""
    import dataclasses

    from pipelines.config import ConfigError
    from pipelines.train_setup import plan_phase
    from preprocessing.cache.entry import FeatureCache

    root, digits = setup
    both = config_for(root, digits, "phases", output_dir=str(tmp_path / "runs"),
                      model={"backbone": {"path": str(root / "backbone")},
                             "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2},
                                            "audio": {"kernel": 2, "stride": 2, "adapter_scale": 2}}})
    phase1 = plan_phase(both, 1, world=1).model
    audio = dataclasses.replace(phase1.projectors["image"], encoder_dim=16, normalize="standardize")
    phase1 = dataclasses.replace(phase1, projectors={**phase1.projectors, "audio": audio})
    save_phase1(both, phase1, root / "backbone")

    plan = plan_phase(both, 2, world=1)  # the config names an audio projector; phase II's caches hold no audio
    assert plan.model.projectors == phase1.projectors and plan.init_from.endswith("phases/phase1/model")
    changed = config_for(root, digits, "phases", output_dir=str(tmp_path / "runs"),
                         model={"backbone": {"path": str(root / "backbone")},
                                "projectors": {"image": {"kernel": 4, "stride": 2, "adapter_scale": 2}}})
    with pytest.raises(ConfigError, match=r"model.projectors.image.kernel: 4 in this config, 3 in phase I's model "
                                          r".*phases/phase1/model, which phase II trains on"):
        plan_phase(changed, 2, world=1)

    assert FeatureCache(mixed_cache).modality == "image"
    only_audio = dataclasses.replace(phase1, projectors={"audio": audio})
    save_phase1(both, only_audio, root / "backbone")
    with pytest.raises(ConfigError, match=r"phase I trained no image projector, and phase II's caches hold image "
                                          "features"):
        plan_phase(both, 2, world=1)

    save_phase1(both, phase1, root / "backbone")
    other = tmp_path / "other_backbone"
    random_backbone(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16), seed=1).save_pretrained(other)
    elsewhere = config_for(root, digits, "phases", output_dir=str(tmp_path / "runs"),
                           model={"backbone": {"path": str(other)},
                                  "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2}}})
    with pytest.raises(ConfigError, match=rf"model.backbone.path: {other} holds other weights .* than the backbone "
                                          rf"phase I's model .* learnt on, {root / 'backbone'}"):
        plan_phase(elsewhere, 2, world=1)
    (other / WEIGHTS_FILE).unlink()  # a config without its weights: said so, not a FileNotFoundError from hashing
    with pytest.raises(ConfigError, match=rf"model.backbone.path: {other}: no backbone weights there"):
        plan_phase(elsewhere, 2, world=1)
    same = tmp_path / "same_backbone"
    RWKV7.from_pretrained(root / "backbone").save_pretrained(same)  # a copy of phase I's weights: taken
    plan_phase(dataclasses.replace(elsewhere, model=dataclasses.replace(
        elsewhere.model, backbone=dataclasses.replace(elsewhere.model.backbone, path=str(same)))), 2, world=1)


def test_phase2_forecasts_with_phase1s_head_and_skip_from_any_lookback_the_skip_can_read():
    """Phase I's forecast head fixes the horizon; its skip reads the last forecast_lookback values of a lookback at
    least that long (phase II's caches may hold longer ones); a skip turned off or on, or a WaveNet of other settings,
    is another model."""
    import dataclasses

    from modrwkv.multimodal import ModRWKVConfig, ProjectorConfig
    from modrwkv.wavenet import WaveNetConfig
    from pipelines.config import ConfigError
    from pipelines.train_setup import phase1_config

    backbone = RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=16)
    series = {"series": ProjectorConfig(encoder_dim=8, adapter_scale=2)}
    trained = ModRWKVConfig(backbone, series, forecast_horizon=4, series_encoder=WaveNetConfig(in_channels=1, hidden=8),
                            forecast_lookback=8)
    assert phase1_config(dataclasses.replace(trained, forecast_lookback=16), trained, "p1") is trained
    for change, setting in (({"forecast_lookback": 4}, "model.forecast_skip, or the series caches' lookback"),
                            ({"forecast_lookback": 0}, "model.forecast_skip, or the series caches' lookback"),
                            ({"forecast_horizon": 6}, "the series caches' horizon"),
                            ({"series_encoder": WaveNetConfig(in_channels=1, hidden=8, layers=2)}, "model.wavenet")):
        with pytest.raises(ConfigError, match=f"{setting}: gives .* in phase I's model p1"):
            phase1_config(dataclasses.replace(trained, **change), trained, "p1")
    no_skip = dataclasses.replace(trained, forecast_lookback=0)
    with pytest.raises(ConfigError, match="forecast_lookback 8 here, 0 in phase I's model"):
        phase1_config(trained, no_skip, "p1")


@pytest.mark.parametrize("packing", [False, True])
def test_samples_with_nothing_to_learn_are_skipped_counted_and_named(setup, unanswered_cache, tmp_path, packing):
    """A cache written before encoding rejected unanswered samples: micro-batches (rows) of them alone have no loss;
    training skips each such sample, runs on, counts them at every step and names each one with its reason."""
    root, _ = setup
    cache, unanswered = unanswered_cache
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = config_for(root, cache, "unanswered", packing=packing,
                        phase1={"lr": 3e-3, "steps": 3, "global_batch": 4, "micro_batch": 2},
                        tracking={"tracking_uri": uri, "experiment": "unanswered", "system_metrics_every_s": 0})
    run_single_process(config, phase=1, device="cpu")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unanswered").experiment_id])
    assert run.info.status == "FINISHED"
    counted = sorted(client.get_metric_history(run.info.run_id, "skipped_no_answer"), key=lambda m: m.step)
    artifact = client.download_artifacts(run.info.run_id, "skipped_samples.jsonl", str(tmp_path))
    named = [json.loads(line) for line in Path(artifact).read_text().splitlines()]
    assert len(counted) == 3 and counted[-1].value == len(named) >= 6
    assert {r["key"] for r in named} <= unanswered and {r["reason"] for r in named} == {"no_answer"}


@pytest.mark.parametrize("driver", ["one process", pytest.param("ray", marks=pytest.mark.slow)])
def test_an_item_compressed_to_nothing_is_skipped_counted_and_named(setup, short_item_cache, tmp_path, request,
                                                                    driver):
    """A sample whose item has fewer feature vectors than its projector's compression kernel has no position for
    its features: training skips it as it skips an over-long one and runs on, through either driver; the count is
    known before training (from the manifest), counted at every step and each one is named with its reason."""
    root, _ = setup
    cache, short = short_item_cache
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = config_for(root, cache, "short", tracking={"tracking_uri": uri, "experiment": "short",
                                                        "system_metrics_every_s": 0})
    client = MlflowClient(uri)
    if driver == "ray":
        request.getfixturevalue("ray_local")
        run_id = run_train(config, phase=1).run_id
    else:
        run_single_process(config, phase=1, device="cpu")
        (run,) = client.search_runs([client.get_experiment_by_name("short").experiment_id])
        run_id = run.info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "too_short_in_caches")] == [4]
    counted = sorted(client.get_metric_history(run_id, "skipped_too_short"), key=lambda m: m.step)
    named = [json.loads(line) for line in
             Path(client.download_artifacts(run_id, "skipped_samples.jsonl", str(tmp_path))).read_text().splitlines()]
    assert len(counted) == 6 and counted[-1].value == len(named) >= 4 and {r["key"] for r in named} == short
    entry = cache.rstrip("/").rsplit("/", 1)[-1]  # keys are unique within an entry: each record names its entry
    assert all((r["reason"], r["vectors"], r["kernel"], r["entry"]) == ("too_short", 2, 3, entry) for r in named)
    assert client.get_metric_history(run_id, "skipped_over_length")[-1].value == 0
