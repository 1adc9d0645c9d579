import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modrwkv import RWKV7Config
from pipelines.cli import main
from tests.conftest import random_backbone


def test_help_lists_the_jobs():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("convert", "generate", "demo"):
        assert command in out.stdout


@pytest.mark.parametrize("args", [["cache", "gc", "--grace-hours", "-1"], ["cache", "local", "--unused-days", "-2"]])
def test_a_negative_age_is_refused_before_anything_is_listed(args, capsys):
    """A cut-off in the future would take the files a job is writing now."""
    with pytest.raises(SystemExit):
        main(args)
    assert "must be 0 or more, not -" in capsys.readouterr().err


def test_convert_both_ways_and_generate(tmp_path, capsys):
    model = random_backbone(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=32))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert main(["convert", "--to", "fla", str(tmp_path / "m.pth"), str(tmp_path / "fla")]) == 0
    assert main(["convert", "--to", "rwkv", str(tmp_path / "fla"), str(tmp_path / "back.pth")]) == 0
    assert main(["generate", "--model", str(tmp_path / "back.pth"), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("wrote")


@pytest.fixture
def prepared(monkeypatch):
    """Every model the CLI prepares for inference, kept to look at after the command."""
    from modrwkv import inference

    models, prepare = [], inference.prepare_for_inference
    monkeypatch.setattr(inference, "prepare_for_inference",
                        lambda *a, **k: models.append(prepare(*a, **k)) or models[-1])
    return models


def test_generate_quantizes_when_asked(tmp_path, capsys, prepared):
    from modrwkv.inference import QuantizedLinear

    torch.save(random_backbone(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=32)).state_dict(),
               tmp_path / "m.pth")
    for mode in ("int8", "bf16"):
        assert main(["generate", "--model", str(tmp_path / "m.pth"), "--prompt", "Hi", "--max-new-tokens", "3",
                     "--temperature", "0", "--quantize", mode]) == 0
        assert isinstance(prepared[-1].head, QuantizedLinear) and prepared[-1].head.mode == mode
    assert capsys.readouterr().out.startswith("Hi")


def test_bad_checkpoint_is_a_clear_cli_error(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["generate", "--model", str(tmp_path / "junk.pth"), "--prompt", "x"]) == 2
    assert "junk.pth" in capsys.readouterr().err


def test_plausible_mistakes_are_one_line_errors_without_a_traceback(tmp_path, monkeypatch, capsys):
    """A model URI naming nothing, an unreachable tracking server (its credentials left out of the message), a
    folder given as the config, a --set into a number, a resume of one process's run: one line naming it, exit 2."""
    from pipelines.cli import user_error

    configs = Path(__file__).resolve().parents[1] / "configs"
    store, server = f"sqlite:///{tmp_path / 'mlflow.db'}", "http://alice:s3cretTOKEN@127.0.0.1:9"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the unreachable server: fail at once
    for uri, argv, reason in (
            (store, ["chat", "--model", "models:/m-nosuch"], "Logged model with ID 'm-nosuch' not found"),
            (store, ["chat", "--model", "models:/nosuch"], "models:/nosuch: a registered model needs its version"),
            (store, ["chat", "--model", "models:/digits@prod"], "name=digits not found"),
            (store, ["chat", "--model", "models:/digits/latest"], "no version of 'digits' is registered"),
            (server, ["chat", "--model", "models:/digits/1"], "API request to http://127.0.0.1:9/api/"),
            (store, ["train", "--config", str(configs), "--phase", "1"],
             "cannot read it as a config file (Is a directory)"),
            (store, ["train", "--config", str(configs / "demo" / "train.yaml"), "--phase", "1",
                     "--set", "scaling.workers.=1"], "'scaling.workers.' has an empty part between its dots"),
            (store, ["train", "--config", str(configs / "demo" / "train.yaml"), "--phase", "1", "--single-process",
                     "--resume-from", "runs/x"], "--single-process starts a phase afresh")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert main(argv) == 2, argv
        err = capsys.readouterr().err  # MLflow's own log lines before it, when it creates the store
        assert err.splitlines()[-2].startswith(f"modrwkv {argv[0]}: error: ") and "Traceback" not in err, err
        assert err.splitlines()[-1] == "(where it came from: MODRWKV_TRACEBACK=1 modrwkv ...)"
        assert reason in err and "s3cret" not in err, err
    assert user_error(PermissionError(13, "Permission denied", "x.yaml")) == "[Errno 13] Permission denied: 'x.yaml'"
    assert user_error(TypeError("a bug")) is None  # keeps its traceback
    # a ValueError may be a bug deep in a job too: its traceback on asking, credentials still left out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MODRWKV_TRACEBACK", "1")
    assert main(["chat", "--model", "models:/digits/1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "API request to http://127.0.0.1:9/api/" in err and "s3cret" not in err, err


def test_a_bugs_traceback_is_printed_without_credentials(monkeypatch, capsys):
    """An error that is no user's mistake keeps its traceback, but a worker's MLflow error wrapped in Ray's names the
    tracking URI with its credentials."""
    import pipelines.cli

    def failing_job(args):
        raise RuntimeError("WorkerGroupError: API request to https://alice:s3cretTOKEN@mlflow.example/api failed")

    monkeypatch.setattr(pipelines.cli, "cmd_demo", failing_job)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in failing_job" in err and "https://mlflow.example/api" in err, err
    assert "s3cret" not in err


def test_encoder_options_are_per_medium(tmp_path):
    """One --encoder-dir went to every medium: an image and an audio clip together could not be asked about."""
    from types import SimpleNamespace

    from pipelines.cli import build_parser, load_media, per_medium

    args = build_parser().parse_args(["chat", "--model", "m", "--image", "a.png", "--audio", "b.wav",
                                      "--encoder-dir", "image=ENC_IMAGE", "--encoder-dir", "audio=a=b",
                                      "--encoder", "whisper"])
    assert args.encoder_dir == [("image", "ENC_IMAGE"), ("audio", "a=b")] and args.encoder == [(None, "whisper")]
    assert per_medium("--encoder-dir", args.encoder_dir, ["image", "audio"]) == {"image": "ENC_IMAGE", "audio": "a=b"}
    assert per_medium("--encoder-dir", [(None, "ENC")], ["audio"]) == {"audio": "ENC"}
    with pytest.raises(ValueError, match="--encoder whisper: with --image and --audio given, name the medium, e.g. "
                                         "--encoder image=whisper"):
        per_medium("--encoder", args.encoder, ["image", "audio"])
    with pytest.raises(ValueError, match="--encoder-dir audio=a=b: no --audio given"):
        per_medium("--encoder-dir", args.encoder_dir, ["image"])
    with pytest.raises(ValueError, match=r"--encoder-dir: image given twice \(X, Y\)"):
        per_medium("--encoder-dir", [("image", "X"), (None, "Y")], ["image"])
    (tmp_path / "co2.csv").write_text("co2\n315.7\n317.4\n")
    media = SimpleNamespace(image=None, audio=None, series=str(tmp_path / "co2.csv"), encoder_dir=None, encoder=None)
    with pytest.raises(ValueError, match=f"{tmp_path / 'co2.csv'}: not a CSV of numbers"):
        load_media(media, tmp_path, {})


def test_a_series_csv_reaches_its_encoder_in_float64(tmp_path, monkeypatch):
    """z-scored as the encode job does: read as float32, a series at 1e7 moving by hundredths was two values."""
    from types import SimpleNamespace

    import numpy as np

    import preprocessing.encoders.recorded as recorded
    from pipelines.cli import load_media

    values = 1e7 + 0.01 * np.arange(8)
    (tmp_path / "s.csv").write_text("\n".join(repr(float(v)) for v in values) + "\n")
    received = []

    class Encoders:
        def __init__(self, *args):
            pass

        def series(self, series, name):
            received.append(series)
            return SimpleNamespace(features=series)

    monkeypatch.setattr(recorded, "MediaEncoders", Encoders)
    load_media(SimpleNamespace(image=None, audio=None, series=str(tmp_path / "s.csv"), encoder_dir=None, encoder=None),
               tmp_path, {})
    assert received[0].dtype == np.float64 and np.array_equal(received[0], values)


@pytest.mark.slow
def test_chat_answers_several_questions_about_one_image(tmp_path, capsys, prepared):
    import numpy as np
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
    from preprocessing.cache.key import hash_model_dir
    from modrwkv.model_folder import write_records

    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    backbone_cfg = RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=32)
    config = ModRWKVConfig(backbone=backbone_cfg, projectors={"image": ProjectorConfig(encoder_dim=32, model_dim=64)})
    ModRWKV(config, backbone=random_backbone(backbone_cfg)).save_pretrained(tmp_path / "model")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "gray.png")  # grayscale: the CLI converts
    args = ["chat", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "gray.png"), "--encoder", "clip",
            "--encoder-dir", str(tmp_path / "clip"), "--question", "What is it?", "--question", "Colour?"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("User: ") == 2 and "Colour?" in out
    assert main(args + ["--quantize", "int8"]) == 0
    assert prepared[-1].backbone.head.mode == "int8" and prepared[-1].projectors["image"].adapter[0].mode == "int8"
    elsewhere = args[:args.index("--encoder-dir")] + ["--encoder-dir", str(tmp_path / "nowhere"), "--question", "x"]
    assert main(elsewhere) == 2
    assert f"{tmp_path / 'nowhere'}: no config.json" in capsys.readouterr().err
    # a trained model records its encoder: no --encoder needed, and other weights are refused
    clip_hash = hash_model_dir(tmp_path / "clip")
    write_records(tmp_path / "model", encoders={"image": {"kind": "clip", "weights_hash": clip_hash, "revision": 2}})
    without_kind = [a for a in args if a not in ("--encoder", "clip")]
    assert main(without_kind) == 0 and capsys.readouterr().out.count("User: ") == 2
    write_records(tmp_path / "model", encoders={"image": {"kind": "clip", "weights_hash": "0" * 64, "revision": 2}})
    assert main(without_kind) == 2 and "not the clip weights" in capsys.readouterr().err


@pytest.mark.parametrize("module,flag", [pytest.param("train", "--phase", marks=pytest.mark.slow),  # trains: 10 s
                                         ("encode", "--config"), ("evaluate", "--task")])
def test_job_modules_run_as_scripts(module, flag):
    """`python -m pipelines.<job>` is the entrypoint `ray job submit` runs on a cluster (ray_cluster.yaml)."""
    done = subprocess.run([sys.executable, "-m", f"pipelines.{module}", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout
    bad = subprocess.run([sys.executable, "-m", f"pipelines.{module}", "--config", "no/such.yaml"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    # train asks for its --phase first; the others name the missing file
    said = "the following arguments are required: --phase" if module == "train" else "no/such.yaml"
    assert bad.returncode == 2 and said in bad.stderr, bad.stderr


@pytest.mark.parametrize("command, module, function", [
    (["demo"], "pipelines.demo", "run_demo(out)"),
    # a single-process training: its MLflow run ends KILLED in `run_status`, not left RUNNING for ever
    (["train", "--config", "c.yaml", "--phase", "1", "--single-process"], "pipelines.train_local", "main(args)"),
    (["eval", "--config", "c.yaml"], "pipelines.evaluate", "main(args)"),  # its run, too
    (["encode", "--config", "c.yaml"], "pipelines.encode", "main(args)")])  # the entry's lease let go
def test_a_killed_run_unwinds_as_on_ctrl_c(command, module, function):
    """SIGTERM (`kill`, a closed terminal) reaches the job's `finally` (the demo shuts its local Ray down there, a
    training ends its MLflow run); by default the process would end on the spot and leave them as they were."""
    # the job's module stood in for, not imported (Ray, MLflow, torch: seconds)
    name = function.split("(")[0]
    stand_in = ("import os, signal, sys, time, types\n"
                f"def {function}:\n    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(30)\n"
                "    finally:\n        print('shut down', flush=True)\n"
                f"sys.modules['{module}'] = types.SimpleNamespace({name}={name})\n"
                f"from pipelines.cli import main\nmain({command!r})\n")
    done = subprocess.run([sys.executable, "-c", stand_in], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1],  # SIGTERM at its default, whatever this process inherited
                          preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert done.returncode == 128 + 15 and done.stdout == "shut down\n", done.stderr[-2000:]
