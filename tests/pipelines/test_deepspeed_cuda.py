"""The DeepSpeed engine on a GPU as a Ray Train worker drives it (`start_engine`, the core's `train_steps`,
`save_final`), in one process with its own process group (the machine that runs GPU tests has no Ray): ZeRO-2 in
bf16, each step's gradients summed in fp32, the projectors' feature statistics kept in fp32. On the CPU the same
engine runs under Ray in tests/pipelines/test_train.py and test_trainer.py (fp32)."""

import socket

import numpy as np
import pytest
import torch

from modrwkv import RWKV7Config
from modrwkv.batching import Collator
from modrwkv.conversation import Sample, Turn
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.tokenizer import WorldTokenizer
from pipelines.train_config import DeepSpeedConfig, PhaseConfig
from tests.conftest import random_backbone

pytestmark = pytest.mark.gpu
WORDS = ["zero", "one", "two", "three"]


def digit_like_batches(collator: Collator, micro: int, seed: int = 0):
    """Endless ("image", batch) pairs: 16 feature vectors around one of four class prototypes, far from zero as
    a frozen encoder's are, with the class word as the answer."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(4, 1, 32)) + 5.0
    n = 0
    while True:
        samples = []
        for _ in range(micro):
            label = int(rng.integers(4))
            features = (prototypes[label] + 0.3 * rng.normal(size=(16, 32))).astype(np.float16)
            samples.append(Sample(f"s{n}", "image", [Turn("user", "<image>\nWhich class?"),
                                                     Turn("assistant", WORDS[label])], items=[features]))
            n += 1
        yield "image", collator(samples)


@pytest.fixture
def process_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"DS_ACCELERATOR": "cuda", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    # through DeepSpeed, which caches the world group: torch's own teardown left it holding the destroyed one, and
    # the next test's deepspeed.initialize failed on it ("Group ... is not registered"; seen with gloo on a CPU); a
    # test that failed before DeepSpeed started has only torch's
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# stage 1 (configs/paper/train_vision.yaml): DeepSpeed's BF16_Optimizer, not stage 2's ZeRO optimizer
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_in_bf16_sums_gradients_in_fp32_learns_and_saves(process_group, tmp_path, stage):
    from deepspeed.utils import safe_get_full_fp32_param

    from pipelines.deepspeed_engine import save_final, start_engine
    from pipelines.trainer import train_steps

    torch.manual_seed(0)
    config = ModRWKVConfig(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16), {
        "image": ProjectorConfig(encoder_dim=32, kernel=3, stride=2, adapter_scale=2, normalize="whiten")})
    model = ModRWKV(config, backbone=random_backbone(config.backbone))
    whitening = torch.linalg.inv(torch.linalg.cholesky(torch.eye(32) * 0.09 + 0.01)).T  # any fixed matrix
    model.projectors["image"].set_feature_stats(torch.full((32,), 5.0), whitening=whitening)
    model.set_phase(1)
    hp = PhaseConfig(lr=3e-3, steps=12, global_batch=16, micro_batch=4, warmup_steps=1)
    engine, optimizer = start_engine(model, hp, DeepSpeedConfig(zero_stage=stage), world=1, on_gpu=True)

    summed_in = getattr(engine.optimizer, "gradient_accumulation_dtype", None) or engine.optimizer.grad_acc_dtype
    assert engine.bfloat16_enabled() and summed_in == torch.float32
    projector = engine.module.projectors["image"]
    assert projector.adapter[0].weight.dtype == torch.bfloat16
    assert projector.feature_whitening.dtype == torch.float32 and torch.equal(projector.feature_whitening.cpu(),
                                                                               whitening)
    losses = []
    batches = digit_like_batches(Collator(WorldTokenizer(), config, max_length=64), hp.micro_batch)
    train_steps(engine, optimizer, batches, hp, on_step=lambda step, metrics: losses.append(metrics["loss"]))
    assert len(losses) == 12 and all(np.isfinite(losses))
    # the adapter alone, on a random backbone: 1.4 nats in 12 steps in fp32 on the CPU (the same steps, one
    # process, gloo)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5

    save_final(engine, tmp_path, phase=1, rank=0)
    saved = ModRWKV.from_pretrained(tmp_path / "model", backbone=random_backbone(config.backbone))
    for name, p in engine.module.projectors.named_parameters():  # the fp32 masters, the module their rounding
        master = saved.projectors.get_parameter(name)
        assert torch.equal(master, safe_get_full_fp32_param(p).cpu()), name
        assert torch.equal(master.bfloat16(), p.detach().cpu()), name
    assert torch.equal(saved.projectors["image"].feature_whitening, whitening)
