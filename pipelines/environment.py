"""What a run's figures can move with between machines, for its MLflow tags: the versions of the packages that
compute them (the scores' too: jiwer's WER, rwkv's vocabulary), the CPU's vector instructions (torch's, oneDNN's
and MKL's kernels pick their code path by them, so one seed's features, probe and model can differ in their last
bits, and a borderline answer can flip), and the GPUs with their CUDA, cuDNN and driver versions where a process
sees one (bf16 kernels, autotuned Triton configs and cuBLAS's algorithms differ between them)."""

import os
import platform
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "numpy", "transformers", "deepspeed", "ray", "triton", "fla-core", "scikit-learn", "mlflow",
            "jiwer", "rwkv")
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


def gpu_tags(prefix: str = "env.") -> dict[str, str]:
    """{prefix + "gpu": the devices this process sees, e.g. "NVIDIA H100 80GB HBM3 (sm_90) x8", prefix + "cuda": the
    CUDA build, cuDNN and driver versions}; {} without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    devices = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
               for i in range(torch.cuda.device_count())]
    kinds = ", ".join(f"{d} x{devices.count(d)}" for d in dict.fromkeys(devices))
    return {f"{prefix}gpu": kinds, f"{prefix}cuda": f"{torch.version.cuda} (cuDNN {torch.backends.cudnn.version()}, "
                                                    f"driver {driver_version()})"}


def driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or failing: a tag says so rather than fail the run
        return "unknown"


def environment_tags(prefix: str = "env.") -> dict[str, str]:
    """{prefix + "cpu": ..., prefix + "<package>": version, and `gpu_tags`'} for this process's machine."""
    return {f"{prefix}cpu": cpu_description(), **{f"{prefix}{name}": package_version(name) for name in PACKAGES},
            **gpu_tags(prefix)}


def merged_tags(environments: Iterable[dict[str, str]], prefix: str) -> dict[str, str]:
    """Several processes' `environment_tags("")` as one set of tags under `prefix`: each key's distinct values in
    the order first seen, joined by " | " (one value where the processes agree)."""
    values: dict[str, dict[str, None]] = {}
    for tags in environments:
        for key, value in tags.items():
            values.setdefault(key, {})[value] = None
    return {f"{prefix}{key}": " | ".join(seen) for key, seen in values.items()}


def require_cuda(setting: str) -> None:
    """A process a config sends to a GPU (`setting` names the option) and that sees none (a CPU build of torch, a
    driver too old for the wheel) fails here, rather than run on, on its CPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{setting} asks for a GPU, but this process sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the node's driver and torch build")
