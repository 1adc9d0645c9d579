"""Phase II training throughput at the paper's 0.4B shape: tokens/s and model FLOPs utilisation per wkv7 backend.

One training step as phase II runs it, in one process without Ray or DeepSpeed: ModRWKV (RWKV-7 0.4B: 24 layers
of 1024, head size 64, the World vocabulary; an image projector from SigLIP2-base features, 768 wide, 577 tokens
uncompressed as in the paper's Table 6), random init, phase II (backbone and projector trained), bf16 autocast
over fp32 weights, AdamW. Each step is one packed row of `--row-tokens` tokens: image-question samples (577
feature tokens + a lognormal text of median 120 tokens, context at most 2048) laid end to end with their
`cu_seqlens`, the loss on each answer (the text's second half). The same rows and weights run through each
backend in turn.

Model FLOPs per step: 6 x the blocks' parameters for every token in the rows, 6 x the projector's for each image
token, 6 x the head's for each labelled token (the head runs at labelled positions only), and the recurrence's own,
27 x layers x width x head size a token (forward and backward of `wkv7/reference.py`'s 9 N² a head and step: 2 % at
0.4B). The tokens are the rows' own (a row's last sample can be dropped short of `--row-tokens`). MFU divides by the
device's dense bf16 peak (`--peak-tflops`, H200/H100 SXM: 989).

With `--checkpointing off on` each backend runs again with the backbone's gradient checkpointing (the blocks'
activations recomputed in the backward pass): its peak memory and its cost in tokens/s; MFU counts model FLOPs
only, so the recomputation lowers it.

With `--compile off on` the rows run again with each backbone block under `torch.compile` (Dynamo stops at the
wkv7 kernels, which are compiled code of their own): what fusing the blocks' many small ops (token shift, LoRAs,
norms, the channel mix) gains in a launch-bound step.

With `--profile` one more step of each row runs under torch's profiler: where the step's device time goes (the
ops with the most self time, the count of kernels launched) and how much of the timed step the device was busy
(its kernels' summed time over the unprofiled step time: well under 1 means the host's launches, not the device,
set the pace).

    python benchmarks/phase2_throughput.py [--backends triton triton_chunked fla] [--checkpointing off on]
                                           [--compile off on] [--steps 5] [--out DIR]
    python benchmarks/phase2_throughput.py --shape tiny   # the CPU default: a few-layer model, seconds a step
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import write_report  # noqa: E402
from modrwkv import RWKV7, RWKV7Config  # noqa: E402
from modrwkv.conversation import IGNORE, PLACEHOLDER_IDS  # noqa: E402
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig  # noqa: E402
from pipelines.environment import cpu_description  # noqa: E402

SHAPES = {  # the paper's 0.4B backbone (RWKV-7 World 0.4B) and a tiny one for CPU runs
    "0.4b": {"backbone": RWKV7Config(vocab_size=65536, n_layer=24, n_embd=1024, head_size=64),
             "encoder_dim": 768, "image_tokens": 577, "context": 2048, "row_tokens": 16384},
    "tiny": {"backbone": RWKV7Config(vocab_size=65536, n_layer=2, n_embd=128, head_size=64),
             "encoder_dim": 64, "image_tokens": 64, "context": 256, "row_tokens": 1024},
}


def sample_lengths(total: int, image_tokens: int, context: int, seed: int) -> list[int]:
    """Sample lengths (image tokens + lognormal text, median 120) filling `total` tokens; the last one trimmed."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        text = int(torch.empty(1).log_normal_(math.log(120), 0.8, generator=g).clamp(8, context - image_tokens))
        lengths.append(image_tokens + text)
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] <= image_tokens:
        lengths.pop()
    return lengths


