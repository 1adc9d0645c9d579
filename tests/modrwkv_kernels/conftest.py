import pytest
import torch


@pytest.fixture(autouse=True)
def first_launch_on_gpu(monkeypatch):
    """On a GPU the chunked kernels' autotuning would compile and time every launch for each new key, minutes over
    these tests (the GPU rehearsal gives them 150 s), and keep the timings on disk: they run the first launch
    pinned, as the interpreter does, nothing kept; the tests of the choice set their own."""
    if not torch.cuda.is_available():
        return
    from modrwkv_kernels.wkv7 import triton_chunked

    first = triton_chunked.LAUNCHES[0]
    monkeypatch.setenv(triton_chunked.LAUNCH_ENV, f"{first.kwargs['BLOCK_V']},{first.num_warps}")
    for kernel in triton_chunked.TUNED.values():
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "cache_results", False)
