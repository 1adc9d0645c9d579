"""The wkv7 recurrence as Triton kernels: forward and backward, any T, fp32 state, fp32 or bf16 inputs.

Each row of the state (one value index) evolves on its own: S_t[i] = S_{t-1}[i] diag(d) + (S_{t-1}[i] . a) b^T
+ v_i k^T. So the forward runs one program per (batch, head, block of BLOCK_V rows), each keeping its
BLOCK_V x N slice of the state in registers and walking the sequence in chunks of CHUNK steps: more programs
and a shorter chain of reductions per step than one program per head (1.4x the forward tokens/s on an H200).
It writes its rows of y and, at every chunk start, a checkpoint of its slice. The backward runs one program
per (batch, head) over all rows, because dr, dk, da, db and dw sum over rows: with row blocks adding their
parts atomically it was 0.74x as fast. It walks the chunks in reverse, recomputes the chunk's states from
its checkpoint into a per-program scratch buffer, then runs the exact reverse-mode recurrence step by step:

    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t,   d_t = exp(-exp(w_t))

    dS_t  += dy_t r_t^T                      dr_t = S_t^T dy_t
    dv_t   = dS_t k_t        dk_t = dS_t^T v_t        db_t = dS_t^T (S_{t-1} a_t)
    dsa    = dS_t b_t        da_t = S_{t-1}^T dsa     dw_t = -exp(w_t) d_t Σ_i dS_t[i,:] S_{t-1}[i,:]
    dS_{t-1} = dS_t diag(d_t) + dsa a_t^T

Both kernels see the input as segments of one row: offsets `cu` [S + 1] (a batch [B, T] is B segments of T
steps, packed input its own `cu_seqlens`), so a packed row costs its real steps only. A program (segment, head)
starts from its segment's row of the initial state and checkpoints its chunks at `chunk_cu` [S + 1], the
chunk offsets of the segments.

Inputs of any float dtype are cast to fp32 on load; every product accumulates in fp32. Tested on CPU with
TRITON_INTERPRET=1 against the fp64 reference.
"""

import torch
import triton
import triton.language as tl

from ..layout import CHUNK, rows_layout
from .chunked import no_steps
BLOCK_V = 16  # state rows per forward program (16 beat 32 and 64 on an H200)


@triton.jit
def _tile(N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, v0):
    """This program's state rows (value indices v0 ...) and all columns (key indices): index vectors, their
    masks, the BLOCK_V x BLOCK_N tile's mask and its offsets in an N x N matrix."""
    rows = v0 + tl.arange(0, BLOCK_V)
    cols = tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < N, cols < N
    return rows, row_mask, cols, col_mask, row_mask[:, None] & col_mask[None, :], rows[:, None] * N + cols[None, :]