def packed_row(lengths, image_tokens, encoder_dim, vocab, device, seed):
    """input ids [1, T] (an <image> run, then text), labels on each text's second half, features, cu_seqlens: the
    features on `device`, the layout (ids, labels, offsets) on the host, as training hands them to the model."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for n in lengths:
        text = torch.randint(1, vocab - 16, (n - image_tokens,), generator=g)
        ids += [torch.full((image_tokens,), PLACEHOLDER_IDS["image"]), text]
        answer = text.clone()
        answer[: len(text) // 2] = IGNORE
        labels += [torch.full((image_tokens,), IGNORE), answer]
    features = [[("image", torch.randn(image_tokens, encoder_dim, generator=g).to(device))] for _ in lengths]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    return torch.cat(ids)[None], torch.cat(labels)[None], features, cu_seqlens


def model_flops_per_step(model: ModRWKV, tokens: float, image_tokens: float, labelled: float) -> float:
    """Model FLOPs of a training step (forward and backward) over `tokens`, of which `image_tokens` go through the
    projector and `labelled` through the head."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    head, embedding, projectors = count(model.backbone.head), count(model.backbone.emb), count(model.projectors)
    blocks = count(model) - head - embedding - projectors
    c = model.config.backbone
    recurrence = 27 * c.n_layer * c.n_embd * c.head_size
    return 6.0 * (blocks * tokens + projectors * image_tokens + head * labelled) + recurrence * tokens


def build_model(shape, device, seed=0) -> ModRWKV:
    torch.manual_seed(seed)
    config = ModRWKVConfig(backbone=shape["backbone"], projectors={
        "image": ProjectorConfig(encoder_dim=shape["encoder_dim"], normalize="none")})
    model = ModRWKV(config, backbone=RWKV7(shape["backbone"]).init_weights()).to(device)
    model.set_phase(2)
    return model.train()


def profile_summary(prof, device: str, seconds_per_step: float, top: int = 15) -> dict:
    """The profiled step's device time (on a GPU its kernels', each counted once: an op's self device time would
    count them again; on a CPU the ops' own time), its top entries and their count; `busy` is that time over the
    unprofiled step's."""
    if device == "cuda":
        entries = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        self_time = lambda e: e.self_device_time_total  # noqa: E731
    else:
        entries, self_time = list(prof.key_averages()), lambda e: e.self_cpu_time_total  # noqa: E731
    total_us = sum(self_time(e) for e in entries)
    ranked = sorted(entries, key=self_time, reverse=True)[:top]
    return {"device_ms": total_us / 1e3, "busy": total_us / 1e6 / seconds_per_step,
            "calls": sum(e.count for e in entries),
            "top": [{"name": e.key, "calls": e.count, "ms": self_time(e) / 1e3, "share": self_time(e) / total_us}
                    for e in ranked]}


