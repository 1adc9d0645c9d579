import pytest

from pipelines.schedule import warmup_cosine


@pytest.mark.parametrize("warmup", [0, 2])
def test_the_peak_is_reached_once_and_the_floor_at_the_last_step(warmup):
    multipliers = [warmup_cosine(step, 10, warmup, 0.1) for step in range(10)]
    assert multipliers[:warmup] == [(s + 1) / warmup for s in range(warmup)]
    decay = multipliers[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # no step held at the peak
    assert max(multipliers) == pytest.approx(1.0, abs=0.03) and multipliers.count(max(multipliers)) == 1
    assert multipliers[-1] == pytest.approx(0.1)


def test_a_resume_on_another_schedule_says_where_its_lr_jumps(capsys):
    """A phase of 100 steps that ended (min_lr_ratio 0: lr 0) resumed with steps raised to 200 starts halfway up the
    longer cosine: refused at its last step with why, and a resume at step 60 under the longer schedule is let
    through with both lrs named; the same schedule says nothing; a checkpoint without a record, nothing."""
    from types import SimpleNamespace

    from pipelines.schedule import lr_at, schedule_of
    from pipelines.train import check_resumable
    from pipelines.train_config import PhaseConfig

    def plan(steps):
        return SimpleNamespace(hp=PhaseConfig(lr=1e-3, steps=steps, global_batch=8, warmup_steps=5,
                                              min_lr_ratio=0.0), destination="s3://b/run/phase1", opened=[])

    saved = {"step": 100, "schedule": schedule_of(plan(100).hp)}
    with pytest.raises(ValueError, match="saved at step 100, the last of phase 1's 100: nothing to resume .* "
                                         "its lr from then on the longer schedule's"):
        check_resumable(saved, "ckpt", plan(100), 1, SimpleNamespace(scaling=SimpleNamespace(workers=1)))
    check_resumable({**saved, "step": 60}, "ckpt", plan(200), 1, SimpleNamespace(scaling=SimpleNamespace(workers=1)))
    err = capsys.readouterr().err
    assert f"step 61 runs at lr {lr_at(schedule_of(plan(200).hp), 60):.3g}" in err
    assert f"the saved run's would be {lr_at(saved['schedule'], 60):.3g}" in err
    assert lr_at(schedule_of(plan(200).hp), 60) > 2 * lr_at(saved["schedule"], 60)
    check_resumable({**saved, "step": 60}, "ckpt", plan(100), 1, SimpleNamespace(scaling=SimpleNamespace(workers=1)))
    check_resumable({"step": 60}, "ckpt", plan(200), 1, SimpleNamespace(scaling=SimpleNamespace(workers=1)))
    assert capsys.readouterr().err == ""


def test_a_checkpoint_resumes_only_its_own_phase_and_decay_groups():
    """Phase I's checkpoint holds no backbone states for phase II to resume, and phase II's would load its backbone
    into phase I's frozen one; an optimizer state saved without weight decay has no decayed group to resume with one
    (and the reverse): refused by the driver, before workers start (one written before checkpoints named their phase
    or decay is left to the workers). Another decay above 0 is taken (the trainer sets it)."""
    from types import SimpleNamespace

    from pipelines.train import check_resumable
    from pipelines.train_config import PhaseConfig

    plan = SimpleNamespace(hp=PhaseConfig(lr=1e-3, steps=100, global_batch=8), destination="out", opened=[])
    config = SimpleNamespace(scaling=SimpleNamespace(workers=1))
    check_resumable({"phase": 2, "step": 60}, "ckpt", plan, 2, config)
    check_resumable({"step": 60}, "ckpt", plan, 2, config)
    with pytest.raises(ValueError, match="ckpt: a phase 1 checkpoint cannot resume phase 2"):
        check_resumable({"phase": 1, "step": 60}, "ckpt", plan, 2, config)
    decayed = SimpleNamespace(**{**vars(plan), "hp": PhaseConfig(lr=1e-3, steps=100, global_batch=8, weight_decay=0.1)})
    check_resumable({"phase": 2, "step": 60, "weight_decay": 0.01}, "ckpt", decayed, 2, config)  # 0.1 from step 61
    with pytest.raises(ValueError, match="ckpt: saved with weight_decay 0.01, resumed with 0.0: .* set "
                                         "phase2.weight_decay above 0"):
        check_resumable({"phase": 2, "step": 60, "weight_decay": 0.01}, "ckpt", plan, 2, config)


def test_phase_one_resumes_only_on_the_backbone_it_was_saved_over(tmp_path, capsys):
    """Phase I's checkpoints hold no backbone: a resume built it from whatever the config named, and the adapter went
    on over other weights without a word (the model folder then recorded the new backbone, so phase II's check
    passed too). The same weights elsewhere (another mount, a copy) are taken."""
    from types import SimpleNamespace

    from pipelines.train import check_resumable
    from pipelines.train_config import PhaseConfig

    config = SimpleNamespace(scaling=SimpleNamespace(workers=1))
    for name, content in (("a.pth", b"weights a"), ("copy-of-a.pth", b"weights a"), ("b.pth", b"weights b")):
        (tmp_path / name).write_bytes(content)
    here = {"path": str(tmp_path / "a.pth")}

    def plan(backbone):
        return SimpleNamespace(hp=PhaseConfig(lr=1e-3, steps=100, global_batch=8), destination="out", opened=[],
                               backbone=backbone)

    check_resumable({"phase": 1, "step": 60, "backbone": here}, "ckpt", plan(here), 1, config)
    check_resumable({"phase": 1, "step": 60}, "ckpt", plan(here), 1, config)  # saved before it was recorded
    check_resumable({"phase": 1, "step": 60, "backbone": here}, "ckpt", plan({"path": str(tmp_path / "copy-of-a.pth")}),
                    1, config)
    with pytest.raises(ValueError, match=f"ckpt: phase I trained its adapter on the backbone {here['path']} .*, this "
                                         f"config names {tmp_path / 'b.pth'} .*: point model.backbone.path"):
        check_resumable({"phase": 1, "step": 60, "backbone": here}, "ckpt", plan({"path": str(tmp_path / "b.pth")}),
                        1, config)
    uri = {"path": "s3://b/rwkv7.pth", "sha256": "a" * 64}
    with pytest.raises(ValueError, match=r"names s3://b/rwkv7.pth \(bbbbbbbbbbbb\)"):
        check_resumable({"phase": 1, "step": 60, "backbone": uri}, "ckpt", plan({**uri, "sha256": "b" * 64}), 1,
                        config)
    check_resumable({"phase": 2, "step": 60, "backbone": here}, "ckpt", plan(uri), 2, config)  # phase II holds its own
    gone = {"path": "/mnt/elsewhere/rwkv7.pth"}  # saved on another machine: said, not refused
    check_resumable({"phase": 1, "step": 60, "backbone": gone}, "ckpt", plan(here), 1, config)
    assert "/mnt/elsewhere/rwkv7.pth, which this machine cannot read" in capsys.readouterr().err
