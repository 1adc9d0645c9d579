"""Both Triton wkv7 backends (step by step, and chunked) against the fp64 reference: fp32 inputs, T below, at
and across chunk boundaries, with and without an initial state, H >= 2, every gradient. On CUDA the compiled
kernels run; without a GPU the same tests run on CPU tensors under TRITON_INTERPRET=1 (set in conftest)."""

import pytest
import torch
import triton
import triton.language as tl

from modrwkv_kernels import wkv7
from modrwkv_kernels.wkv7.triton_kernel import CHUNK, _checkpoint_offset, _segment, _step_offset
from tests.modrwkv_kernels.test_wkv7 import rel_err, wkv_inputs

TOL = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "triton_chunked"])
def backend(request):
    return request.param


def on_device(xs):
    """fp32 leaves on DEVICE with the same values as the fp64 CPU tensors `xs`."""
    return [x.detach().to(DEVICE, torch.float32).requires_grad_() for x in xs]


def loss_of(y, s, seed=0):
    """A loss that weighs every output element differently, so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    weights = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    return (y * weights(y)).sum() + (s * weights(s)).sum()


@triton.jit
def offsets(cu_ptr, chunk_cu_ptr, total_chunks, out_ptr, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr):
    """Each program's last checkpoint and last step offsets, as the kernels compute them."""
    pid = tl.program_id(0).to(tl.int64)
    h, bos, T, c0, n_chunks = _segment(cu_ptr, chunk_cu_ptr, pid, H, L)
    tl.store(out_ptr + 2 * pid, _checkpoint_offset(h, total_chunks, c0, n_chunks - 1, N))
    tl.store(out_ptr + 2 * pid + 1, _step_offset(bos, T - 1, H, h, N))


