"""wkv7 kernels side by side: tokens/s forward and forward+backward, and max relative error vs fp64.

CPU (always): "chunked" vs "reference" at T = 4k (B=1, H=12, N=64, fp32).
CUDA (when a GPU is present): "triton" (step by step), "triton_chunked" (tf32 products, and tf32x3) and
flash-linear-attention's `chunk_rwkv7` (the "fla" backend, if installed), B=8, H=12, N=64, T = 1k, 4k, 16k, bf16
inputs; plus the fraction of the memory floor (inputs read once + y written once, at the card's peak bandwidth:
`PEAK_GBS` by its name, or --peak-gbs).
Packed rows: the same segments of spread lengths as one packed row (`cu_seqlens`) vs a right-padded
batch, real (non-pad) tokens/s; CPU: "chunked" at 4k tokens, fp32; CUDA: every GPU backend at 16k tokens, bf16.
Decode: one step (T = 1) with the state carried, B = 1 and 64, fp32; CPU: "reference" vs "chunked", CUDA: "triton"
vs "triton_chunked" (the CUDA default for every T until this measures the step kernel faster at T = 1).

    python benchmarks/wkv7_kernels.py [--out DIR] [--peak-gbs GBS]
"""

import argparse
import importlib.util
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import write_report  # noqa: E402
from modrwkv_kernels import packed_layout, wkv7  # noqa: E402


