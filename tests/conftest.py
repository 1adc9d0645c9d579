import os
import signal
import time

import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be on before any
# @triton.jit runs; with one, the same tests run the compiled kernels on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The official `rwkv` package reads this at import time.
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")

import pytest  # noqa: E402

from modrwkv import RWKV7, RWKV7Config  # noqa: E402

# the real local services (S3, MLflow, Ray head) as session fixtures
pytest_plugins = ["tests.services"]


def random_backbone(config: RWKV7Config, seed: int = 0) -> RWKV7:
    """The official init, then the zero-initialised matrices (att.output, ffn.value, first LoRA factors) and the
    embedding made random, so every part of the recurrence moves the logits."""
    torch.manual_seed(seed)
    model = RWKV7(config).init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("att.output.weight", "ffn.value.weight")) or name.split(".")[-1] in ("w1", "a1", "v1", "g1"):
                p.normal_(0, 0.3)
            elif name.split(".")[-1] in ("w2", "a2", "v2", "g2"):
                p.add_(torch.randn_like(p) * 0.3)
            elif name == "emb.weight":
                p.normal_(0, 1.0)
    return model.eval()


def signal_self(signum: int = signal.SIGINT) -> None:
    """A signal to this process, as `kill` or Ctrl-C sends it; its Python handler runs in the main thread meanwhile."""
    os.kill(os.getpid(), signum)
    time.sleep(0.5)


@pytest.fixture
def stop_signals_at_defaults():
    """SIGTERM and SIGHUP at their defaults, as in a terminal (under nohup the tests inherit SIGHUP ignored); the
    handlers of before (SIGINT's too) put back after the test, which yields them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    yield saved
    for s, handler in saved.items():
        signal.signal(s, handler)


# each reads a tensor's values back to the host, which on a GPU waits for all the queued work
SYNCING_CALLS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "equal")


@pytest.fixture
def device_reads(monkeypatch):
    """The names of the torch calls made that read values back from a tensor, in order. Host-side layout work is
    done in numpy (which refuses a CUDA tensor), so on a GPU each call counted here would be a sync."""
    calls = []
    for name in SYNCING_CALLS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _name=name, _original=original, **kw: calls.append(_name)
                            or _original(self, *a, **kw))
    monkeypatch.setattr(torch, "equal", lambda *a, _original=torch.equal: calls.append("equal") or _original(*a))
    return calls


@pytest.fixture
def make_backbone():
    return random_backbone


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; the CPU path has its own tests")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting one costs ~5 s)."""
    import ray

    from infra.local_ray import init_ray

    init_ray(local={"num_cpus": 3}, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
