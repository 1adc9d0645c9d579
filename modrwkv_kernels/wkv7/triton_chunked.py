"""The wkv7 recurrence as chunked Triton kernels: inside a chunk of L steps everything is matrix products.

The derivation is the one in `chunked.py` (the PyTorch form, its reference beside it). Per chunk, from the state
S at its start (value x key), with G_t the inclusive cumulative log-decay since the chunk start, Gx_t the
exclusive one and G_L the chunk's total (rows are steps):

    Ã = a e^{Gx}   B̃ = b e^{-G}   K̃ = k e^{-G}   R̃ = r e^{G}   B̂ = b e^{G_L - G}   K̂ = k e^{G_L - G}
    M_ab = tril₋(Ã B̃ᵀ)   M_ak = tril₋(Ã K̃ᵀ)   M_rb = tril(R̃ B̃ᵀ)   M_rk = tril(R̃ K̃ᵀ)  (tril₋: strictly lower)
    U  = (I - M_ab)⁻¹ (Ã Sᵀ + M_ak V)                     u_t = S_{t-1} a_t, the in-context-learning term
    Y  = R̃ Sᵀ + M_rb U + M_rk V
    S' = S diag(e^{G_L}) + Uᵀ B̂ + Vᵀ K̂

(I - M_ab)⁻¹ of the nilpotent M_ab is the product (I + M)(I + M²)(I + M⁴)... over log2(L) factors. The decay
floor of `chunked.py` keeps e^{-G} below e^{L·5} = e^80 for L = 16, inside fp32.

The backward is the reverse of those lines, read bottom to top (dX is the loss's gradient by X; the masks of
the M's apply to their gradients too):

    dS  = dS' e^{G_L} + dYᵀ R̃ + dPᵀ Ã                   dU = B̂ dS'ᵀ + M_rbᵀ dY     dP = (I - M_ab)⁻ᵀ dU
    dV  = K̂ dS'ᵀ + M_rkᵀ dY + M_akᵀ dP                  dB̂ = U dS'    dK̂ = V dS'
    dM_rb = dY Uᵀ   dM_rk = dY Vᵀ   dM_ab = dP Uᵀ   dM_ak = dP Vᵀ
    dR̃ = dY S + dM_rb B̃ + dM_rk K̃    dÃ = dP S + dM_ab B̃ + dM_ak K̃
    dB̃ = dM_abᵀ Ã + dM_rbᵀ R̃         dK̃ = dM_akᵀ Ã + dM_rkᵀ R̃

then through the exponentials to r, k, a, b and the cumulative log-decays, and through the cumulative sums to
each step's log-decay (reverse cumulative sums), and w.

The state's rows (value indices) evolve independently, so both kernels run one program per (segment, head,
block of BLOCK_V rows), walking the segment's chunks in order (backward: in reverse, from fp32 checkpoints of
the state at each chunk start written by the forward). The key-side gradients (r, w, k, a, b) sum over rows:
each row block writes its part and the sum runs after the kernel, with no atomics.

Packed input: offsets `cu` [S + 1] of segments in one row (a batch [B, T] is B segments of T steps); a segment's
chunks start at its first step, its last chunk is masked past its end (identity steps: no input, decay 1).
Tested on CPU under TRITON_INTERPRET=1 against the fp64 reference.
"""

import functools
import os

import torch
import triton
import triton.language as tl
import triton.testing

from ..layout import CHUNK, rows_layout
from .chunked import LOG_DECAY_FLOOR, no_steps
from .triton_kernel import _checkpoint_offset, _segment, _step_offset, checkpoints, differentiable

# How each kernel launches, chosen on the GPU it runs on by timing each (`triton.autotune`, on the first call per
# head size, heads, dtypes, precision and `programs_class`; the choice kept on disk in Triton's cache, so later
# processes repeat it): state rows per program (32: twice the programs, each redoing its chunk's key-side work; 64:
# once) and warps (at 4 ptxas spills the backward's registers: 576 bytes a thread on sm_90 in
# bf16, 192 at 8; `cuda_compile.py` reports). A key's first call times every launch: a device wait and a 256 MiB
# buffer (Triton's L2 flush) mid-run where a new key comes up; ranks may choose differently (their results differ
# in rounding). MODRWKV_WKV7_LAUNCH="rows,warps" (e.g. "64,8") pins one launch and times none (read at a key's
# first call in a process: set it before).
LAUNCHES = [triton.Config({"BLOCK_V": rows}, num_warps=warps) for rows in (32, 64) for warps in (4, 8)]
LAUNCH_ENV = "MODRWKV_WKV7_LAUNCH"


