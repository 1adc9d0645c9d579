import pytest
import torch
import torch.nn.functional as F

import modrwkv_kernels as kernels
from modrwkv_kernels import wkv7


def wkv_inputs(B, T, H, N, dtype=torch.float64, seed=0, requires_grad=False):
    """Inputs shaped like the backbone's: w in (-inf, -0.5), a = -kk, b = kk * sigmoid(.), kk unit-norm."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, N, generator=g, dtype=dtype)  # noqa: E731
    r, k, v = rand(), rand(), rand()
    w = -F.softplus(-2 * rand()) - 0.5
    kk = F.normalize(rand(), dim=-1)
    lr = torch.sigmoid(rand())
    a, b = -kk, kk * lr
    s0 = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    xs = [r, w, k, v, a, b]
    if requires_grad:
        xs = [x.detach().requires_grad_() for x in xs]
        s0.requires_grad_()
    return xs, s0


def rel_err(x, ref):
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()  # either may be on a GPU
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("T", [1, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_fp64(T, with_state):
    xs, s0 = wkv_inputs(2, T, 3, 8)
    init = s0 if with_state else None
    y_ref, s_ref = wkv7(*xs, initial_state=init, backend="reference")
    y, s = wkv7(*xs, initial_state=init, backend="chunked")
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12


def test_chunked_matches_reference_fp32_long():
    xs, s0 = wkv_inputs(1, 300, 2, 64)
    xs32 = [x.float() for x in xs]
    y_ref, s_ref = wkv7(*xs, initial_state=s0, backend="reference")  # fp64 oracle
    y, s = wkv7(*xs32, initial_state=s0.float(), backend="chunked")
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_chunked_raises_decays_below_its_floor_to_it():
    """The floor was never applied (`-exp(w).clamp(...)` clamps exp(w) >= 0): a step's log-decay under about -5.5
    overflowed a 16-step chunk's factors to inf, and the output was NaN. Floored, it equals the reference run on
    decays raised to the floor (log-decay -exp(w) >= -5 where w <= ln 5)."""
    import math

    from modrwkv_kernels.wkv7.chunked import LOG_DECAY_FLOOR

    xs, s0 = wkv_inputs(1, 40, 2, 8)
    xs[1] = xs[1] + 3.5  # w up to about 3: log-decays down to -20
    assert (-xs[1].exp()).min() < 3 * LOG_DECAY_FLOOR
    y, s = wkv7(*xs, initial_state=s0, backend="chunked")
    floored = [x.clamp(max=math.log(-LOG_DECAY_FLOOR)) if i == 1 else x for i, x in enumerate(xs)]
    y_ref, s_ref = wkv7(*floored, initial_state=s0, backend="reference")
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "triton_chunked"])
def test_no_steps_give_no_output_and_the_state_as_it_came(backend):
    xs, s0 = wkv_inputs(2, 0, 3, 8)
    xs, s0 = [x.to(device_of(backend)) for x in xs], s0.to(device_of(backend))  # Triton's on CUDA where there is one
    y, s = wkv7(*xs, initial_state=s0, backend=backend)
    assert y.shape == (2, 0, 3, 8) and torch.equal(s, s0.to(s.dtype))  # Triton keeps states in fp32
    assert torch.equal(wkv7(*xs, backend=backend)[1], torch.zeros_like(s0))


def test_chunked_and_reference_gradients_agree():
    xs, s0 = wkv_inputs(2, 21, 2, 8, requires_grad=True)
    grads = {}
    for backend in ("reference", "chunked"):
        for x in xs + [s0]:
            x.grad = None
        y, s = wkv7(*xs, initial_state=s0, backend=backend)
        ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + (s**2).sum()).backward()
        grads[backend] = [x.grad.clone() for x in xs + [s0]]
    for g_ref, g in zip(grads["reference"], grads["chunked"]):
        assert rel_err(g, g_ref) < 1e-10


def test_chunked_gradcheck_fp64():
    xs, s0 = wkv_inputs(1, 5, 1, 3, requires_grad=True)
    # keep w's chain short: gradcheck differentiates exp(-exp(w)) numerically
    fn = lambda *t: wkv7(*t[:6], initial_state=t[6], backend="chunked")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*xs, s0), eps=1e-6, atol=1e-5)


def test_split_sequence_carries_state():
    xs, _ = wkv_inputs(1, 37, 2, 8)
    y_all, s_all = wkv7(*xs, backend="chunked")
    y1, s1 = wkv7(*(x[:, :20] for x in xs), backend="chunked")
    y2, s2 = wkv7(*(x[:, 20:] for x in xs), initial_state=s1, backend="chunked")
    assert rel_err(torch.cat([y1, y2], 1), y_all) < 1e-12
    assert rel_err(s2, s_all) < 1e-12


def test_output_dtype_follows_input_and_state_is_fp32():
    xs, _ = wkv_inputs(1, 8, 1, 4)
    y, s = wkv7(*(x.bfloat16() for x in xs), backend="chunked")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_the_torch_backends_keep_fp32_under_autocast(backend, packed):
    """The trainer runs the model under bf16 autocast: the torch backends' products stay fp32 there (autocast would
    have made them bf16, and the chunked state bf16), so inside autocast they compute what they compute outside."""
    xs, s0 = wkv_inputs(1, 40, 2, 16, dtype=torch.float32)
    cu_seqlens = torch.tensor([0, 17, 40]) if packed else None
    init = torch.cat([s0, s0.flip(0)]) if packed else s0
    y_ref, s_ref = wkv7(*xs, initial_state=init, backend=backend, cu_seqlens=cu_seqlens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = wkv7(*xs, initial_state=init, backend=backend, cu_seqlens=cu_seqlens)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6


def test_bad_shapes_and_backend_are_named():
    xs, _ = wkv_inputs(1, 4, 2, 4)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(xs[0], xs[1], xs[2][:, :3], *xs[3:])
    with pytest.raises(ValueError, match="initial_state"):
        wkv7(*xs, initial_state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown backend"):
        wkv7(*xs, backend="cuda-magic")


def test_environment_forces_backend(monkeypatch):
    calls = []
    monkeypatch.setitem(kernels.BACKENDS, "reference", lambda *a: calls.append("reference") or kernels.wkv7_reference(*a))
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    xs, _ = wkv_inputs(1, 33, 1, 4)
    wkv7(*xs)
    assert calls == ["reference"]
    monkeypatch.delenv(kernels.BACKEND_ENV)
    assert kernels.default_backend(torch.device("cpu"), 33) == "chunked"
    assert kernels.default_backend(torch.device("cpu"), 1) == "reference"
    assert kernels.default_backend(torch.device("cuda"), 4096) == "triton_chunked"  # measured fastest on a GPU


def device_of(backend: str) -> str:
    """Triton runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1 (set by conftest without a GPU)."""
    return "cuda" if backend.startswith("triton") and torch.cuda.is_available() else "cpu"


def pack(xs_by_segment):
    """Per-segment inputs [1, T_s, H, N] -> one packed row [1, sum T_s, H, N] and its cu_seqlens."""
    lengths = [x[0].shape[1] for x in xs_by_segment]
    packed = [torch.cat([xs[i] for xs in xs_by_segment], dim=1) for i in range(6)]
    return packed, torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("backend", ["reference", "chunked", pytest.param("triton", marks=pytest.mark.slow),
                                     "triton_chunked"])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_segments_equal_separate_runs_forward_and_backward(backend, with_state):
    """Segments of 1, 17, 16, 40 and 5 steps (inside one chunk, across chunk edges, exactly one chunk): outputs,
    final states and the gradients of every input, initial states included, equal one run per segment (fp32,
    1e-5)."""
    device = device_of(backend)
    segments = [wkv_inputs(1, T, 2, 8, dtype=torch.float32, seed=i) for i, T in enumerate((1, 17, 16, 40, 5))]
    xs_by_segment = [[x.to(device).requires_grad_() for x in xs] for xs, _ in segments]
    states = [s0.to(device).requires_grad_() for _, s0 in segments] if with_state else [None] * len(segments)
    weights = torch.linspace(-1, 1, 79 * 2 * 8, device=device).view(1, 79, 2, 8)

    separate_y, separate_s = [], []
    for xs, s0 in zip(xs_by_segment, states):
        y, s = wkv7(*xs, initial_state=s0, backend=backend)
        separate_y.append(y)
        separate_s.append(s)
    y_sep, s_sep = torch.cat(separate_y, dim=1), torch.cat(separate_s)
    ((y_sep * weights).sum() + (s_sep**2).sum()).backward()
    leaves = [x for xs in xs_by_segment for x in xs] + ([s for s in states] if with_state else [])
    grads_sep = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None

    packed, cu_seqlens = pack(xs_by_segment)
    init = torch.cat(states) if with_state else None
    y, s = wkv7(*packed, initial_state=init, backend=backend, cu_seqlens=cu_seqlens)
    assert y.shape == (1, 79, 2, 8) and s.shape == (5, 2, 8, 8)
    ((y * weights).sum() + (s**2).sum()).backward()
    assert rel_err(y, y_sep) < 1e-5 and rel_err(s, s_sep) < 1e-5
    for got, want in zip([x.grad for x in leaves], grads_sep):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "triton_chunked"])
def test_a_change_in_one_segment_reaches_no_other(backend):
    dtype = torch.float32 if backend.startswith("triton") else torch.float64
    segments = [[x.to(device_of(backend)) for x in wkv_inputs(1, T, 2, 8, dtype=dtype, seed=i)[0]]
                for i, T in enumerate((9, 20, 7))]
    packed, cu_seqlens = pack(segments)
    y, s = wkv7(*packed, backend=backend, cu_seqlens=cu_seqlens)
    changed = [x.clone() for x in packed]
    changed[3][:, 9:29] += 1.0  # every value of the middle segment
    y2, s2 = wkv7(*changed, backend=backend, cu_seqlens=cu_seqlens)
    assert torch.equal(y2[:, :9], y[:, :9]) and torch.equal(y2[:, 29:], y[:, 29:])
    assert torch.equal(s2[0], s[0]) and torch.equal(s2[2], s[2])
    assert not torch.equal(y2[:, 9:29], y[:, 9:29])


def test_bad_packing_is_named():
    xs, _ = wkv_inputs(1, 10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to T=10"):
        wkv7(*xs, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="at least one step"):
        wkv7(*xs, cu_seqlens=torch.tensor([0, 4, 4, 10]))
    with pytest.raises(ValueError, match="one row per segment"):
        wkv7(*xs, initial_state=torch.zeros(1, 2, 8, 8), cu_seqlens=torch.tensor([0, 4, 10]))
    two_rows, _ = wkv_inputs(2, 10, 2, 8)
    with pytest.raises(ValueError, match="packed input"):
        wkv7(*two_rows, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="must fill the 1 chunks of one row"):
        kernels.wkv7_chunked(*xs, segment_chunks=[1, 1])
    for backend in ("chunked", "triton_chunked"):  # a kernel read past the end of the shorter one
        with pytest.raises(ValueError, match=r"wkv7: k has shape \(1, 9, 2, 8\), expected \(1, 10, 2, 8\) like r"):
            wkv7(xs[0], xs[1], xs[2][:, :-1], *xs[3:], cu_seqlens=torch.tensor([0, 4, 10]), backend=backend)


def test_a_layout_built_on_the_host_reaches_the_inputs_device():
    """`packed_layout(cu_seqlens, T)` builds on the offsets' device (training's are on the host): given with CUDA
    inputs, its offsets reached the Triton kernels on the CPU (refused: "cpu tensor?") and fla's cu_seqlens too."""
    layout = kernels.packed_layout(torch.tensor([0, 3, 5]), 5)
    moved = kernels.as_layout(layout, 5, torch.device("meta"))
    assert {moved.cu_seqlens.device.type, moved.step_offsets.device.type, moved.chunk_offsets.device.type} == {"meta"}
    assert moved.lengths == layout.lengths and moved.total_chunks == layout.total_chunks
    assert kernels.as_layout(layout, 5, torch.device("cpu")) is layout


def test_a_compiled_caller_steps_around_the_kernels_and_needs_no_graph_per_layout():
    """torch.compile of code around wkv7, as of a backbone block: Dynamo leaves the dispatcher (host-side layout
    lists, the kernels' own launches) alone, so packed rows of other segments, and of another length, reuse the
    compiled code; and it computes what eager does."""
    def step(xs, cu_seqlens):
        r = torch.tanh(xs[0])  # something for Dynamo to compile on either side of the kernel
        y, _ = wkv7(r, *xs[1:], backend="chunked", cu_seqlens=cu_seqlens)
        return (y * 2).sum()

    rows = [[1, 17, 16, 40, 5], [40, 39], [30, 3, 27]]  # 79, 79 and 60 steps
    inputs = [pack([wkv_inputs(1, T, 2, 8, dtype=torch.float32, seed=i)[0] for i, T in enumerate(row)])
              for row in rows]
    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for xs, cu_seqlens in inputs:
                torch.testing.assert_close(compiled(xs, cu_seqlens), step(xs, cu_seqlens), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
