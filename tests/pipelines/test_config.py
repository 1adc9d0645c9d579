"""YAML configs are checked at load: readable errors that name the file and the key."""

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.encode import EncodeConfig


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_merge_keys_still_read_under_the_duplicate_key_check(tmp_path):
    text = ("dataset: {format: series, path: s.csv, lookback: 48}\nencoder: {kind: raw}\n"
            "run:\n  <<: {actors: 2, batch_size: 8}\n  batch_size: 4\n")
    config = load_config(write(tmp_path, text), EncodeConfig)
    assert (config.run.actors, config.run.batch_size) == (2, 4)  # the mapping's own key wins over the merged


def test_valid_config_with_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "dataset: {format: series, path: s.csv, lookback: 48}\nencoder: {kind: raw}\n")
    config = load_config(path, EncodeConfig, {"run.actors": 2})
    assert config.dataset.lookback == 48 and config.dataset.horizon == 24 and config.run.actors == 2
    assert config.cache.shard_size == 256 and config.limits.max_audio_seconds == 30.0


@pytest.mark.parametrize("text, message", [
    ("dataset: {format: parquet, path: x}\nencoder: {kind: raw}", "dataset.format: must be one of"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {batch_sise: 4}",
     "run: unknown key 'batch_sise' \\(did you mean 'batch_size'\\?\\)"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {actors: two}", "run.actors: expected int, got 'two'"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {in_process_max_items: -1}",
     "in_process_max_items must be 0 \\(always Ray\\) or more"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {batch_size: 0}",
     "run.batch_size must be 1 or more, got 0"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {actors: 0}",
     "run.actors must be 1 or more, got 0"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {gpus_per_actor: -1}",
     "run.gpus_per_actor must be 0 or more, got -1"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nlimits: {min_series_length: 0}",
     "limits.min_series_length must be 1 or more, got 0"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nlimits: {max_audio_seconds: 0.01}",
     "need 0 <= min_audio_seconds < max_audio_seconds, got 0.05 and 0.01"),
    ("dataset: {format: series, path: x}", "encoder: required"),
    ("dataset: {format: series, path: x}\nencoder: {kind: clip}", "encoder.model_dir is required"),
    ("dataset: {format: series, path: x, fractions: [0.5, 0.5]}\nencoder: {kind: raw}", "fractions must be three"),
    ("dataset: {format: asr_jsonl, path: x}\nencoder: {kind: whisper, model_dir: w, layer: -2}",
     "encoder.layer applies to vision encoders, not 'whisper'"),
    ("dataset: {format: aishell, path: data_aishell/transcript/aishell_transcript_v0.8.txt}\nencoder: {kind: raw}",
     "dataset.media_root is required for aishell"),
    ("dataset: {format: series, path: x, split_rows: [8640, 2880, 14400]}\nencoder: {kind: raw}",
     "split_rows must be three increasing row numbers"),
    ("dataset: {format: llava, path: x}\nencoder: {kind: raw}", "encoder.kind 'raw' is for series"),
    ("dataset: {format: llava, path: x}\nencoder: {kind: whisper, model_dir: w}",
     "encoder.kind 'whisper' does not encode image \\(dataset.format 'llava'\\); image encoders: \\['clip', "),
    ("dataset: {format: series, path: x, lookback: 4}\nencoder: {kind: raw}",
     "dataset.lookback 4 is shorter than limits.min_series_length 8: every window would be rejected"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nrun: {actors: 4}\nrun: {batch_size: 8}",
     "not valid YAML: .*the key 'run' is given twice"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\n? [1, 2]\n: 3", "\\[1, 2\\] cannot be a key"),
    ("dataset: [", "not valid YAML"),
    # options that were accepted and ignored, yet keyed (another entry of the same data), or failed at run time
    ("dataset: {format: llava, path: x, prompt: Describe it., lookback: 48}\nencoder: {kind: clip, model_dir: c}",
     "dataset.lookback, dataset.prompt applies to series, not dataset.format 'llava'"),
    ("dataset: {format: asr_jsonl, path: x, each_folder: true}\nencoder: {kind: whisper, model_dir: w}",
     "dataset.each_folder applies to series"),
    ("dataset: {format: llava, path: x}\nencoder: {kind: clip, model_dir: c, image_size: 0}",
     "encoder.image_size must be a positive number of pixels, got 0"),
    ("dataset: {format: series, path: x}\nencoder: {kind: raw}\nmax_length: 0", "max_length must be 1 or more"),
])
def test_bad_configs_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text), EncodeConfig)
    assert str(info.value).startswith(str(tmp_path / "c.yaml"))