def pinned_launch() -> tuple[int, int] | None:
    """(rows, warps) of the launch MODRWKV_WKV7_LAUNCH names, one of LAUNCHES; under the interpreter, which computes
    every launch alike and can time none, the first; else None."""
    offered = [(launch.kwargs["BLOCK_V"], launch.num_warps) for launch in LAUNCHES]
    value = os.environ.get(LAUNCH_ENV)
    if value is None:
        return offered[0] if os.environ.get("TRITON_INTERPRET") == "1" else None
    named = tuple(int(x) for x in value.split(",") if x.strip().isdigit())
    if named not in offered:
        raise ValueError(f"{LAUNCH_ENV}={value!r}: expected 'rows,warps', one of "
                         + ", ".join(f"'{rows},{warps}'" for rows, warps in offered))
    return named


def _launches_for(configs, named_args, **kwargs):
    """The launches to time: the pinned one alone, else each of `configs`; row blocks no taller than the state's
    padded height."""
    pinned = pinned_launch()
    wanted = [pinned] if pinned else [(c.kwargs["BLOCK_V"], c.num_warps) for c in configs]
    fitting = dict.fromkeys((min(rows, kwargs["BLOCK_N"]), warps) for rows, warps in wanted)
    return [triton.Config({"BLOCK_V": rows}, num_warps=warps) for rows, warps in fitting]


def _timed(kernel_call, quantiles):
    """Triton's timing of one launch; none where a launch is pinned (Triton before 3.9 times even a single one, and
    the interpreter has no device to time on)."""
    if pinned_launch() is not None:
        return [0.0] * len(quantiles)
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def _tuned(key: list[str]):
    return triton.autotune(LAUNCHES, key=key, prune_configs_by={"early_config_prune": _launches_for},
                           do_bench=_timed, cache_results=True)