@triton.jit
def _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, cols, mask):
    """The five key-side [N] vectors of one (batch, step, head), as fp32."""
    r = tl.load(r_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
    return r, w, k, a, b


@triton.jit
def _step(S, d, k, v, a, b):
    """S_t = S_{t-1} diag(d) + (S_{t-1} a) b^T + v k^T on this program's rows; also returns S_{t-1} a."""
    sa = tl.sum(S * a[None, :], axis=1)
    return S * d[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :], sa


@triton.jit
def _segment(cu_ptr, chunk_cu_ptr, pid, H: tl.constexpr, CHUNK_LEN: tl.constexpr):
    """Program `pid` (segment, head, an int64): its head, first step, step count, first chunk and chunk count, all
    int64, so that every address computed from them is: in int32, the checkpoints of one call of 270k steps at
    C = 2048 lay past 2^31 elements, and the addresses wrapped."""
    seg = pid // H
    bos, eos = tl.load(cu_ptr + seg).to(tl.int64), tl.load(cu_ptr + seg + 1).to(tl.int64)
    return pid % H, bos, eos - bos, tl.load(chunk_cu_ptr + seg).to(tl.int64), tl.cdiv(eos - bos, CHUNK_LEN)


@triton.jit
def _checkpoint_offset(h, total_chunks, c0, c, N: tl.constexpr):
    """Where chunk `c` of the segment whose chunks start at `c0` keeps head `h`'s checkpoint: [H, chunks, N, N]."""
    return (h * total_chunks + c0 + c) * N * N


@triton.jit
def _step_offset(bos, t, H: tl.constexpr, h, N: tl.constexpr):
    """Where step `t` of the segment starting at step `bos` keeps head `h`'s vectors: [steps, H, N]."""
    return ((bos + t) * H + h) * N


# the layout's chunk count varies with every packed row: not specialised (see triton_chunked.py)
@triton.jit(do_not_specialize=["total_chunks"])
def _wkv7_fwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr,  # inputs [T_all, H, N]; s0 [S, H, N, N] fp32
    y_ptr, sT_ptr, ckpt_ptr,  # y [T_all, H, N] fp32; final states [S, H, N, N]; checkpoints [H, chunks, N, N]
    cu_ptr, chunk_cu_ptr, total_chunks,  # segment offsets [S + 1] in steps and in chunks
    H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_LEN: tl.constexpr,
    HAS_S0: tl.constexpr, KEEP_CHECKPOINTS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (segment, head); axis 1 picks the block of state rows
    h_idx, bos, T, c0, n_chunks = _segment(cu_ptr, chunk_cu_ptr, pid, H, CHUNK_LEN)
    rows, row_mask, cols, col_mask, tile_mask, tile_off = _tile(N, BLOCK_V, BLOCK_N, tl.program_id(1) * BLOCK_V)
    if HAS_S0:
        S = tl.load(s0_ptr + pid * N * N + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    for c in range(0, n_chunks):
        if KEEP_CHECKPOINTS:  # for the backward; inference needs none
            tl.store(ckpt_ptr + _checkpoint_offset(h_idx, total_chunks, c0, c, N) + tile_off, S, mask=tile_mask)
        for s in range(0, CHUNK_LEN):
            t = c * CHUNK_LEN + s
            if t < T:
                off = _step_offset(bos, t, H, h_idx, N)
                r, w, k, a, b = _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, cols, col_mask)
                v = tl.load(v_ptr + off + rows, mask=row_mask, other=0.0).to(tl.float32)
                S, _ = _step(S, tl.exp(-tl.exp(w)), k, v, a, b)
                tl.store(y_ptr + off + rows, tl.sum(S * r[None, :], axis=1), mask=row_mask)
    tl.store(sT_ptr + pid * N * N + tile_off, S, mask=tile_mask)


@triton.jit(do_not_specialize=["total_chunks"])
def _wkv7_bwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, ckpt_ptr, dy_ptr, dsT_ptr,
    dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr, scratch_ptr,  # scratch [S*H, CHUNK, N, N]
    cu_ptr, chunk_cu_ptr, total_chunks,
    H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_LEN: tl.constexpr,
    HAS_DST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (segment, head), all rows: BLOCK_V covers N
    h_idx, bos, T, c0, n_chunks = _segment(cu_ptr, chunk_cu_ptr, pid, H, CHUNK_LEN)
    rows, row_mask, cols, col_mask, tile_mask, tile_off = _tile(N, BLOCK_V, BLOCK_N, 0)
    if HAS_DST:
        dS = tl.load(dsT_ptr + pid * N * N + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    scratch = scratch_ptr + pid * CHUNK_LEN * N * N
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        # 1. recompute the chunk's states S_{t-1} from its checkpoint
        S = tl.load(ckpt_ptr + _checkpoint_offset(h_idx, total_chunks, c0, c, N) + tile_off, mask=tile_mask, other=0.0)
        for s in range(0, CHUNK_LEN):
            t = c * CHUNK_LEN + s
            if t < T:
                tl.store(scratch + s * N * N + tile_off, S, mask=tile_mask)
                off = _step_offset(bos, t, H, h_idx, N)
                r, w, k, a, b = _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, cols, col_mask)
                v = tl.load(v_ptr + off + rows, mask=row_mask, other=0.0).to(tl.float32)
                S, _ = _step(S, tl.exp(-tl.exp(w)), k, v, a, b)
        tl.debug_barrier()
        # 2. reverse-mode through the chunk
        for s_rev in range(0, CHUNK_LEN):
            s = CHUNK_LEN - 1 - s_rev
            t = c * CHUNK_LEN + s
            if t < T:
                off = _step_offset(bos, t, H, h_idx, N)
                S_prev = tl.load(scratch + s * N * N + tile_off, mask=tile_mask, other=0.0)
                r, w, k, a, b = _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, cols, col_mask)
                v = tl.load(v_ptr + off + rows, mask=row_mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + off + rows, mask=row_mask, other=0.0).to(tl.float32)
                ew = tl.exp(w)
                d = tl.exp(-ew)
                S_t, sa = _step(S_prev, d, k, v, a, b)
                dS += dy[:, None] * r[None, :]
                tl.store(dv_ptr + off + rows, tl.sum(dS * k[None, :], axis=1), mask=row_mask)
                dsa = tl.sum(dS * b[None, :], axis=1)
                tl.store(dr_ptr + off + cols, tl.sum(S_t * dy[:, None], axis=0), mask=col_mask)
                tl.store(dk_ptr + off + cols, tl.sum(dS * v[:, None], axis=0), mask=col_mask)
                tl.store(db_ptr + off + cols, tl.sum(dS * sa[:, None], axis=0), mask=col_mask)
                tl.store(da_ptr + off + cols, tl.sum(S_prev * dsa[:, None], axis=0), mask=col_mask)
                tl.store(dw_ptr + off + cols, -tl.sum(dS * S_prev, axis=0) * d * ew, mask=col_mask)
                dS = dS * d[None, :] + dsa[:, None] * a[None, :]
        tl.debug_barrier()
    tl.store(ds0_ptr + pid * N * N + tile_off, dS, mask=tile_mask)