def test_addresses_past_two_to_the_31_are_exact():
    """Checkpoint and step offsets of a segment starting at step 2^26 (a 2.9B model's call of 210k steps reaches
    2^31 in the checkpoints already): computed in int64 from what the kernels load, as both kernels compute them;
    in int32 they wrapped negative."""
    H, N = 32, 64
    cu, chunk_cu = [0, 2**26, 2**26 + 2**20], [0, 2**26 // CHUNK, (2**26 + 2**20) // CHUNK]
    out = torch.zeros(2 * 2 * H, dtype=torch.int64, device=DEVICE)
    offsets[(2 * H,)](torch.tensor(cu, dtype=torch.int32, device=DEVICE),
                      torch.tensor(chunk_cu, dtype=torch.int32, device=DEVICE), chunk_cu[-1], out, H=H, N=N, L=CHUNK)
    expected = []
    for pid in range(2 * H):
        segment, h = divmod(pid, H)
        expected += [(h * chunk_cu[-1] + chunk_cu[segment + 1] - 1) * N * N, ((cu[segment + 1] - 1) * H + h) * N]
    assert out.tolist() == expected and max(expected) > 2**31


def test_a_forward_with_no_backward_to_follow_keeps_no_checkpoints_and_gives_the_same(backend, monkeypatch):
    """Inference (no grad mode, or no input needing a gradient) skips the fp32 chunk checkpoints: 16 bytes a channel
    a step, more than a bf16 prefill's inputs."""
    import importlib

    # by name: the package's `wkv7` attribute is the dispatcher function, not this folder
    module = importlib.import_module(f"modrwkv_kernels.wkv7.{'triton_kernel' if backend == 'triton' else backend}")
    allocated, checkpoints = [], module.checkpoints

    def spied(H, total_chunks, N, device, differentiable, unused):
        made = checkpoints(H, total_chunks, N, device, differentiable, unused)
        allocated.append(made is not unused)
        return made

    monkeypatch.setattr(module, "checkpoints", spied)
    xs, s0 = wkv_inputs(2, 2 * CHUNK + 5, 2, 16)
    leaves = on_device(xs + [s0])
    y, s = wkv7(*leaves[:6], initial_state=leaves[6], backend=backend)
    assert y.grad_fn is not None
    plain = [x.detach() for x in leaves]
    for context in (torch.no_grad(), torch.enable_grad()):  # no grad mode; grad mode with no input needing one
        with context:
            y_inference, s_inference = wkv7(*plain[:6], initial_state=plain[6], backend=backend)
        assert y_inference.grad_fn is None
        assert torch.equal(y_inference, y.detach()) and torch.equal(s_inference, s.detach())
    assert allocated == [True, False, False]  # the training forward's only


@pytest.mark.parametrize("T", [1, CHUNK - 3, CHUNK, 2 * CHUNK + 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_and_gradients_match_fp64_reference(backend, T, with_state):
    B, H, N = 1, 2, 16
    xs64, s64 = wkv_inputs(B, T, H, N, seed=T, requires_grad=True)
    xs32 = on_device(xs64)
    (s32,) = on_device([s64])
    init64, init32 = (s64, s32) if with_state else (None, None)

    y_ref, s_ref = wkv7(*xs64, initial_state=init64, backend="reference")
    y, s = wkv7(*xs32, initial_state=init32, backend=backend)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL
    assert rel_err(s, s_ref) < TOL

    loss_of(y_ref, s_ref).backward()
    loss_of(y, s).backward()
    names = ["r", "w", "k", "v", "a", "b"]
    for name, x32, x64 in zip(names, xs32, xs64):
        if T == 1 and not with_state and name == "w":
            # one step from a zero state: w reaches nothing, its gradient is 0; the chunked kernel's terms
            # r e^G and k e^-G cancel to rounding, so measure against the other gradients' scale
            scale = max(x.grad.abs().max() for x in xs64)
            assert x32.grad.abs().max() < TOL * scale
            continue
        assert rel_err(x32.grad, x64.grad) < TOL, name
    if with_state:
        assert rel_err(s32.grad, s64.grad) < TOL


def launches():
    """The step kernel's one launch, and each the chunked kernels' autotuning chooses among (on CPU their warps do
    not change what the interpreter computes; on a GPU they do)."""
    from modrwkv_kernels.wkv7 import triton_chunked

    return [("triton", None, None)] + [("triton_chunked", launch.kwargs["BLOCK_V"], launch.num_warps)
                                       for launch in triton_chunked.LAUNCHES]


@pytest.mark.parametrize("backend, rows, warps", launches())
def test_row_blocks_of_each_launch(backend, rows, warps, monkeypatch):
    """N = 48: the forward runs programs of BLOCK_V rows per head (several, the last masked past N, or one taller
    than N); the backward reads the checkpoints they wrote (the chunked one also runs a program per row block and
    sums their parts: it allocates them for the most blocks any launch runs)."""
    from modrwkv_kernels.wkv7 import triton_chunked, triton_kernel

    N = 48
    if backend == "triton":
        assert -(-N // triton_kernel.BLOCK_V) > 1
    else:  # the autotuners hold this launch alone, as if their timing had chosen it
        for kernel in triton_chunked.TUNED.values():
            monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_V": rows}, num_warps=warps)])
            monkeypatch.setattr(kernel, "cache", {})
    xs64, s64 = wkv_inputs(1, CHUNK + 3, 2, N, seed=5, requires_grad=True)
    xs32 = on_device(xs64)
    (s32,) = on_device([s64])
    y_ref, s_ref = wkv7(*xs64, initial_state=s64, backend="reference")
    y, s = wkv7(*xs32, initial_state=s32, backend=backend)
    assert rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL
    loss_of(y_ref, s_ref).backward()
    loss_of(y, s).backward()
    for name, x32, x64 in zip(["r", "w", "k", "v", "a", "b"], xs32, xs64):
        assert rel_err(x32.grad, x64.grad) < TOL, name
    assert rel_err(s32.grad, s64.grad) < TOL
    if backend == "triton_chunked":  # one launch offered: run as it is, no choice kept
        for kernel in triton_chunked.TUNED.values():
            assert (kernel.best_config.kwargs["BLOCK_V"], kernel.best_config.num_warps) == (rows, warps)


@pytest.mark.parametrize("rows", [32, 64])
def test_autotuning_times_every_launch_then_runs_the_fastest(rows, monkeypatch):
    """The chunked kernels' autotuning as on a GPU (where the interpreter prunes to the first launch): every
    launch timed, by a stand-in that runs each once and calls the one of `rows` rows and 8 warps the fastest, then
    that one run. Each timed launch wrote the outputs and the backward's parts before it (64 rows: one part of the
    two that 32 rows wrote); the result is the reference's."""
    from modrwkv_kernels.wkv7 import triton_chunked

    timed = []
    for kernel in triton_chunked.TUNED.values():
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "cache_results", False)  # on a GPU: no stand-in timings on disk
        monkeypatch.setattr(kernel, "early_config_prune", lambda configs, named_args, **kwargs: configs)  # all: N = 48
        monkeypatch.setitem(kernel.__dict__, "do_bench", lambda call, quantiles: [call(), 0.0][1:] * len(quantiles))

        def bench(*args, config, bench=kernel._bench, kernel=kernel, **meta):
            bench(*args, config=config, **meta)  # runs the launch once
            timed.append((kernel.base_fn.__name__, config.kwargs["BLOCK_V"], config.num_warps))
            return [0.0 if (config.kwargs["BLOCK_V"], config.num_warps) == (rows, 8) else 1.0] * 3

        monkeypatch.setattr(kernel, "_bench", bench)
    xs64, s64 = wkv_inputs(1, CHUNK + 3, 2, 48, seed=5, requires_grad=True)
    xs32 = on_device(xs64)
    (s32,) = on_device([s64])
    y_ref, s_ref = wkv7(*xs64, initial_state=s64, backend="reference")
    y, s = wkv7(*xs32, initial_state=s32, backend="triton_chunked")
    loss_of(y_ref, s_ref).backward()
    loss_of(y, s).backward()
    launches = [(launch.kwargs["BLOCK_V"], launch.num_warps) for launch in triton_chunked.LAUNCHES]
    assert timed == [(kernel, *launch) for kernel in ("_chunk_fwd_kernel", "_chunk_bwd_kernel") for launch in launches]
    occupancy = triton_chunked.programs_class(2, torch.device(DEVICE))  # one segment, two heads
    settings = f"H=2 N=48 PRECISION=tf32x3 KEEP_CHECKPOINTS=True programs_class={occupancy} float32"
    assert triton_chunked.chosen_launches() == {
        "forward": {settings: f"BLOCK_V {rows}, 8 warps"},
        "backward": {settings.replace(" KEEP_CHECKPOINTS=True", ""): f"BLOCK_V {rows}, 8 warps"}}
    assert rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL
    for name, x32, x64 in zip(["r", "w", "k", "v", "a", "b", "s0"], xs32 + [s32], xs64 + [s64]):
        assert rel_err(x32.grad, x64.grad) < TOL, name


def test_a_pinned_launch_runs_alone_and_a_misnamed_one_is_refused(monkeypatch):
    """MODRWKV_WKV7_LAUNCH="64,8": that launch, timed by nothing (where the interpreter runs the first launch, and
    a GPU would time all four); a launch not offered is refused naming those that are."""
    from modrwkv_kernels.wkv7 import triton_chunked

    for kernel in triton_chunked.TUNED.values():
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setenv(triton_chunked.LAUNCH_ENV, "64,8")
    xs = on_device(wkv_inputs(1, 5, 2, 64, seed=3)[0])
    wkv7(*xs, backend="triton_chunked")[0].sum().backward()
    assert [set(launches.values()) for launches in triton_chunked.chosen_launches().values()] == [
        {"BLOCK_V 64, 8 warps"}] * 2
    for kernel in triton_chunked.TUNED.values():
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setenv(triton_chunked.LAUNCH_ENV, "64")
    with pytest.raises(ValueError, match="MODRWKV_WKV7_LAUNCH='64': expected 'rows,warps', one of '32,4', '32,8', "
                                         "'64,4', '64,8'"):
        wkv7(*xs, backend="triton_chunked")


def test_launches_are_chosen_again_for_another_share_of_the_gpu(monkeypatch):
    """The autotuning keys on how the (segment, head) programs fill the GPU's SMs (fewer, up to 4x, more): a launch
    timed on a few long rows is not kept for many short ones."""
    from modrwkv_kernels.wkv7 import triton_chunked

    monkeypatch.setattr(triton_chunked, "_multiprocessors", lambda device: 4)
    assert [triton_chunked.programs_class(p, torch.device(DEVICE)) for p in (1, 3, 4, 15, 16, 99)] == [0, 0, 1, 1, 2, 2]
    kernel = triton_chunked.TUNED["forward"]
    monkeypatch.setattr(kernel, "cache", {})
    with torch.no_grad():
        for B in (1, 2, 8):  # H = 2: 2, 4 and 16 programs
            wkv7(*on_device(wkv_inputs(B, 5, 2, 16, seed=B)[0]), backend="triton_chunked")
    assert sorted(key[4] for key in kernel.cache) == [0, 1, 2]  # H, N, PRECISION, KEEP_CHECKPOINTS, the class


def test_chunked_kernel_floors_decays_as_the_torch_chunked_form_does():
    """Log-decays down to about -20, past the -5 floor both chunked forms raise them to (its gradient zero there):
    the Triton one computes what the torch one does in fp64, forward and every gradient (GPU runs were the only
    check of this path)."""
    xs64, s64 = wkv_inputs(1, 40, 2, 16, seed=8)
    xs64[1] = xs64[1] + 3.5
    xs64 = [x.requires_grad_() for x in xs64]
    s64.requires_grad_()
    xs32 = on_device(xs64)
    (s32,) = on_device([s64])
    y_ref, s_ref = wkv7(*xs64, initial_state=s64, backend="chunked")
    y, s = wkv7(*xs32, initial_state=s32, backend="triton_chunked")
    assert (-torch.exp(xs64[1])).min() < -15 and rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL
    loss_of(y_ref, s_ref).backward()
    loss_of(y, s).backward()
    for name, x32, x64 in zip(["r", "w", "k", "v", "a", "b", "s0"], xs32 + [s32], xs64 + [s64]):
        assert rel_err(x32.grad, x64.grad) < TOL, name


def test_a_packed_row_of_strided_inputs_and_several_row_blocks_matches_separate_fp64_runs():
    """Segments of 1, 16, 17 and 40 steps with their own initial states, N = 64 (several row blocks a head), and
    inputs given as strided views (a [1, T, H, 2N] tensor's halves): what GPU tests alone covered."""
    lengths, H, N = [1, 16, 17, 40], 2, 64
    T = sum(lengths)
    wide, s64 = wkv_inputs(1, T, H, 2 * N, seed=9)
    xs64 = [x[..., :N].contiguous().requires_grad_() for x in wide]
    s0 = torch.randn(len(lengths), H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s0.requires_grad_()
    strided = [x.detach().to(DEVICE, torch.float32)[..., :N].requires_grad_() for x in wide]
    assert not strided[0].is_contiguous()
    (s32,) = on_device([s0])
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    y_ref, st_ref = wkv7(*xs64, initial_state=s0, backend="chunked", cu_seqlens=cu_seqlens)
    y, st = wkv7(*strided, initial_state=s32, backend="triton_chunked", cu_seqlens=cu_seqlens.to(DEVICE))
    assert rel_err(y, y_ref) < TOL and rel_err(st, st_ref) < TOL
    loss_of(y_ref, st_ref).backward()
    loss_of(y, st).backward()
    for name, x32, x64 in zip(["r", "w", "k", "v", "a", "b", "s0"], strided + [s32], xs64 + [s0]):
        assert rel_err(x32.grad, x64.grad) < TOL, name


def test_head_size_not_a_power_of_two_and_only_final_state_used(backend):
    xs64, s64 = wkv_inputs(2, 9, 2, 12, seed=3, requires_grad=True)
    xs32 = on_device(xs64)
    _, s_ref = wkv7(*xs64, initial_state=s64, backend="reference")
    _, s = wkv7(*xs32, initial_state=s64.detach().to(DEVICE, torch.float32), backend=backend)
    assert rel_err(s, s_ref) < TOL
    s_ref.square().sum().backward()
    s.square().sum().backward()
    assert xs64[0].grad is None and torch.all(xs32[0].grad == 0)  # r does not reach the state
    for x32, x64 in zip(xs32[1:], xs64[1:]):
        assert rel_err(x32.grad, x64.grad) < TOL


def test_bf16_inputs_are_read_as_fp32(backend):
    xs, _ = wkv_inputs(1, 7, 2, 16, seed=4)
    bf = [x.to(DEVICE, torch.bfloat16) for x in xs]
    y_ref, s_ref = wkv7(*(x.double() for x in bf), backend="reference")  # same rounded inputs, fp64 maths
    y, s = wkv7(*bf, backend=backend)
    assert y.dtype == torch.bfloat16
    # the chunked kernel's products of 16-bit inputs run in tf32 on a GPU (as fla's do): 2.6e-4 on an H200;
    # the interpreter computes them in fp32
    assert rel_err(s, s_ref) < (1e-3 if backend == "triton_chunked" and DEVICE == "cuda" else TOL)
    assert rel_err(y, y_ref) < 1e-2  # y itself is rounded to bf16


# the step-by-step kernel under the interpreter takes seconds here; the kernel checks above cover it in the fast tier
@pytest.mark.parametrize("backend", ["triton_chunked", pytest.param("triton", marks=pytest.mark.slow)],
                         indirect=True)
def test_backbone_gradients_through_triton_match_chunked(backend, monkeypatch):
    from modrwkv import RWKV7Config
    from tests.conftest import random_backbone

    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    target = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = {}
    for name in ("chunked", backend):
        monkeypatch.setenv("MODRWKV_WKV7_BACKEND", name)
        model = random_backbone(RWKV7Config(vocab_size=97, n_layer=2, n_embd=64, head_size=16)).to(DEVICE).train()
        logits, _ = model(ids)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 97), target.reshape(-1)).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads["chunked"].items():
        assert rel_err(grads[backend][name], g) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_fp64(backend, dtype):
    xs, s0 = wkv_inputs(2, 1000, 4, 64, seed=9)
    y_ref, s_ref = wkv7(*xs, initial_state=s0, backend="reference")
    cuda = [x.to("cuda", dtype).requires_grad_() for x in xs]
    y, s = wkv7(*cuda, initial_state=s0.cuda().float(), backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(y.cpu(), y_ref) < tol and rel_err(s.cpu(), s_ref) < tol
    (y.float().sum() + s.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in cuda)


@pytest.mark.gpu
def test_cuda_long_sequence_in_pieces_equals_one_call(backend):
    """T = 4096 at the backbone's head size, split at a point inside a chunk: the carried state is exact."""
    xs, s0 = wkv_inputs(1, 4096, 2, 64, seed=11)
    cuda = [x.to("cuda", torch.float32) for x in xs]
    y, s = wkv7(*cuda, initial_state=s0.cuda().float(), backend=backend)
    y1, s1 = wkv7(*(x[:, :1001] for x in cuda), initial_state=s0.cuda().float(), backend=backend)
    y2, s2 = wkv7(*(x[:, 1001:] for x in cuda), initial_state=s1, backend=backend)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-5 and rel_err(s2, s) < 1e-5
    y_ref, s_ref = wkv7(*(x.double() for x in cuda), initial_state=s0.cuda(), backend="chunked")
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4


@pytest.mark.gpu
def test_cuda_bf16_backbone_training_step_matches_fp32_chunked(backend, monkeypatch):
    """A bf16-autocast training step through the compiled kernel: loss and gradients near the fp32 chunked ones.

    The backbone is the official init with the zero-initialised matrices made small, like one early in training:
    `random_backbone`'s large weights make the first layers' gradients chaotic, so bf16 rounding alone turns them
    (also with the chunked backend on CPU)."""
    from modrwkv import RWKV7, RWKV7Config

    config = RWKV7Config(vocab_size=256, n_layer=2, n_embd=128, head_size=64)
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(2)).cuda()
    results = {}
    for run, autocast in (("chunked", False), (backend, True)):
        monkeypatch.setenv("MODRWKV_WKV7_BACKEND", run)
        torch.manual_seed(0)
        model = RWKV7(config).init_weights()
        with torch.no_grad():
            for name, p in model.named_parameters():
                zero_at_init = name.endswith(("att.output.weight", "ffn.value.weight"))
                if zero_at_init or name.split(".")[-1] in ("w1", "a1", "v1", "g1"):
                    p.normal_(0, 0.02)
        model = model.cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        results[run] = loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    (loss32, g32), (loss16, g16) = results["chunked"], results[backend]
    assert abs(loss16 - loss32) / loss32 < 1e-2
    assert len(g32) == len(g16) and all(g.norm() > 0 for g in g32.values())  # every parameter in use is reached
    for name, g in g32.items():
        assert torch.isfinite(g16[name]).all(), name
        assert torch.nn.functional.cosine_similarity(g16[name].flatten(), g.flatten(), dim=0) > 0.99, name