@triton.jit
def _chunk_terms(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, key_off, key_mask, steps, FLOOR: tl.constexpr,
                 L: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk's key-side tiles [L, BLOCK_N] and the four masked [L, L] interaction matrices."""
    r = tl.load(r_ptr + key_off, mask=key_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + key_off, mask=key_mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + key_off, mask=key_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + key_off, mask=key_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + key_off, mask=key_mask, other=float("-inf")).to(tl.float32)
    log_decay = tl.maximum(-tl.exp(w), FLOOR)  # masked steps: -exp(-inf) = 0, decay 1
    G = tl.cumsum(log_decay, axis=0)
    G_L = tl.sum(tl.where(steps[:, None] == L - 1, G, 0.0), axis=0)
    a_t = a * tl.exp(G - log_decay)
    b_t = b * tl.exp(-G)
    k_t = k * tl.exp(-G)
    r_t = r * tl.exp(G)
    b_h = b * tl.exp(G_L[None, :] - G)
    k_h = k * tl.exp(G_L[None, :] - G)
    strict = steps[:, None] > steps[None, :]
    lower = steps[:, None] >= steps[None, :]
    M_ab = tl.where(strict, tl.dot(a_t, tl.trans(b_t), input_precision=PRECISION), 0.0)
    M_ak = tl.where(strict, tl.dot(a_t, tl.trans(k_t), input_precision=PRECISION), 0.0)
    M_rb = tl.where(lower, tl.dot(r_t, tl.trans(b_t), input_precision=PRECISION), 0.0)
    M_rk = tl.where(lower, tl.dot(r_t, tl.trans(k_t), input_precision=PRECISION), 0.0)
    return log_decay, w, G_L, a_t, b_t, k_t, r_t, b_h, k_h, M_ab, M_ak, M_rb, M_rk


@triton.jit
def _unit_lower_inverse(M, steps, SQUARINGS: tl.constexpr, PRECISION: tl.constexpr):
    """(I - M)⁻¹ for a strictly lower triangular [L, L] M: (I + M)(I + M²)(I + M⁴)..., M^L = 0 (L = 2^(1 + SQUARINGS))."""
    eye = tl.where(steps[:, None] == steps[None, :], 1.0, 0.0)
    inverse = eye + M
    power = M
    for _ in tl.static_range(SQUARINGS):
        power = tl.dot(power, power, input_precision=PRECISION)
        inverse = inverse + tl.dot(inverse, power, input_precision=PRECISION)
    return inverse


@triton.jit
def _program(cu_ptr, chunk_cu_ptr, H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr,
             BLOCK_N: tl.constexpr, L: tl.constexpr):
    """Program (segment, head, row block): its head, segment, first step, length, first chunk, chunk count, its
    rows and columns with their masks, and its state tile's mask and offsets in an N x N matrix."""
    pid = tl.program_id(0).to(tl.int64)
    h, bos, T, c0, n_chunks = _segment(cu_ptr, chunk_cu_ptr, pid, H, L)
    rows = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < N, cols < N
    return (h, pid, bos, T, c0, n_chunks,
            rows, row_mask, cols, col_mask, row_mask[:, None] & col_mask[None, :], rows[:, None] * N + cols[None, :])


# the packed layout's sizes vary with every row: specialised (Triton compiles a variant for an integer divisible by
# 16), a training run recompiled both kernels whenever a row's count crossed that, inside timed steps
@_tuned(["H", "N", "PRECISION", "KEEP_CHECKPOINTS", "programs_class"])
@triton.jit(do_not_specialize=["total_chunks", "programs_class"])
def _chunk_fwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr,  # inputs [T_all, H, N]; s0 [S, H, N, N]
    y_ptr, sT_ptr, ckpt_ptr,  # y [T_all, H, N] fp32; final states [S, H, N, N]; checkpoints [H, chunks, N, N]
    cu_ptr, chunk_cu_ptr, total_chunks, programs_class,  # programs_class: read by the autotuning alone
    H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, L: tl.constexpr,
    FLOOR: tl.constexpr, SQUARINGS: tl.constexpr, PRECISION: tl.constexpr, HAS_S0: tl.constexpr,
    KEEP_CHECKPOINTS: tl.constexpr,
):
    (h, pid, bos, T, c0, n_chunks, rows, row_mask, cols, col_mask, tile_mask,
     tile_off) = _program(cu_ptr, chunk_cu_ptr, H, N, BLOCK_V, BLOCK_N, L)
    if HAS_S0:
        S = tl.load(s0_ptr + pid * N * N + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    steps = tl.arange(0, L)
    for c in range(0, n_chunks):
        if KEEP_CHECKPOINTS:  # for the backward; inference needs none
            tl.store(ckpt_ptr + _checkpoint_offset(h, total_chunks, c0, c, N) + tile_off, S, mask=tile_mask)
        t = c * L + steps
        step_off = _step_offset(bos, t, H, h, N)
        key_mask = (t < T)[:, None] & col_mask[None, :]
        val_mask = (t < T)[:, None] & row_mask[None, :]
        _, _, G_L, a_t, b_t, k_t, r_t, b_h, k_h, M_ab, M_ak, M_rb, M_rk = _chunk_terms(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, step_off[:, None] + cols[None, :], key_mask, steps, FLOOR, L,
            PRECISION)
        V = tl.load(v_ptr + step_off[:, None] + rows[None, :], mask=val_mask, other=0.0).to(tl.float32)
        P = tl.dot(a_t, tl.trans(S), input_precision=PRECISION) + tl.dot(M_ak, V, input_precision=PRECISION)
        U = tl.dot(_unit_lower_inverse(M_ab, steps, SQUARINGS, PRECISION), P, input_precision=PRECISION)
        Y = (tl.dot(r_t, tl.trans(S), input_precision=PRECISION) + tl.dot(M_rb, U, input_precision=PRECISION)
             + tl.dot(M_rk, V, input_precision=PRECISION))
        tl.store(y_ptr + step_off[:, None] + rows[None, :], Y, mask=val_mask)
        S = (S * tl.exp(G_L)[None, :] + tl.dot(tl.trans(U), b_h, input_precision=PRECISION)
             + tl.dot(tl.trans(V), k_h, input_precision=PRECISION))
    tl.store(sT_ptr + pid * N * N + tile_off, S, mask=tile_mask)


@_tuned(["H", "N", "PRECISION", "programs_class"])
@triton.jit(do_not_specialize=["total_chunks", "part_stride", "programs_class"])
def _chunk_bwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, ckpt_ptr, dy_ptr, dsT_ptr,
    dr_ptr, dw_ptr, dk_ptr, da_ptr, db_ptr,  # [row blocks, T_all, H, N] fp32: each block's part, summed after
    dv_ptr, ds0_ptr,  # dv [T_all, H, N]; ds0 [S, H, N, N]
    cu_ptr, chunk_cu_ptr, total_chunks, part_stride, programs_class,
    H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, L: tl.constexpr,
    FLOOR: tl.constexpr, SQUARINGS: tl.constexpr, PRECISION: tl.constexpr, HAS_DST: tl.constexpr,
):
    (h, pid, bos, T, c0, n_chunks, rows, row_mask, cols, col_mask, tile_mask,
     tile_off) = _program(cu_ptr, chunk_cu_ptr, H, N, BLOCK_V, BLOCK_N, L)
    part = tl.program_id(1).to(tl.int64) * part_stride  # past 2^31 from 524k steps at C = 2048
    if HAS_DST:
        dS = tl.load(dsT_ptr + pid * N * N + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    steps = tl.arange(0, L)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        S = tl.load(ckpt_ptr + _checkpoint_offset(h, total_chunks, c0, c, N) + tile_off, mask=tile_mask, other=0.0)
        t = c * L + steps
        step_off = _step_offset(bos, t, H, h, N)
        key_off = step_off[:, None] + cols[None, :]
        key_mask = (t < T)[:, None] & col_mask[None, :]
        val_off = step_off[:, None] + rows[None, :]
        val_mask = (t < T)[:, None] & row_mask[None, :]
        log_decay, w, G_L, a_t, b_t, k_t, r_t, b_h, k_h, M_ab, M_ak, M_rb, M_rk = _chunk_terms(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, key_off, key_mask, steps, FLOOR, L, PRECISION)
        V = tl.load(v_ptr + val_off, mask=val_mask, other=0.0).to(tl.float32)
        dY = tl.load(dy_ptr + val_off, mask=val_mask, other=0.0).to(tl.float32)
        inverse = _unit_lower_inverse(M_ab, steps, SQUARINGS, PRECISION)
        U = tl.dot(inverse, tl.dot(a_t, tl.trans(S), input_precision=PRECISION)
                   + tl.dot(M_ak, V, input_precision=PRECISION), input_precision=PRECISION)
        strict = steps[:, None] > steps[None, :]
        lower = steps[:, None] >= steps[None, :]

        # S' = S e^{G_L} + Uᵀ B̂ + Vᵀ K̂
        decay_L = tl.exp(G_L)
        dG_L = tl.sum(S * dS, axis=0) * decay_L
        dS_prev = dS * decay_L[None, :]
        dU = tl.dot(b_h, tl.trans(dS), input_precision=PRECISION)
        dV = tl.dot(k_h, tl.trans(dS), input_precision=PRECISION)
        db_h = tl.dot(U, dS, input_precision=PRECISION)
        dk_h = tl.dot(V, dS, input_precision=PRECISION)
        # Y = R̃ Sᵀ + M_rb U + M_rk V
        dr_t = tl.dot(dY, S, input_precision=PRECISION)
        dS_prev += tl.dot(tl.trans(dY), r_t, input_precision=PRECISION)
        dM_rb = tl.where(lower, tl.dot(dY, tl.trans(U), input_precision=PRECISION), 0.0)
        dM_rk = tl.where(lower, tl.dot(dY, tl.trans(V), input_precision=PRECISION), 0.0)
        dU += tl.dot(tl.trans(M_rb), dY, input_precision=PRECISION)
        dV += tl.dot(tl.trans(M_rk), dY, input_precision=PRECISION)
        # U = (I - M_ab)⁻¹ P,  P = Ã Sᵀ + M_ak V
        dP = tl.dot(tl.trans(inverse), dU, input_precision=PRECISION)
        dM_ab = tl.where(strict, tl.dot(dP, tl.trans(U), input_precision=PRECISION), 0.0)
        dM_ak = tl.where(strict, tl.dot(dP, tl.trans(V), input_precision=PRECISION), 0.0)
        da_t = tl.dot(dP, S, input_precision=PRECISION)
        dS_prev += tl.dot(tl.trans(dP), a_t, input_precision=PRECISION)
        dV += tl.dot(tl.trans(M_ak), dP, input_precision=PRECISION)
        # the interaction matrices
        da_t += tl.dot(dM_ab, b_t, input_precision=PRECISION) + tl.dot(dM_ak, k_t, input_precision=PRECISION)
        dr_t += tl.dot(dM_rb, b_t, input_precision=PRECISION) + tl.dot(dM_rk, k_t, input_precision=PRECISION)
        db_t = (tl.dot(tl.trans(dM_ab), a_t, input_precision=PRECISION)
                + tl.dot(tl.trans(dM_rb), r_t, input_precision=PRECISION))
        dk_t = (tl.dot(tl.trans(dM_ak), a_t, input_precision=PRECISION)
                + tl.dot(tl.trans(dM_rk), r_t, input_precision=PRECISION))
        # through the exponentials: x̃ = x e^{±G}, so dx = dx̃ x̃ / x, and dG collects ±dx̃ x̃
        G = tl.cumsum(log_decay, axis=0)
        tl.store(dr_ptr + part + key_off, dr_t * tl.exp(G), mask=key_mask)
        tl.store(da_ptr + part + key_off, da_t * tl.exp(G - log_decay), mask=key_mask)
        tl.store(db_ptr + part + key_off, db_t * tl.exp(-G) + db_h * tl.exp(G_L[None, :] - G), mask=key_mask)
        tl.store(dk_ptr + part + key_off, dk_t * tl.exp(-G) + dk_h * tl.exp(G_L[None, :] - G), mask=key_mask)
        tl.store(dv_ptr + val_off, dV, mask=val_mask)
        hat = db_h * b_h + dk_h * k_h
        dG = dr_t * r_t - db_t * b_t - dk_t * k_t - hat
        dGx = da_t * a_t
        dG_L += tl.sum(hat, axis=0)
        # G_t = Σ_{s<=t} ld_s, Gx_t = Σ_{s<t} ld_s, G_L = Σ_s ld_s
        d_log_decay = (tl.sum(dG, axis=0)[None, :] - tl.cumsum(dG, axis=0) + dG
                       + tl.sum(dGx, axis=0)[None, :] - tl.cumsum(dGx, axis=0) + dG_L[None, :])
        floored = -tl.exp(w) < FLOOR
        tl.store(dw_ptr + part + key_off, tl.where(floored, 0.0, d_log_decay * log_decay), mask=key_mask)
        dS = dS_prev
    tl.store(ds0_ptr + pid * N * N + tile_off, dS, mask=tile_mask)


def _meta(N: int, precision: str) -> dict:
    block_n = max(16, triton.next_power_of_2(N))  # tl.dot needs every side >= 16
    return {"N": N, "BLOCK_N": block_n, "L": CHUNK, "FLOOR": LOG_DECAY_FLOOR, "SQUARINGS": CHUNK.bit_length() - 2,
            "PRECISION": precision}


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def programs_class(programs: int, device: torch.device) -> int:
    """0, 1 or 2 for fewer (segment, head) programs than the GPU has SMs, up to four times as many, or more: where
    32-row blocks' doubled programs fill the GPU and where halving their key-side work pays. The autotuning keys on
    it, so a launch chosen for a few long rows is not kept for many (it retimes once per class)."""
    sms = _multiprocessors(device)
    return 0 if programs < sms else 1 if programs < 4 * sms else 2


def _launch_args(programs: int, N: int, device: torch.device) -> tuple:
    """The grid for `programs` (segment, head) pairs, which notes in `ran` each launch's rows (the last: the
    launch that ran after any timing; `best_config`, one for the process, may be another thread's), and the
    programs' class."""
    ran = {}

    def grid(launch):
        ran["BLOCK_V"] = launch["BLOCK_V"]
        return programs, triton.cdiv(N, launch["BLOCK_V"])

    return grid, ran, programs_class(programs, device)


class WKV7TritonChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, layout, precision, differentiable):
        B, T, H, N = r.shape
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        layout = layout or rows_layout(B, T, r.device)
        cu, chunk_cu, total_chunks = layout.step_offsets, layout.chunk_offsets, layout.total_chunks
        S = cu.numel() - 1
        meta = _meta(N, precision)
        y = torch.empty(B, T, H, N, device=r.device, dtype=torch.float32)
        s_final = torch.empty(S, H, N, N, device=r.device, dtype=torch.float32)
        ckpt = checkpoints(H, total_chunks, N, r.device, differentiable, s_final)
        s0_arg = s0.float().contiguous() if s0 is not None else s_final  # unread when HAS_S0 is False
        grid, _, occupancy = _launch_args(S * H, N, r.device)
        _chunk_fwd_kernel[grid](r, w, k, v, a, b, s0_arg, y, s_final, ckpt, cu, chunk_cu, total_chunks, occupancy,
                                H=H, HAS_S0=s0 is not None, KEEP_CHECKPOINTS=differentiable, **meta)
        if differentiable:
            ctx.save_for_backward(r, w, k, v, a, b, ckpt, cu, chunk_cu)
        ctx.s0_dtype = s0.dtype if s0 is not None else None
        ctx.precision = precision
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        r, w, k, v, a, b, ckpt, cu, chunk_cu = ctx.saved_tensors
        B, T, H, N = r.shape
        S = cu.numel() - 1
        meta = _meta(N, ctx.precision)
        most_blocks = triton.cdiv(N, min(c.kwargs["BLOCK_V"] for c in _chunk_bwd_kernel.configs))  # any timed
        parts = [torch.empty(most_blocks, B, T, H, N, device=r.device, dtype=torch.float32) for _ in range(5)]
        dv = torch.empty(B, T, H, N, device=r.device, dtype=torch.float32)
        ds0 = torch.empty(S, H, N, N, device=r.device, dtype=torch.float32)
        dy = torch.zeros_like(dv) if dy is None else dy.float().contiguous()
        has_dst = ds_final is not None
        dst_arg = ds_final.float().contiguous() if has_dst else ds0
        grid, ran, occupancy = _launch_args(S * H, N, r.device)
        _chunk_bwd_kernel[grid](r, w, k, v, a, b, ckpt, dy, dst_arg, *parts, dv, ds0, cu, chunk_cu,
                                ckpt.shape[1], B * T * H * N, occupancy, H=H, HAS_DST=has_dst, **meta)
        blocks = triton.cdiv(N, ran["BLOCK_V"])  # the parts the launch that ran wrote
        # one block: its part as it is (a sum would be another pass over 5 gradients' bytes; the unused block's
        # memory then lives as long as these gradients, which the layer below consumes at once in training)
        dr, dw, dk, da, db = (p[0] if blocks == 1 else p[:blocks].sum(0) for p in parts)
        grads = (g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), (r, w, k, v, a, b)))
        ds0 = ds0.to(ctx.s0_dtype) if ctx.s0_dtype is not None else None
        return (*grads, ds0, None, None, None)


