"""The DeepSpeed engine on the CPU as a Ray Train worker drives it (`start_engine`, the core's `train_steps`,
`save_final`), in a process of its own with a one-rank gloo group (this test process keeps no process group)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ONE_RANK = r"""
import json, os, socket
import torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update({"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
"""

OVERLAP_ON_AND_OFF = ONE_RANK + r"""
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


def run_script(script: str, *args: str) -> dict:
    """The JSON report `script` prints last."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_overlap_comm_reaches_deepspeed_and_trains_as_without_it():
    report = run_script(OVERLAP_ON_AND_OFF)
    assert [report[k]["engine_overlaps"] for k in ("False", "True")] == [False, True]
    off, on = report["False"]["losses"], report["True"]["losses"]
    assert len(off) == 4 and off[-1] < off[0]
    assert on == pytest.approx(off, rel=1e-6)


BF16_PHASE2_SAVED = ONE_RANK + r"""
import sys
from pathlib import Path
import deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file
from modrwkv import RWKV7Config
from modrwkv.batching import Collator
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.tokenizer import WorldTokenizer
from pipelines.deepspeed_engine import deepspeed_config, save_final
from pipelines.train_config import DeepSpeedConfig, PhaseConfig
from pipelines.trainer import optimizer_for, train_steps
from tests.conftest import random_backbone
from tests.pipelines.test_deepspeed_cuda import digit_like_batches

folder = sys.argv[1]
torch.manual_seed(0)
config = ModRWKVConfig(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16),
                       {"image": ProjectorConfig(encoder_dim=32, kernel=3, stride=2, adapter_scale=2)})
model = ModRWKV(config, backbone=random_backbone(config.backbone))
model.set_phase(2)
hp = PhaseConfig(lr=3e-3, steps=3, global_batch=8, micro_batch=4)
# the GPU's engine config (bf16 module, fp32 master partitions) on DeepSpeed's CPU accelerator
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_for(model, hp), dist_init_required=False,
                                               config=deepspeed_config(hp, DeepSpeedConfig(zero_stage=2), 1, True))
train_steps(engine, optimizer, digit_like_batches(Collator(WorldTokenizer(), config, max_length=64), 4), hp)
save_final(engine.module, Path(folder), phase=2, rank=0)
saved = {name: load_file(f"{folder}/{sub}/{file}") for name, sub, file in
         (("model", "model", "model.safetensors"), ("adapter", "adapter", "adapter.safetensors"))}
report = {"bf16": engine.bfloat16_enabled(), "params": {}}
for name, p in engine.module.named_parameters():
    master = safe_get_full_fp32_param(p)
    report["params"][name] = {
        "module_dtype": str(p.dtype), "saved_dtype": str(saved["model"][name].dtype),
        "saved_is_master": torch.equal(saved["model"][name], master),
        "saved_rounds_to_module": torch.equal(saved["model"][name].bfloat16(), p.detach()),
        "saved_is_module": torch.equal(saved["model"][name], p.detach().float()),
        "adapter_is_master": torch.equal(saved["adapter"][name], master) if name in saved["adapter"] else None}
print(json.dumps(report))
"""


def test_a_bf16_engine_saves_its_fp32_master_weights(tmp_path):
    """Under bf16 the module holds each trained tensor rounded to 8 significant bits; the saved model and adapter
    hold the optimizer's fp32 masters, whose rounding the module is."""
    report = run_script(BF16_PHASE2_SAVED, str(tmp_path))
    params = report["params"]
    assert report["bf16"] and len(params) > 50
    assert {p["module_dtype"] for p in params.values()} == {"torch.bfloat16"}
    assert {p["saved_dtype"] for p in params.values()} == {"torch.float32"}
    assert all(p["saved_is_master"] and p["saved_rounds_to_module"] for p in params.values())
    assert sum(not p["saved_is_module"] for p in params.values()) > len(params) / 2  # not the module's, widened
    adapter = {n: p["adapter_is_master"] for n, p in params.items() if not n.startswith("backbone.")}
    assert adapter and all(adapter.values())
