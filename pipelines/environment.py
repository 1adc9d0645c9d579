"""What a run's figures can move with between machines, for its MLflow tags: the versions of the packages that
compute them and the CPU's vector instructions (torch's, oneDNN's and MKL's kernels pick their code path by them,
so one seed's features, probe and model can differ in their last bits, and a borderline answer can flip)."""

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "numpy", "transformers", "deepspeed", "ray", "triton", "scikit-learn", "mlflow")
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")  # x86; /proc/cpuinfo's names


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and the vector instructions of `VECTOR_FLAGS` it offers, e.g. "AMD EPYC (avx2)"."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                model = value
            elif key == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the model as Python sees it
        pass
    offered = [f for f in VECTOR_FLAGS if f in flags]
    return f"{model} ({', '.join(offered)})" if offered else model


def environment_tags(prefix: str = "env.") -> dict[str, str]:
    """{prefix + "cpu": ..., prefix + "<package>": version} for this process's machine."""
    return {f"{prefix}cpu": cpu_description(), **{f"{prefix}{name}": package_version(name) for name in PACKAGES}}


def require_cuda(setting: str) -> None:
    """A process a config sends to a GPU (`setting` names the option) and that sees none (a CPU build of torch, a
    driver too old for the wheel) fails here, rather than run on, on its CPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{setting} asks for a GPU, but this process sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the node's driver and torch build")