def _launch(programs: int, N: int, rows_per_program: int) -> tuple[tuple[int, int], dict]:
    """The grid ((segment, head) programs, row blocks) and the kernels' compile-time sizes."""
    block_n = triton.next_power_of_2(N)
    block_v = min(triton.next_power_of_2(rows_per_program), block_n)
    grid = (programs, triton.cdiv(N, block_v))
    return grid, {"N": N, "BLOCK_V": block_v, "BLOCK_N": block_n, "CHUNK_LEN": CHUNK}


def differentiable(*inputs) -> bool:
    """Whether a backward can follow: grad mode on and an input that requires a gradient."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)


def checkpoints(H: int, total_chunks: int, N: int, device, differentiable: bool, unused: torch.Tensor):
    """The forward's chunk-start states for the backward, fp32 [H, chunks, N, N] (16 bytes a channel a step at
    N = 64: more than the inputs of a bf16 prefill); none without a backward (`unused` stands in, never written)."""
    return torch.empty(H, total_chunks, N, N, device=device, dtype=torch.float32) if differentiable else unused


class WKV7Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, layout, differentiable):
        B, T, H, N = r.shape
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        layout = layout or rows_layout(B, T, r.device)
        cu, chunk_cu, total_chunks = layout.step_offsets, layout.chunk_offsets, layout.total_chunks
        S = cu.numel() - 1
        y = torch.empty(B, T, H, N, device=r.device, dtype=torch.float32)
        s_final = torch.empty(S, H, N, N, device=r.device, dtype=torch.float32)
        ckpt = checkpoints(H, total_chunks, N, r.device, differentiable, s_final)
        s0_arg = s0.float().contiguous() if s0 is not None else s_final  # unread when HAS_S0 is False
        grid, meta = _launch(S * H, N, BLOCK_V)
        _wkv7_fwd_kernel[grid](r, w, k, v, a, b, s0_arg, y, s_final, ckpt, cu, chunk_cu, total_chunks, H=H,
                               HAS_S0=s0 is not None, KEEP_CHECKPOINTS=differentiable, **meta)
        if differentiable:
            ctx.save_for_backward(r, w, k, v, a, b, ckpt, cu, chunk_cu)
        ctx.has_s0 = s0 is not None
        ctx.s0_dtype = s0.dtype if s0 is not None else None
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        r, w, k, v, a, b, ckpt, cu, chunk_cu = ctx.saved_tensors
        B, T, H, N = r.shape
        S = cu.numel() - 1
        grads = [torch.empty(B, T, H, N, device=r.device, dtype=torch.float32) for _ in range(6)]
        ds0 = torch.empty(S, H, N, N, device=r.device, dtype=torch.float32)
        scratch = torch.empty(S * H, CHUNK, N, N, device=r.device, dtype=torch.float32)
        dy = torch.zeros_like(grads[0]) if dy is None else dy.float().contiguous()
        has_dst = ds_final is not None
        dst_arg = ds_final.float().contiguous() if has_dst else ds0
        grid, meta = _launch(S * H, N, N)  # one program per head: the key-side gradients sum over rows
        _wkv7_bwd_kernel[grid](r, w, k, v, a, b, ckpt, dy, dst_arg, *grads, ds0, scratch, cu, chunk_cu,
                               ckpt.shape[1], H=H, HAS_DST=has_dst, **meta)
        dr, dw, dk, dv, da, db = (g.to(x.dtype) for g, x in zip(grads, (r, w, k, v, a, b)))
        return dr, dw, dk, dv, da, db, ds0.to(ctx.s0_dtype) if ctx.has_s0 else None, None, None


def wkv7_triton(r, w, k, v, a, b, initial_state=None, layout=None):
    """Same contract as `wkv7_reference`; y comes back in fp32 (the dispatcher casts it to r's dtype).
    layout: a packed row's `PackedLayout` (B = 1), checked by the dispatcher; one program per segment and head."""
    if r.shape[1] == 0:
        return no_steps(r, initial_state, torch.float32, r.shape[0])
    return WKV7Triton.apply(r, w, k, v, a, b, initial_state, layout, differentiable(r, w, k, v, a, b, initial_state))