def test_zero_stage_3_is_refused_at_load_with_why(tmp_path):
    from pipelines.train import TrainConfig

    text = (CONFIGS / "demo" / "train.yaml").read_text().replace("zero_stage: 2", "zero_stage: 3")
    with pytest.raises(ConfigError, match="deepspeed: zero_stage 3 is not supported yet: .* use zero_stage 2"):
        load_config(write(tmp_path, text), TrainConfig)


@pytest.mark.parametrize("override, message", [
    ({"phase1.global_batch": 0}, "phase1: global_batch must be a positive multiple of micro_batch 8, not 0"),
    ({"phase2.global_batch": 12}, "phase2: global_batch must be a positive multiple of micro_batch 8, not 12"),
    ({"phase1.warmup_steps": -5}, r"phase1: warmup_steps must be 0 or more and fewer than steps \(300\), not -5"),
    ({"phase1.steps": 5}, r"phase1: warmup_steps must be 0 or more and fewer than steps \(5\), not 5"),
    ({"phase2.min_lr_ratio": 2.0}, "phase2: min_lr_ratio must be between 0 and 1"),
    ({"phase1.grad_clip": -1.0}, "phase1: grad_clip must be 0 or more, not -1.0"),
    ({"phase2.weight_decay": -0.1}, "phase2: weight_decay must be 0 or more, not -0.1"),
    ({"phase2.checkpoint_every": -10}, "phase2: checkpoint_every must be 0 or more, not -10"),
    ({"scaling.workers": 0}, "scaling: workers must be 1 or more, not 0"),
    ({"scaling.workers": 4},
     r"phase1.global_batch 16 is not a multiple of micro_batch x scaling.workers = 8 x 4 = 32"),
    ({"name": "../other-run"}, "name '../other-run': one folder's name, without '/'"),  # out of output_dir
    ({"name": ".."}, "name '..': one folder's name"),
    # Python's True == 1 and 2.0 == 2: a choice of numbers takes numbers of its type only
    ({"deepspeed.zero_stage": True}, r"deepspeed.zero_stage: must be one of \[0, 1, 2, 3\], got True"),
    ({"deepspeed.zero_stage": 2.0}, r"deepspeed.zero_stage: must be one of \[0, 1, 2, 3\], got 2.0"),
    # a misspelt modality's projector was never built, its settings silently unused
    ({"model.projectors": {"imgae": {"kernel": 3, "stride": 2}}},
     r"model: projectors: unknown modalities \['imgae'\]; known: \['audio', 'image', 'series'\]"),
    ({"model.projectors": {1: {"kernel": 3, "stride": 2}}}, "model.projectors key 1: expected str, got 1"),
    # a negative interval started a monitor per node with no interval; Ray refused 0 CPUs a worker only in the workers
    ({"tracking.system_metrics_every_s": -1}, "tracking: system_metrics_every_s must be 0 .off. or more, not -1"),
    ({"scaling.cpus_per_worker": 0}, "scaling: cpus_per_worker must be 1 or more and max_failures -1 .* not 0"),
    ({"scaling.max_failures": -2}, r"max_failures -1 \(for ever\), 0 or more, not 1 and -2"),
    ({"max_length": 0, "packing": False}, "max_length must be 1 or more, not 0"),
    ({"pack_buffer": 0, "packing": True}, "packing needs a pack_buffer of 1 or more, not 0"),
    # a WaveNet of no layers failed in the workers on a TypeError from relu, naming nothing
    ({"model.wavenet": {"layers": 0}}, "model.wavenet: layers must be 1 or more, not 0"),
    ({"model.wavenet": {"kernel": 0}}, "model.wavenet: kernel must be 1 or more, not 0"),
])
def test_bad_training_settings_are_refused_at_load(override, message):
    """Not in the workers, after the MLflow run, the caches and Ray have started (where Ray retried it)."""
    from pipelines.train import TrainConfig

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, override)


def test_ray_trains_failure_settings_load_as_ray_takes_them():
    from pipelines.train import TrainConfig

    config = load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, {"scaling.max_failures": -1})
    assert config.scaling.max_failures == -1  # Ray Train's "retry for ever"


