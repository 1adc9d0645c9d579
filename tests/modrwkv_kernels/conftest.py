import pytest
import torch


@pytest.fixture(autouse=True)
def first_launch_on_gpu(monkeypatch):
    """On a GPU the chunked kernels' autotuning would compile and time every launch for each new key, minutes over
    these tests (the GPU rehearsal gives them 150 s): they run the first fitting launch, as the interpreter does;
    the tests of the choice set their own."""
    if not torch.cuda.is_available():
        return
    from modrwkv_kernels.wkv7 import triton_chunked

    def first(configs, named_args, **kwargs):
        return triton_chunked._launches_for(configs, named_args, **kwargs)[:1]

    for kernel in (triton_chunked._chunk_fwd_kernel, triton_chunked._chunk_bwd_kernel):
        monkeypatch.setattr(kernel, "early_config_prune", first)
        monkeypatch.setattr(kernel, "cache", {})
