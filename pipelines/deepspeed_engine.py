"""The DeepSpeed side of training, without Ray: the engine's config from ours, the engine itself around the
training core's model and optimizer, and the final save. A Ray Train worker (`train_loop.py`) uses these, and so
can a single process that sets up torch.distributed itself (the GPU test)."""

import os
import warnings
from pathlib import Path

import torch

from modrwkv.checkpoint import cpu_state_dict
from modrwkv.model_folder import in_adapter

from .train_config import DeepSpeedConfig, PhaseConfig
from .trainer import accumulation_steps, optimizer_for


def deepspeed_config(hp: PhaseConfig, ds: DeepSpeedConfig, world: int, on_gpu: bool) -> dict:
    config = {"train_micro_batch_size_per_gpu": hp.micro_batch,
              "gradient_accumulation_steps": accumulation_steps(hp, world), "gradient_clipping": hp.grad_clip,
              "zero_optimization": {"stage": ds.zero_stage}, "bf16": {"enabled": on_gpu},
              "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    if on_gpu and ds.zero_stage:
        # bf16 parameters, but each step's gradients summed over its micro-steps in fp32 (DeepSpeed sums in the
        # parameters' dtype by default); ZeRO 1 and 2 keep that sum in their own fp32 partition, while without ZeRO
        # DeepSpeed has no such mode (it refuses the setting)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif on_gpu and config["gradient_accumulation_steps"] > 1:
        warnings.warn(f"deepspeed.zero_stage 0 on a GPU sums each step's {config['gradient_accumulation_steps']} "
                      "micro-batch gradients in bf16 (DeepSpeed has no fp32 sum without ZeRO), which rounds away "
                      "the small ones; zero_stage 1 sums them in fp32 at the same memory", stacklevel=2)
    if ds.overlap_comm:
        config["zero_optimization"]["overlap_comm"] = True
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed refuses a client optimizer under offload unless told, for fear of a slow CPU step; ours is
        # torch's fused AdamW (one pass per partition), and its DeepSpeedCPUAdam is a C++ op built on first use
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def start_engine(model: torch.nn.Module, hp: PhaseConfig, ds: DeepSpeedConfig, world: int, on_gpu: bool):
    """A DeepSpeed engine for `model` (its phase set) and the core's AdamW, on the process group already set up
    (Ray Train's, or the caller's); returns (engine, optimizer)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator once, at import

    if not on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build: over a minute on 2 cores,
        # per install) that only tensor-parallel inference calls; training all-reduces through torch.distributed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_for(model, hp),
                                                   dist_init_required=False,
                                                   config=deepspeed_config(hp, ds, world, on_gpu))
    if not (engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization()):
        measure_grad_norm(engine)
    return engine, optimizer


def measure_grad_norm(engine) -> None:
    """Without ZeRO or bf16 DeepSpeed clips the fp32 gradients but keeps no norm (`get_global_grad_norm()` is
    None): the engine measures it as LocalEngine does, at each accumulation boundary, from the gradients its step
    clips by (already averaged over the workers), before the step clips and zeroes them; clipping off too."""
    step, last = engine.step, []

    def step_measuring_norm(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            last[:] = [torch.nn.utils.get_total_norm(grads)]  # kept on the device until the step's metrics
        return step(*args, **kwargs)

    engine.step = step_measuring_norm
    engine.get_global_grad_norm = lambda: float(last[0]) if last else None


def save_final(engine, folder: Path, phase: int, rank: int) -> None:
    """Phase I: the projectors only (adapter-only save); phase II: the whole model, and the adapter beside it.
    The trained tensors saved are the optimizer's fp32 master weights, not the bf16 module's rounding of them
    (8 significant bits: the next phase would start from, and inference run on, weights no step produced).
    Called on every rank (under ZeRO each master tensor is assembled from the ranks' partitions: a collective)."""
    model = engine.module
    masters = fp32_master_weights(model, engine.optimizer, rank)
    if rank == 0:
        def rest(name: str) -> bool:  # the buffers and untrained tensors written (phase I's adapter: no backbone)
            return name not in masters and (phase == 2 or in_adapter(name))

        state = {**cpu_state_dict(model, rest), **masters}
        model.save_pretrained(folder / "model", adapter_only=phase == 1, state_dict=state)
        if phase == 2:
            model.save_pretrained(folder / "adapter", adapter_only=True, state_dict=state)


def fp32_master_weights(model: torch.nn.Module, optimizer, rank: int) -> dict[str, torch.Tensor]:
    """Name -> the optimizer's fp32 copy of each trained parameter, on the CPU of rank 0 (other ranks: empty, after
    taking part in the collectives). An fp32 parameter with no copy is its own; a bf16 one with none is an error,
    never saved rounded."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    copies = {}
    if isinstance(optimizer, FP16_UnfusedOptimizer):  # bf16 without ZeRO: whole fp32 copies, group by group
        copies = {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                  for lp, hp in zip(lps, hps)}
    masters = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO 1 and 2 (every rank maps the same parameters, so all take part in each all-reduce, in order)
        master = copies[id(p)] if id(p) in copies else safe_get_full_fp32_param(p)
        if master is None and p.dtype != torch.float32:
            raise RuntimeError(f"{name}: the optimizer ({type(optimizer).__name__}) keeps no fp32 copy of this "
                               f"{p.dtype} parameter to save")
        if rank == 0:
            masters[name] = (p if master is None else master).detach().contiguous().cpu()
    return masters