def inputs(B, T, H, N, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, N, generator=g)  # noqa: E731
    r, k, v = rand(), rand(), rand()
    w = -F.softplus(-2 * rand()) - 0.5
    kk = F.normalize(rand(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rand())
    return [x.to(device=device, dtype=dtype) for x in (r, w, k, v, a, b)]


def timed(fn, device, repeats=3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def max_rel_err(y, ref) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def fp64_output_and_gradients(xs):
    """y of the fp64 chunked form (equal to the fp64 reference) and the gradients of every input for a loss that
    weighs each output differently; the weights are returned for the other backends' backward."""
    leaves = [x.detach().double().requires_grad_() for x in xs]
    y, _ = wkv7(*leaves, backend="chunked")
    weights = torch.randn(y.shape, generator=torch.Generator(device=y.device).manual_seed(1), device=y.device)
    (y * weights.double()).sum().backward()
    return y.detach(), weights, [x.grad for x in leaves]


def segment_lengths(total: int, seed: int = 0) -> list[int]:
    """Lengths as spread as LLaVA-665K's samples (lognormal, median 300, clipped to [16, 2048]) filling `total`."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.empty(1).log_normal_(math.log(300), 1.0, generator=g).clamp(16, 2048)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def padded_batch(xs, lengths):
    """A packed row's segments [1, T, H, N] as a right-padded batch [S, longest, H, N]."""
    longest = max(lengths)
    return [torch.stack([F.pad(seg, (0, 0, 0, 0, 0, longest - len(seg))) for seg in x[0].split(lengths)]) for x in xs]


def packed_vs_padded(T, H, N, dtype, device, backends: dict) -> list[dict]:
    """Real tokens/s of each backend on one packed row and on the same segments right-padded."""
    lengths = segment_lengths(T)
    xs = inputs(1, T, H, N, dtype, device)
    layout = packed_layout(torch.tensor([0, *lengths], device=device).cumsum(0), T)  # once, as a model forward does
    where = {"device": device if device == "cpu" else torch.cuda.get_device_name(), "T": T,
             "segments": len(lengths), "longest": max(lengths), "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    for name, run in backends.items():
        for form, fn, args in (("packed", lambda *t, run=run: run(*t, cu_seqlens=layout), xs),
                               ("padded", run, padded_batch(xs, lengths))):
            # B = 1: tokens/s counts the T real tokens only, padded or not
            rows.append({**where, "layout": form, **bench_backend(name, fn, args, device, T, 1)})
    return rows


def decode_steps(device: str, backends: tuple[str, ...], H: int, N: int) -> list[dict]:
    """One decode step (T = 1, the state carried in and out, no gradient) per backend, at batch sizes 1 and 64:
    what generation runs once per token and layer, and what `default_backend` picks a backend for."""
    rows = []
    for B in (1, 64):
        xs = inputs(B, 1, H, N, torch.float32, device)
        state = torch.zeros(B, H, N, N, device=device)
        for name in backends:
            with torch.no_grad():
                seconds = timed(lambda: wkv7(*xs, initial_state=state, backend=name), device, repeats=50)
            rows.append({"device": device if device == "cpu" else torch.cuda.get_device_name(), "B": B,
                         "backend": name, "steps_per_s": 1 / seconds})
    return rows


def bench_backend(name, fn, xs, device, T, B):
    res = {"backend": name}
    with torch.no_grad():
        res["fwd_tok_s"] = B * T / timed(lambda: fn(*xs), device)
    leaves = [x.detach().requires_grad_() for x in xs]

    def fwd_bwd():
        fn(*leaves).float().sum().backward()

    res["fwd_bwd_tok_s"] = B * T / timed(fwd_bwd, device)
    return res


PEAK_GBS = {"H200": 4800.0, "H100": 3350.0}  # SXM memory bandwidth, GB/s, by what the card's name holds


def peak_bandwidth(device_name: str) -> float | None:
    """The card's memory bandwidth (GB/s) from its name; None for a card not in PEAK_GBS (no floor column)."""
    return next((gbs for card, gbs in PEAK_GBS.items() if card in device_name), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="device memory bandwidth in GB/s (default: the card's, for those in PEAK_GBS)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU rows (about a minute of a short GPU lease)")
    args = parser.parse_args()

    rows, packed, decode = [], [], []
    started = time.perf_counter()
    torch.set_num_threads(2)
    H, N = 12, 64
    if not args.no_cpu:
        T, B = 4096, 1
        xs = inputs(B, T, H, N, torch.float32, "cpu")
        ref64, _ = wkv7(*(x.double() for x in xs), backend="reference")
        for name in ("reference", "chunked"):
            fn = lambda *t, name=name: wkv7(*t, backend=name)[0]  # noqa: E731
            row = {"device": "cpu", "T": T, "B": B, "dtype": "fp32", **bench_backend(name, fn, xs, "cpu", T, B)}
            with torch.no_grad():
                row["max_rel_err_vs_fp64"] = max_rel_err(fn(*xs), ref64)
            rows.append(row)
        packed = packed_vs_padded(4096, H, N, torch.float32, "cpu",
                                  {"chunked": lambda *t, **kw: wkv7(*t, backend="chunked", **kw)[0]})
        decode = decode_steps("cpu", ("reference", "chunked"), H, N)

    if torch.cuda.is_available():
        from modrwkv_kernels.wkv7.triton_chunked import chosen_launches, wkv7_triton_chunked

        B = 8
        backends = {name: lambda *t, name=name, **kw: wkv7(*t, backend=name, **kw)[0]
                    for name in ("triton", "triton_chunked")}
        # its output rounded to the inputs' dtype, as the dispatcher rounds every other row's (kept in fp32, its
        # error came out 1.4e-7 against their 2e-3 from that rounding alone, and its timing wrote twice the bytes)
        backends["triton_chunked tf32x3"] = lambda *t, cu_seqlens=None: wkv7_triton_chunked(
            *t, layout=cu_seqlens, precision="tf32x3")[0].to(t[0].dtype)
        fla = {}
        if importlib.util.find_spec("fla") is not None:  # flash-linear-attention's chunk_rwkv7, last: it autotunes
            fla["fla chunk_rwkv7"] = lambda *t, **kw: wkv7(*t, backend="fla", **kw)[0]
        cases = {}  # each length's inputs, fp64 output and gradients, made once for every backend
        for T in (1024, 4096, 16384):
            xs = inputs(B, T, H, N, torch.bfloat16, "cuda")
            cases[T] = xs, *fp64_output_and_gradients(xs)
        peak = args.peak_gbs or peak_bandwidth(torch.cuda.get_device_name())

        def gpu_rows(name, fn):
            """The backend's rows at each length, then its packed and padded pair, each logged as it finishes."""
            for T, (xs, ref64, weights, grads64) in cases.items():
                row = {"device": torch.cuda.get_device_name(), "T": T, "B": B, "dtype": "bf16",
                       **bench_backend(name, fn, xs, "cuda", T, B)}
                leaves = [x.detach().requires_grad_() for x in xs]
                y = fn(*leaves)
                (y.float() * weights).sum().backward()
                row["max_rel_err_vs_fp64"] = max_rel_err(y.detach(), ref64)
                row["grad_max_rel_err_vs_fp64"] = max(max_rel_err(x.grad, g) for x, g in zip(leaves, grads64))
                floor_bytes = 7 * B * T * H * N * 2  # six inputs read, y written, bf16
                if peak:
                    row["fwd_frac_of_memory_floor"] = floor_bytes / (peak * 1e9) / (B * T / row["fwd_tok_s"])
                rows.append(row)
                print(f"[{time.perf_counter() - started:.0f}s] {row}", file=sys.stderr, flush=True)
            packed.extend(packed_vs_padded(16384, H, N, torch.bfloat16, "cuda", {name: fn}))
            print(f"[{time.perf_counter() - started:.0f}s] {packed[-2:]}", file=sys.stderr, flush=True)

        # backend-major, in the order the comparison needs them, each logged as it ends, so a short GPU lease cut
        # late keeps what came first: the CUDA default, the decode steps that decide its T = 1 default (fp32: their
        # own launches timed), fla's rows (its autotuning is long on a bare machine), then the step-by-step kernel
        # and tf32x3 (our launches timed again for its precision)
        gpu_rows("triton_chunked", backends.pop("triton_chunked"))
        decode += decode_steps("cuda", ("triton", "triton_chunked"), H, N)
        print(f"[{time.perf_counter() - started:.0f}s] {decode}", file=sys.stderr, flush=True)
        for name, fn in {**fla, **backends}.items():
            gpu_rows(name, fn)

    machine = f"{platform.machine()}, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only (2 threads)")
    lines = ["| device | T | B | dtype | backend | fwd tok/s | fwd+bwd tok/s | max rel err vs fp64 | gradients' |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grad_err = f"{r['grad_max_rel_err_vs_fp64']:.1e}" if "grad_max_rel_err_vs_fp64" in r else "-"
        lines.append(f"| {r['device']} | {r['T']} | {r['B']} | {r['dtype']} | {r['backend']} | {r['fwd_tok_s']:.0f} | "
                     f"{r['fwd_bwd_tok_s']:.0f} | {r['max_rel_err_vs_fp64']:.1e} | {grad_err} |")
    launches = chosen_launches() if torch.cuda.is_available() else {}
    lines += [f"\ntriton_chunked's {kernel} launched, by its autotuning's key: " + "; ".join(
        f"{key}: {launch}" for key, launch in chosen.items()) for kernel, chosen in launches.items()]
    cpu = {r["backend"]: r for r in rows if r["device"] == "cpu"}
    if cpu:
        lines.append(f"\nchunked vs reference at T={cpu['chunked']['T']} on CPU: forward "
                     f"{cpu['chunked']['fwd_tok_s'] / cpu['reference']['fwd_tok_s']:.1f}x, forward+backward "
                     f"{cpu['chunked']['fwd_bwd_tok_s'] / cpu['reference']['fwd_bwd_tok_s']:.1f}x")
    lines += ["", "| device | real tokens | segments (longest) | dtype | backend | layout | fwd tok/s "
              "| fwd+bwd tok/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['T']} | {r['segments']} ({r['longest']}) | {r['dtype']} | {r['backend']} | "
              f"{r['layout']} | {r['fwd_tok_s']:.0f} | {r['fwd_bwd_tok_s']:.0f} |" for r in packed]
    lines += ["", "| device | B | backend | decode steps/s (T = 1, state in and out) |", "|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['B']} | {r['backend']} | {r['steps_per_s']:.0f} |" for r in decode]
    write_report(args.out, "kernels", machine, rows + packed + decode + ([{"launches": launches}] if launches else []),
                 lines)


if __name__ == "__main__":
    main()
