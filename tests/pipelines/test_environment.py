"""A run's environment tags: the CPU's model and vector instructions as /proc/cpuinfo names them, and the installed
versions of the packages that compute its figures."""

import numpy as np
import pytest
import torch

from pipelines.environment import cpu_description, environment_tags, require_cuda


def test_cpu_description_names_the_model_and_its_vector_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16\n"
                       "\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16\n")
    assert cpu_description(cpuinfo) == "AMD EPYC 9R14 (avx2, avx512f, avx512_bf16)"
    cpuinfo.write_text("model name\t: Neoverse\nflags\t\t: fp asimd\n")  # none of the x86 instructions
    assert cpu_description(cpuinfo) == "Neoverse"
    assert cpu_description(tmp_path / "missing")  # not Linux: what Python calls the machine


def test_environment_tags_hold_this_machine_and_its_packages():
    tags = environment_tags("env.node1.")
    assert tags["env.node1.numpy"] == np.__version__
    assert tags["env.node1.cpu"] == cpu_description()
    assert set(tags) >= {"env.node1.torch", "env.node1.deepspeed", "env.node1.ray"}
    assert not any(v == "not installed" for k, v in tags.items() if k.endswith((".torch", ".numpy", ".ray")))


def test_a_gpu_process_tags_its_devices_and_cuda_versions(monkeypatch):
    """Two runs on other GPUs or CUDA builds had the same tags; the scores' packages (jiwer's WER, rwkv's vocabulary)
    were not named either. Without a GPU there is no GPU tag (this machine's case)."""
    assert "env.gpu" not in environment_tags() or torch.cuda.is_available()
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 80GB HBM3", 2: "NVIDIA A10G"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", names.get)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6) if i == 2 else (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    tags = environment_tags()
    assert tags["env.gpu"] == "NVIDIA H100 80GB HBM3 (sm_90) x2, NVIDIA A10G (sm_86) x1"
    assert tags["env.cuda"].startswith("12.8 (cuDNN 91002, driver ")
    assert {"env.jiwer", "env.rwkv", "env.fla-core"} <= set(tags) and tags["env.jiwer"] != "not installed"


def test_several_processes_tags_merge_into_one_set_naming_each_distinct_value():
    """An evaluation's actors may run on other machines than its driver, and on several kinds: each tag holds every
    value seen, once, in the order first seen."""
    from pipelines.environment import merged_tags

    h100 = {"cpu": "Xeon (avx2)", "gpu": "NVIDIA H100 (sm_90) x1", "torch": "2.13.0", "device": "cuda"}
    a10g = {**h100, "gpu": "NVIDIA A10G (sm_86) x1"}
    assert merged_tags([h100, a10g, h100], "env.predictors.") == {
        "env.predictors.cpu": "Xeon (avx2)", "env.predictors.gpu": "NVIDIA H100 (sm_90) x1 | NVIDIA A10G (sm_86) x1",
        "env.predictors.torch": "2.13.0", "env.predictors.device": "cuda"}
    assert merged_tags([], "env.predictors.") == {}


def test_a_process_sent_to_a_gpu_it_lacks_fails_naming_the_setting(monkeypatch):
    """A training worker (scaling.use_gpu) or an eval actor (gpus_per_actor) on a node whose torch sees no GPU stops
    with the reason, before it loads anything, instead of running on its CPU."""
    from pipelines.eval_tasks import TASKS
    from pipelines.evaluate import EvalConfig, Predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="scaling.use_gpu asks for a GPU, but this process sees no CUDA device"):
        require_cuda("scaling.use_gpu")
    with pytest.raises(RuntimeError, match="gpus_per_actor asks for a GPU"):
        Predictor("no-such-checkpoint", "no-such-cache", TASKS["vqa"], device="cuda")
    with pytest.raises(ValueError, match="gpus_per_actor must be 0 or more"):
        EvalConfig(checkpoint="c", task="vqa", cache="c", gpus_per_actor=-1)
    # refused at load, before the cache is resolved (and maybe encoded) and an actor fails with it
    for setting, message in (({"max_new_tokens": 0}, "max_new_tokens must be 1 or more, not 0"),
                             ({"actors": -1}, "actors must be 0 or more, not -1"),
                             ({"register_as": "mine", "track": False}, "register_as 'mine' registers in MLflow")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(checkpoint="c", task="vqa", cache="c", **setting)
