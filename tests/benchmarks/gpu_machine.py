"""A benchmark run as the lent GPU machine runs it: as a script, in a Python where the job frameworks and audio
libraries absent from that machine cannot be imported."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_ON_THE_GPU_MACHINE = ("soundfile", "librosa", "ray", "mlflow", "deepspeed", "webdataset", "boto3")
RUN_WITHOUT_THEM = ("import runpy, sys\n"
                    "_, blocked, script, *args = sys.argv\n"
                    "for name in blocked.split(','):\n"
                    "    sys.modules[name] = None  # import raises, find_spec answers 'not installed'\n"
                    "sys.argv = [script, *args]\n"
                    "runpy.run_path(script, run_name='__main__')\n")


def run_benchmark(script: str, *args: str) -> None:
    """`python benchmarks/<script> args...` without the packages the GPU machine lacks; fails on a non-zero exit."""
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_THEM, ",".join(NOT_ON_THE_GPU_MACHINE), f"benchmarks/{script}",
                    *args], cwd=ROOT, check=True, capture_output=True, text=True)
