"""Short runs anneal: train.max_steps fits the whole lr schedule, warmup then cosine (or poly) to min_lr,
into the steps asked, without timm's scheduler warnings, and a resumed short run follows it exactly."""
import logging
import math

import pytest
import torch
from conftest import tiny_distill_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

import tinymim.tasks as tasks
from tinymim.core.rundir import RunDir
from tinymim.train.config import TrainConfig


def cosine(s: int, peak: float, low: float, warmup: int, length: int) -> float:
    """The lr after `s` optimizer steps, written out: linear from 0 over `warmup` steps, then a half-cycle
    cosine from `peak` to `low` over the remaining `length - warmup`."""
    if s < warmup:
        return peak * s / warmup
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (length - warmup)))


def run_recording_lrs(cfg, out) -> list[float]:
    """Train, returning the lr each optimizer step used (read as the optimizer steps)."""
    used = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(max(g["lr"] for g in opt.param_groups)))
    try:
        tasks.run("distill", cfg, out)
    finally:
        hook.remove()
    return used


def test_max_steps_fits_warmup_and_cosine_into_the_run(tmp_path, recwarn, caplog):
    # 256 images / batch 32 = 8 steps an epoch: 10 epochs plan 80 steps, max_steps ends the run at 16;
    # the warmup, 1 epoch of 10, keeps its share: 1.6 -> 2 steps
    cfg = tiny_distill_config(epochs=10, warmup_epochs=1, max_steps=16, blr=1e-3, min_lr=1e-5)
    caplog.set_level(logging.INFO)
    used = run_recording_lrs(cfg, tmp_path / "run")
    peak, length, warmup = 1e-3 * 32 / 256, 16, 2
    assert len(used) == length
    for k, lr in enumerate(used, 1):  # step k runs at the lr after k - 1 steps
        assert lr == pytest.approx(cosine(k - 1, peak, 1e-5, warmup, length), rel=1e-9, abs=1e-15), k
    assert used[0] == 0.0 and used[warmup] == pytest.approx(peak)  # from 0, the peak once warmed up
    assert 0 < used[-1] - 1e-5 < 0.02 * (peak - 1e-5)  # the last step runs on the cosine's tail, just above min_lr
    records = RunDir(tmp_path / "run").read_metrics()
    assert records[-1]["step"] == length and records[-1]["lr"] == pytest.approx(1e-5, rel=1e-12)  # ends at min_lr
    assert not recwarn.list
    assert not [r for r in caplog.records if r.name.startswith("timm") or "annealing" in r.getMessage()]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lr schedule")]
    assert said == ["lr schedule over 16 steps: warmup 2 steps from 0 to 0.000125, then cosine to min_lr 1e-05 after "
                    "step 16; train.max_steps=16 ends the run before the 80 steps of its 10 epochs; warmup_epochs "
                    "keeps its share"]


def test_a_warmup_longer_than_the_run_is_cut_to_half_of_it_without_timm_warnings(caplog, recwarn):
    """The segmentation recipes' warmup_steps, 100 or 1500, in a run of 6 steps: 3 warm up, 3 decay (poly)
    to min_lr; timm's "will have no effect" warning for a one-step decay never shows either."""
    from tinymim.train.optim import build_scheduler

    caplog.set_level(logging.INFO)
    for max_steps, poly in ((6, True), (2, False), (2, True), (1, False)):
        train = TrainConfig(lr=1e-3, min_lr=1e-6, warmup_steps=100, max_steps=max_steps, epochs=10_000,
                            schedule="poly" if poly else "cosine", poly_power=0.9)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = build_scheduler(optimizer, train, per_epoch=20)
        warmup = max_steps // 2
        for s in range(max_steps + 1):
            scheduler.step_update(s)
            if s < warmup:
                expected = 1e-3 * s / warmup
            elif poly:
                expected = 1e-6 + (1e-3 - 1e-6) * (1 - (s - warmup) / (max_steps - warmup)) ** 0.9
            else:
                expected = cosine(s, 1e-3, 1e-6, warmup, max_steps)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), (max_steps, poly, s)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not recwarn.list


def test_a_full_run_keeps_its_schedule():
    """Without max_steps nothing changes: the epochs' steps, warmup_epochs x steps an epoch."""
    from tinymim.train.config import schedule_steps

    assert tuple(schedule_steps(TrainConfig(epochs=100, warmup_epochs=5), 1251)) == (125100, 6255, 6255, 125100)
    # the release's segmentation: 160k iterations (epochs only bound them), 1500 warmup steps as given
    assert tuple(schedule_steps(TrainConfig(epochs=10_000, max_steps=160_000, warmup_steps=1500), 1263)) == (
        160_000, 1500, 1500, 12_630_000)


def test_a_stopped_short_run_resumes_on_the_same_schedule(tmp_path, monkeypatch):
    """Stopped after step 5 (its checkpoint holds step 4), the same command resumes on the lrs of a run
    never stopped: the checkpoint carries the schedule fitted into max_steps."""
    from tinymim.tasks.base import Task

    cfg = tiny_distill_config(epochs=10, warmup_epochs=2, max_steps=12, checkpoint_every=2, min_lr=1e-5)
    straight = run_recording_lrs(cfg, tmp_path / "straight")

    def fail_after_five(self, step):
        if step == 5:
            raise RuntimeError("stopped")

    with monkeypatch.context() as m:
        m.setattr(Task, "after_step", fail_after_five)
        with pytest.raises(RuntimeError, match="stopped"):
            run_recording_lrs(cfg, tmp_path / "stopped")
    resumed = run_recording_lrs(cfg, tmp_path / "stopped")
    assert resumed == straight[4:]  # steps 5..12 again, each on the lr of the unstopped run
    assert [r["lr"] for r in RunDir(tmp_path / "stopped").read_metrics()] == [
        r["lr"] for r in RunDir(tmp_path / "straight").read_metrics()]


def test_tinymim_config_explains_max_steps_and_the_warmup_rule(capsys):
    from tinymim.cli import main

    assert main(["config", "finetune"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "whole lr schedule, warmup then cosine (or poly) down to min_lr, is fitted into them" in lines[
        "train.max_steps"]
    assert "keeps the same share of it" in lines["train.warmup_epochs"]
    assert "cut to half the run at most" in lines["train.warmup_steps"]
