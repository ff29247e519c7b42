"""`tinymim pipeline`: stages wired to earlier stages, reuse of finished stages, redo of what depends
on a deleted stage, the report."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tinymim.config import ConfigError, from_dict
from tinymim.pipeline import PipelineConfig, run_pipeline
from tinymim.rundir import RunDir

TINY = ["model.name=vit_custom", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2"]
TRAIN = ["train.epochs=1", "train.batch_size=16", "train.precision=fp32", "train.progress=false",
         "train.log_every=1", "data.name=synthetic", "data.img_size=32", "data.num_workers=0",
         "data.synthetic_size=32"]


def tiny_pipeline() -> dict:
    return {
        "overrides": TRAIN,
        "task_overrides": {"mae": [*TINY, "decoder.embed_dim=16", "decoder.depth=1", "decoder.num_heads=2"],
                           "distill": [x.replace("model.", "student.") for x in TINY],
                           "finetune": ["data.auto_augment=null", "mixup=0", "cutmix=0"]},
        "stages": [
            {"name": "teacher", "task": "mae"},
            {"name": "student", "task": "distill", "teacher": "teacher", "overrides": ["teacher.target_block=2"]},
            {"name": "ft_student", "task": "finetune", "init": "student", "paper": {"top1": 75.8}},
            {"name": "ft_scratch", "task": "finetune"},
        ]}


def _as_config(d: dict) -> PipelineConfig:
    return from_dict(PipelineConfig, d)


def run_ids(out):
    return {d.name: RunDir(d).read_record().get("run_id") for d in out.iterdir() if (d / RunDir.RECORD).is_file()}


def test_pipeline_reuses_finished_stages_and_redoes_what_depends_on_a_deleted_one(tmp_path):
    cfg = _as_config(tiny_pipeline())
    out = tmp_path / "pipe"
    first = run_pipeline(cfg, out)
    assert [s["reused"] for s in first] == [False] * 4
    ids = run_ids(out)
    assert set(ids) == {"teacher", "student", "ft_student", "ft_scratch"} and all(ids.values())
    # the student learned from the teacher stage's weights, with its architecture
    student_cfg = (out / "student" / "config.yaml").read_text()
    assert str(out / "teacher") in student_cfg and "embed_dim: 32" in student_cfg
    assert str(out / "student") in (out / "ft_student" / "config.yaml").read_text()
    report = (out / "report.md").read_text()
    assert "ft_student" in report and "top1 75.8" in report and "top-1" in report
    assert (out / "plots" / "losses.png").stat().st_size > 1000
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000

    metrics = {n: (out / n / "metrics.jsonl").read_text() for n in ids}
    second = run_pipeline(cfg, out)  # everything finished: no training at all
    assert [s["reused"] for s in second] == [True] * 4
    assert run_ids(out) == ids
    assert {n: (out / n / "metrics.jsonl").read_text() for n in ids} == metrics

    # a finished stage that lost its weights gets them back from its checkpoint, and keeps its run
    # id: the stages downstream of it stay valid (nothing superseded, nothing retrained)
    before = load_file(out / "student" / "student.safetensors")
    (out / "student" / "student.safetensors").unlink()
    fourth = run_pipeline(cfg, out)
    assert [s["reused"] for s in fourth] == [True, False, True, True]
    assert run_ids(out) == ids and not (out / ".superseded").exists()
    after = load_file(out / "student" / "student.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: (out / n / "metrics.jsonl").read_text() for n in ids} == metrics

    import shutil
    shutil.rmtree(out / "student")  # redo the student and what was fine-tuned from it, nothing else
    third = run_pipeline(cfg, out)
    assert [s["reused"] for s in third] == [True, False, False, True]
    new = run_ids(out)
    assert new["teacher"] == ids["teacher"] and new["ft_scratch"] == ids["ft_scratch"]
    assert new["student"] != ids["student"] and new["ft_student"] != ids["ft_student"]
    assert len(list((out / ".superseded").iterdir())) == 1  # the stale fine-tune is kept, not deleted


def test_a_failed_stage_can_be_fixed_and_the_pipeline_rerun(tmp_path):
    cfg = _as_config(tiny_pipeline())
    cfg.stages[1].overrides = ["teacher.target_block=7"]  # the teacher has 2 blocks
    out = tmp_path / "pipe"
    with pytest.raises(ConfigError, match="target_block=7"):
        run_pipeline(cfg, out)
    cfg.stages[1].overrides = ["teacher.target_block=2"]
    summaries = run_pipeline(cfg, out)
    assert [s["reused"] for s in summaries] == [True, False, False, False]


def test_stage_references_are_checked():
    bad = tiny_pipeline()
    bad["stages"][1]["teacher"] = "nope"
    with pytest.raises(ConfigError, match="not an earlier stage"):
        _as_config(bad)


def test_cli_overrides_reach_every_stage_or_one_task_and_are_checked_before_training(tmp_path, capsys):
    import yaml

    from tinymim.cli import main

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_pipeline()))
    out = tmp_path / "out"
    # a key only fine-tuning has, given to every stage: refused while planning, nothing runs
    assert main(["pipeline", "--config", str(recipe), "--output", str(out), "data.val_root=/x"]) == 1
    assert "data.val_root" in capsys.readouterr().err and not (out / "teacher").exists()
    assert main(["pipeline", "--config", str(recipe), "--output", str(out), "nope:train.epochs=1"]) == 1
    assert "unknown task" in capsys.readouterr().err
    # with the task prefix it reaches the fine-tuning stages only (a typo there is still caught)
    assert main(["pipeline", "--config", str(recipe), "--output", str(out), "finetune:data.val_rot=/x"]) == 1
    assert "data.val_rot" in capsys.readouterr().err and not (out / "teacher").exists()


def test_a_second_pipeline_on_the_same_output_refuses(tmp_path, capsys):
    import yaml

    from tinymim.cli import main

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_pipeline()))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tinymim.rundir import RunDir\n"
                               f"with RunDir({str(out)!r}).lock():\n    print('locked', flush=True)\n    time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["pipeline", "--config", str(recipe), "--output", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"in use by another tinymim process (pid {holder.pid} " in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no stage started
    finally:
        holder.kill()
        holder.wait()


def test_command_line_overrides_win_over_the_pipeline_file(tmp_path):
    """The demo pipeline sets its own epochs per stage; `train.epochs=1` on the command line changes
    every stage, `finetune:` only the fine-tuning ones, and the report says what was applied."""
    from tinymim.pipeline import load, plan

    planned = {s.name: c for s, _, c in plan(load("pipelines/demo"), tmp_path)}
    assert {c["train"]["epochs"] for c in planned.values()} != {1}
    cfg = load("pipelines/demo", ['command_line=["train.epochs=1", "finetune:train.batch_size=64"]'])
    planned = {s.name: (s.task, c) for s, _, c in plan(cfg, tmp_path)}
    assert all(c["train"]["epochs"] == 1 for _, c in planned.values())
    assert all(c["train"]["batch_size"] == 64 for t, c in planned.values() if t == "finetune")
    assert any(c["train"]["batch_size"] != 64 for t, c in planned.values() if t != "finetune")
    from tinymim.report import write_report

    (tmp_path / "out").mkdir()
    report = write_report(cfg, tmp_path / "out").read_text()
    assert "`train.epochs=1 finetune:train.batch_size=64`" in report


def test_two_shards_share_a_pipeline_each_stage_run_once_and_wait_for_what_they_build_on(tmp_path):
    """--shard 0/2 and 1/2 on the same output, started together: every stage runs in exactly one
    process (stage j in shard j % 2), whichever starts first: shard 1's student waits for shard 0's
    teacher, shard 0's fine-tune for shard 1's student; the plain command then reuses all four and
    writes the report."""
    import os

    import yaml

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_pipeline()))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shards = [subprocess.Popen([sys.executable, "-m", "tinymim", "pipeline", "--config", str(recipe), "--output",
                                str(out), "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], logs

    def ran(log: str) -> set[str]:
        return {line.split("stage ")[1].split(":")[0] for line in log.splitlines()
                if "stage " in line and (": running " in line or ": resuming " in line)}

    assert ran(logs[0]) == {"teacher", "ft_student"} and ran(logs[1]) == {"student", "ft_scratch"}, logs
    assert not (out / "report.md").exists()  # the shards write no report
    summaries = run_pipeline(_as_config(tiny_pipeline()), out)
    assert [s["reused"] for s in summaries] == [True] * 4 and (out / "report.md").is_file()
    # the student learned from the teacher shard 0 made
    assert str(out / "teacher") in (out / "student" / "config.yaml").read_text()


def test_a_shard_out_of_range_is_one_line(tmp_path, capsys):
    from tinymim.cli import main

    assert main(["pipeline", "--config", "pipelines/demo", "--output", str(tmp_path / "o"), "--shard", "2/2"]) == 1
    err = capsys.readouterr().err
    assert "--shard 2/2" in err and err.count("\n") == 1