def test_one_process_is_one_worker_in_the_global_batch(monkeypatch, capsys):
    """A global batch of 16 in micro-batches of 8 cannot be split over 4 Ray workers, but one process
    accumulates it in two micro-steps: `--single-process` loads the config as its one worker."""
    import pipelines.train_local
    from pipelines.cli import main

    started = []
    monkeypatch.setattr(pipelines.train_local, "run_single_process", lambda config, phase: started.append(config))
    command = ["train", "--config", str(CONFIGS / "demo" / "train.yaml"), "--phase", "1", "--set", "scaling.workers=4"]
    assert main(command) == 2
    assert "not a multiple of micro_batch x scaling.workers = 8 x 4 = 32" in capsys.readouterr().err
    assert not started
    assert main([*command, "--single-process"]) == 0
    assert [c.scaling.workers for c in started] == [1]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml", EncodeConfig)


def test_a_folder_or_a_file_that_is_not_a_mapping_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read it as a config file \\(Is a directory\\)"):
        load_config(tmp_path, EncodeConfig)
    with pytest.raises(ConfigError, match=r"c\.yaml: expected a mapping, got \['a'\]"):
        load_config(write(tmp_path, "- a\n"), EncodeConfig, {"run.actors": 2})


def test_set_overrides_are_typed_checked_and_named(tmp_path):
    from pipelines.config import parse_overrides
    from pipelines.train import TrainConfig

    overrides = parse_overrides(["phase1.steps=30", "scaling.workers=1", "phase2.mix=[2, 1, 1]",
                                 "model.backbone.path=runs/x.pth"])
    assert overrides == {"phase1.steps": 30, "scaling.workers": 1, "phase2.mix": [2, 1, 1],
                         "model.backbone.path": "runs/x.pth"}
    config = load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, overrides)
    assert config.phase1.steps == 30 and config.scaling.workers == 1 and config.model.backbone.path == "runs/x.pth"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["phase1.steps"])
    with pytest.raises(ConfigError, match=r"phase1\.steps: expected int, got 'many'"):
        load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, parse_overrides(["phase1.steps=many"]))
    with pytest.raises(ConfigError, match="unknown key 'stepz'.*steps"):
        load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, parse_overrides(["phase1.stepz=3"]))
    with pytest.raises(ConfigError, match=r"--set scaling\.workers\.n: scaling\.workers is 2, not a mapping"):
        load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, parse_overrides(["scaling.workers.n=1"]))
    with pytest.raises(ConfigError, match="'scaling..workers' has an empty part between its dots"):
        parse_overrides(["scaling..workers=1"])
    with pytest.raises(ConfigError, match="--set phase1.steps is given twice"):  # as a YAML key: not the last alone
        parse_overrides(["phase1.steps=3", "phase1.steps=30"])
    text = (CONFIGS / "demo" / "train.yaml").read_text() + "tracking:\n"  # an empty section takes keys too
    config = load_config(write(tmp_path, text), TrainConfig, parse_overrides(["tracking.experiment=x"]))
    assert config.tracking.experiment == "x"


def test_an_exponent_without_a_dot_is_a_number():
    """The help's own example, `--set phase1.lr=5e-4`, was refused: YAML 1.1 reads `5e-4` as a string."""
    from pipelines.config import parse_overrides
    from pipelines.train import TrainConfig

    config = load_config(CONFIGS / "paper" / "train_vision.yaml", TrainConfig,
                         parse_overrides(["phase1.lr=5e-4", "phase2.lr=1E-5", "scaling.workers=1"]))
    assert (config.phase1.lr, config.phase2.lr) == (5e-4, 1e-5)
    with pytest.raises(ConfigError, match=r"phase1\.lr: expected a finite number, got inf"):
        load_config(CONFIGS / "demo" / "train.yaml", TrainConfig, parse_overrides(["phase1.lr=1e999"]))


def test_set_changes_one_place_of_an_anchored_mapping(tmp_path):
    """YAML makes an anchor and its alias one object: `--set phase1.steps` changed phase II's steps as well."""
    from pipelines.config import parse_overrides
    from pipelines.train import TrainConfig

    lines = (CONFIGS / "demo" / "train.yaml").read_text().splitlines()
    lines = [("phase1: &phase " + line.removeprefix("phase1: ")) if line.startswith("phase1:") else line
             for line in lines if not line.startswith("phase2:")] + ["phase2: *phase"]
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert load_config(path, TrainConfig).phase2.steps == 300
    config = load_config(path, TrainConfig, parse_overrides(["phase1.steps=7"]))
    assert (config.phase1.steps, config.phase2.steps) == (7, 300)


def test_set_on_the_command_line_fails_before_any_work(capsys):
    from pipelines.cli import main

    assert main(["train", "--config", str(CONFIGS / "demo" / "train.yaml"), "--phase", "1",
                 "--set", "scaling.workerz=2"]) == 2
    assert "unknown key 'workerz'" in capsys.readouterr().err
