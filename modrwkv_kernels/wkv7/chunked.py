"""The wkv7 recurrence in chunked matrix form: exact, parallel inside a chunk, sequential across chunks.

Write the step as S_t = S_{t-1} D_t + u_t b_t^T + v_t k_t^T with u_t = S_{t-1} a_t. Inside a chunk that starts
from state S, with Γ_t the cumulative decay since the chunk start, every u_t, y_t and the chunk's final state
are linear in S, so (rows are time steps, ~x = x·Γ_{t-1} or x·Γ_t, x~ = x/Γ_i):

    U = W1 S^T + W2,     (I - M_ab) [W1 | W2] = [ã | M_ak V]       (a unit-triangular solve, C x C)
    Y = r̃ S^T + M_rb U + M_rk V  = Q S^T + Z
    S' = S diag(Γ_C) + U^T b̂ + V^T k̂                              (b̂_i = b_i Γ_C/Γ_i, likewise k̂)

where M_xy[t, i] = x̃_t · ỹ_i, strictly lower (i < t) for the ã rows and lower (i <= t) for the r̃ rows.
Everything but the hand-off S -> S' runs batched over every chunk at once.

Plain PyTorch ops, so autograd gives the backward; fast on CPU and used there by default.

Packed input (`segment_chunks`): segments laid end to end in one row, each padded to whole chunks; only the
hand-off loop knows the boundaries: it restarts the state at each segment's first chunk, so no state crosses one
and the decay floor never has to express a reset.
"""

from itertools import islice

import torch
import torch.nn.functional as F

from ..layout import CHUNK
# Per-step log-decay floor. Inside a chunk the factors 1/Γ_i reach exp(CHUNK * |floor|) = e^80 < fp32 max,
# so nothing overflows. The backbone's decays are >= exp(-0.607) per step, far above this floor
# (exp(-5) = 0.0067); smaller decays are raised to it, which changes the state by less than 0.7%
# of an already-vanishing term.
LOG_DECAY_FLOOR = -5.0
# a longer chunk needs a higher floor: e^88.7 is fp32's largest
assert CHUNK * -LOG_DECAY_FLOOR <= 88, f"CHUNK {CHUNK} needs a LOG_DECAY_FLOOR of at least {-88 / CHUNK:.2f}"


def no_steps(r, initial_state, dtype, states: int):
    """A call of T = 0 steps: no output, and the state as it came in (zero without one), in `dtype`."""
    _, _, H, N = r.shape
    y = r.new_zeros(r.shape, dtype=dtype)
    if initial_state is None:
        return y, r.new_zeros(states, H, N, N, dtype=dtype)
    return y, initial_state.to(dtype)


def wkv7_chunked(r, w, k, v, a, b, initial_state=None, segment_chunks=None):
    """Same contract as `wkv7_reference`: [B, T, H, N] inputs; returns (y, final_state) in fp32 (fp64 in).

    segment_chunks: for packed input (B = 1), the number of chunks of each segment, which fill T; the state starts
    each segment from its row of `initial_state` [S, H, N, N] (or zero) and the final states are [S, H, N, N].
    """
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    if T == 0:
        return no_steps(r, initial_state, dtype, len(segment_chunks) if segment_chunks is not None else B)
    C = CHUNK
    n_chunks = -(-T // C)
    pad = n_chunks * C - T

    def blocks(x):
        # [B, T, H, N] -> [n_chunks, B*H, C, N], chunk-major so each chunk's slice is contiguous.
        # Padded steps are identities (no input, decay 1).
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, n_chunks, C, H, N).permute(1, 0, 3, 2, 4).reshape(n_chunks, B * H, C, N)

    log_decay = blocks((-torch.exp(w.to(dtype))).clamp(min=LOG_DECAY_FLOOR))
    r, k, v, a, b = (blocks(x) for x in (r, k, v, a, b))

    g = log_decay.cumsum(dim=2)  # log Γ_t, inclusive
    g_last = g[:, :, -1:, :]  # log Γ_C
    a_t = a * torch.exp(g - log_decay)  # a_t Γ_{t-1}
    r_t = r * torch.exp(g)
    inv = torch.exp(-g)
    b_i, k_i = b * inv, k * inv
    to_end = torch.exp(g_last - g)
    b_end, k_end = b * to_end, k * to_end

    strict = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=r.device).tril()
    M_ab = (a_t @ b_i.transpose(-1, -2)).masked_fill(~strict, 0)
    M_ak = (a_t @ k_i.transpose(-1, -2)).masked_fill(~strict, 0)
    M_rb = (r_t @ b_i.transpose(-1, -2)).masked_fill(~incl, 0)
    M_rk = (r_t @ k_i.transpose(-1, -2)).masked_fill(~incl, 0)

    eye = torch.eye(C, dtype=dtype, device=r.device)
    W = torch.linalg.solve_triangular(eye - M_ab, torch.cat([a_t, M_ak @ v], dim=-1), upper=False, unitriangular=True)
    W1, W2 = W[..., :N], W[..., N:]
    # Per chunk, with S its starting state:  Y = Q S^T + Z,  U^T = S W1^T + W2^T,  S' = S diag(Γ_C) + U^T b̂ + V^T k̂
    Q = r_t + M_rb @ W1
    Z = M_rb @ W2 + M_rk @ v
    # Loop operands transposed and contiguous once, so the per-chunk products need no copies: Y^T = S Q^T + Z^T.
    QT, ZT, W1T, W2T, vT = (x.transpose(-1, -2).contiguous() for x in (Q, Z, W1, W2, v))
    # unbind once: indexing chunk by chunk would make autograd scatter each slice into a full-size zero tensor
    per_chunk = zip(*(x.unbind(0) for x in (QT, ZT, W1T, W2T, b_end, vT, k_end, torch.exp(g_last))))

    if segment_chunks is None:
        segment_chunks = [n_chunks]
    elif B != 1 or sum(segment_chunks) != n_chunks:
        raise ValueError(f"wkv7_chunked: segment_chunks {segment_chunks} must fill the {n_chunks} chunks of one row")
    starts = r.new_zeros(len(segment_chunks), B * H, N, N) if initial_state is None else \
        initial_state.to(dtype).reshape(len(segment_chunks), B * H, N, N)
    per_chunk = iter(per_chunk)
    yTs, finals = [], []
    for S, n in zip(starts.unbind(0), segment_chunks):
        for QT_c, ZT_c, W1T_c, W2T_c, b_end_c, vT_c, k_end_c, decay_c in islice(per_chunk, n):  # sequential
            yTs.append(torch.baddbmm(ZT_c, S, QT_c))
            UT = torch.baddbmm(W2T_c, S, W1T_c)
            S = torch.baddbmm(torch.baddbmm(S * decay_c, UT, b_end_c), vT_c, k_end_c)
        finals.append(S)
    y = torch.stack(yTs).view(n_chunks, B, H, N, C).permute(1, 0, 4, 2, 3).reshape(B, n_chunks * C, H, N)[:, :T]
    return y, torch.stack(finals).reshape(-1, H, N, N)