TUNED = {"forward": _chunk_fwd_kernel, "backward": _chunk_bwd_kernel}  # the autotuned kernels, by direction


def chosen_launches() -> dict[str, dict[str, str]]:
    """Each kernel's launch for every autotuning key this process has run, as
    {"forward": {"H=12 N=64 PRECISION=tf32 KEEP_CHECKPOINTS=True programs_class=0 bfloat16": "BLOCK_V 64, 8 warps"},
    "backward": {...}} (the key's named settings and its first tensor's dtype)."""
    def key_text(kernel, key) -> str:
        return " ".join([*(f"{name}={value}" for name, value in zip(kernel.keys, key)),
                         str(key[len(kernel.keys)]).removeprefix("torch.")])

    return {name: {key_text(kernel, key): f"BLOCK_V {launch.kwargs['BLOCK_V']}, {launch.num_warps} warps"
                   for key, launch in kernel.cache.items()}
            for name, kernel in TUNED.items()}


def wkv7_triton_chunked(r, w, k, v, a, b, initial_state=None, layout=None, precision=None):
    """Same contract as `wkv7_reference`; y comes back in fp32 (the dispatcher casts it to r's dtype).
    layout: a packed row's `PackedLayout` (B = 1), checked by the dispatcher. precision: `tl.dot`'s input precision for its
    fp32 products on a GPU, "tf32", "tf32x3" or "ieee" (the interpreter computes them exactly); by default
    "tf32x3" (about fp32's accuracy) for fp32 inputs and "tf32" for 16-bit ones, whose rounding is larger."""
    precision = precision or ("tf32x3" if r.dtype in (torch.float32, torch.float64) else "tf32")
    if r.shape[1] == 0:
        return no_steps(r, initial_state, torch.float32, r.shape[0])
    return WKV7TritonChunked.apply(r, w, k, v, a, b, initial_state, layout, precision,
                                   differentiable(r, w, k, v, a, b, initial_state))
