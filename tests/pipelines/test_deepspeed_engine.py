"""The DeepSpeed engine on the CPU as a Ray Train worker drives it (`start_engine`, the core's `train_steps`), in a
process of its own with a one-rank gloo group (this test process keeps no process group)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OVERLAP_ON_AND_OFF = r"""
import json, os, socket
import torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update({"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
from modrwkv import RWKV7Config
from modrwkv.batching import Collator
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.tokenizer import WorldTokenizer
from pipelines.deepspeed_engine import start_engine
from pipelines.train_config import DeepSpeedConfig, PhaseConfig
from pipelines.trainer import train_steps
from tests.conftest import random_backbone
from tests.pipelines.test_deepspeed_cuda import digit_like_batches

report = {}
for overlap in (False, True):
    torch.manual_seed(0)
    config = ModRWKVConfig(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16),
                           {"image": ProjectorConfig(encoder_dim=32, kernel=3, stride=2, adapter_scale=2)})
    model = ModRWKV(config, backbone=random_backbone(config.backbone))
    model.set_phase(2)
    hp = PhaseConfig(lr=3e-3, steps=4, global_batch=8, micro_batch=4)
    engine, optimizer = start_engine(model, hp, DeepSpeedConfig(zero_stage=2, overlap_comm=overlap), world=1,
                                     on_gpu=False)
    losses = []
    train_steps(engine, optimizer, digit_like_batches(Collator(WorldTokenizer(), config, max_length=64), 4), hp,
                on_step=lambda step, metrics: losses.append(metrics["loss"]))
    report[str(overlap)] = {"engine_overlaps": engine.zero_overlap_comm(), "losses": losses}
print(json.dumps(report))
"""


def test_overlap_comm_reaches_deepspeed_and_trains_as_without_it():
    done = subprocess.run([sys.executable, "-c", OVERLAP_ON_AND_OFF], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [report[k]["engine_overlaps"] for k in ("False", "True")] == [False, True]
    off, on = report["False"]["losses"], report["True"]["losses"]
    assert len(off) == 4 and off[-1] < off[0]
    assert on == pytest.approx(off, rel=1e-6)
