"""The wkv7 recurrence, one step at a time: the plain definition every other backend is checked against.

Per batch and head, with the state S of shape [N_v, N_k]:

    S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t
"""

import torch


def wkv7_reference(r, w, k, v, a, b, initial_state=None):
    """r, w, k, v, a, b: [B, T, H, N]; initial_state: [B, H, N, N] (value dim x key dim) or None.

    Computes in fp32, or fp64 when the inputs are fp64 (the high-precision oracle of the tests).
    Returns y [B, T, H, N] and the final state [B, H, N, N], both in that compute dtype.
    """
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (x.to(dtype) for x in (r, w, k, v, a, b))
    decay = torch.exp(-torch.exp(w))
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(dtype)
    ys = []
    for r_t, d_t, k_t, v_t, a_t, b_t in zip(*(x.unbind(1) for x in (r, decay, k, v, a, b))):
        Sa = (S @ a_t[..., None])[..., 0]
        S = S * d_t[:, :, None, :] + Sa[..., :, None] * b_t[:, :, None, :] + v_t[..., :, None] * k_t[:, :, None, :]
        ys.append((S @ r_t[..., None])[..., 0])
    y = torch.stack(ys, dim=1) if T else r.new_zeros(B, 0, H, N)
    return y, S