def run_backend(backend, model, initial, shape, device, steps, seed=0, checkpointing=False, compiled=False,
                profile=False) -> dict:
    """`steps` timed training steps (after one warm-up) from the weights `initial`, the wkv7 recurrence on
    `backend`; with `profile`, one more step under torch's profiler."""
    os.environ["MODRWKV_WKV7_BACKEND"] = backend
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)  # a row that failed mid-step (out of memory) left its gradients behind
    model.backbone.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    vocab = shape["backbone"].vocab_size
    rows = [packed_row(sample_lengths(shape["row_tokens"], shape["image_tokens"], shape["context"], seed + i),
                       shape["image_tokens"], shape["encoder_dim"], vocab, device, seed + i) for i in range(steps + 1)]

    def step(ids, labels, features, cu_seqlens):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(ids, features, labels=labels, return_logits=False, cu_seqlens=cu_seqlens)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first_loss = step(*rows[0]).item()  # warm-up: compiles the kernels (and times their launches: a 256 MiB buffer)
    sync()
    if device == "cuda":  # the timed steps' peak, as the first configuration of a run and the later ones alike
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step(*row) for row in rows[1:]]
    sync()
    seconds = (time.perf_counter() - started) / steps
    timed = rows[1:]  # their own tokens and samples: a row's last sample may have been dropped
    tokens = sum(int(cu_seqlens[-1]) for _, _, _, cu_seqlens in timed) / steps
    image = sum(int((ids == PLACEHOLDER_IDS["image"]).sum()) for ids, _, _, _ in timed) / steps
    labelled = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, _, _ in timed) / steps
    flops = model_flops_per_step(model, tokens, image, labelled)
    result = {"backend": backend, "checkpointing": checkpointing, "compiled": compiled, "tokens_per_step": tokens,
              "samples_per_step": sum(len(cu_seqlens) - 1 for _, _, _, cu_seqlens in timed) / steps,
              "seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "model_tflops": flops / seconds / 1e12,
              "first_loss": first_loss, "last_loss": float(losses[-1])}
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            step(*rows[-1])
            sync()
        result["profile"] = profile_summary(prof, device, seconds)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.4b" if cuda else "tiny")
    parser.add_argument("--backends", nargs="+", default=["triton", "triton_chunked", "fla"] if cuda else ["chunked"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="the backbone's gradient checkpointing, each given value in turn")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                        help="the backbone's blocks under torch.compile, each given value in turn (off first)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--row-tokens", type=int, help="tokens a packed row holds at most (the shape's by default: "
                                                       "16,384 at 0.4B); fewer for a GPU of less memory")
    parser.add_argument("--profile", action="store_true", help="profile one more step of each row: top ops by "
                                                               "device time, kernels launched, device busy share")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    shape = {**SHAPES[args.shape], **({"row_tokens": args.row_tokens} if args.row_tokens else {})}
    if shape["row_tokens"] < shape["context"]:
        parser.error(f"--row-tokens must hold one sample of the context, {shape['context']} tokens or more")
    started = time.perf_counter()
    model = build_model(shape, device)
    # every backend starts from these; on the host: held on the GPU they were 1.7 GiB of its peak memory at 0.4B
    initial = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    print(f"[{time.perf_counter() - started:.0f}s] model built", file=sys.stderr, flush=True)
    rows, blocks_compiled = [], False
    for compiled, backend, checkpointing in [(c == "on", b, ck) for c in sorted(set(args.compile))
                                             for b in args.backends for ck in args.checkpointing]:
        if compiled and not blocks_compiled:  # once, for every row after: the eager rows came first
            for block in model.backbone.blocks:
                block.compile(dynamic=True)  # packed rows differ in their segments: one graph for all
            blocks_compiled = True
        try:
            row = run_backend(backend, model, initial, shape, device, args.steps,
                              checkpointing=checkpointing == "on", compiled=compiled, profile=args.profile)
        except Exception as error:  # an optional backend that is not installed leaves its row out, named
            print(f"{backend}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        row["mfu"] = row["model_tflops"] / args.peak_tflops if cuda else None
        rows.append(row)
        print(f"[{time.perf_counter() - started:.0f}s] {row}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if cuda else f"CPU ({cpu_description()}, {torch.get_num_threads()} threads)"
    machine = f"{where}, torch {torch.__version__}; shape {args.shape}, rows of up to {shape['row_tokens']} tokens"
    lines = ["| backend | checkpointing | compiled | samples / step | s / step | tokens/s | model TFLOP/s | MFU | "
             "peak GiB | loss first -> last |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['backend']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{'yes' if r['compiled'] else 'no'} | {r['samples_per_step']:.1f} | "
                     f"{r['seconds_per_step']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.1f} | {mfu} | {r.get('peak_memory_gib', 0):.1f} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            what = "kernels" if device == "cuda" else "ops"
            lines += ["", f"{r['backend']}, checkpointing {'on' if r['checkpointing'] else 'off'}"
                      f"{', compiled' if r['compiled'] else ''}: the profiled step's "
                      f"{p['calls']} {what} took {p['device_ms']:.1f} ms, {p['busy']:.0%} of the timed step",
                      "", f"| {what[:-1]} | calls | ms | share |", "|---|---|---|---|"]
            lines += [f"| {o['name'][:90]} | {o['calls']} | {o['ms']:.2f} | {o['share']:.1%} |" for o in p["top"]]
    write_report(args.out, "phase2_throughput", machine, rows, lines)


if __name__ == "__main__":
    main()
