"""`tinymim pipeline`: stages wired to earlier stages, reuse of finished stages, redo of what depends
on a deleted stage, the report."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tinymim.core.config import ConfigError, from_dict
from tinymim.core.rundir import RunDir
from tinymim.pipeline.planning import PipelineConfig
from tinymim.pipeline.stages import run_pipeline

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_second_pipeline_on_the_same_output_refuses(tmp_path, capsys):
    import yaml

    from tinymim.cli import main

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_pipeline()))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tinymim.core.rundir import RunDir\n"
                               f"with RunDir({str(out)!r}).lock():\n    print('locked', flush=True)\n"
                               "    time.sleep(120)"],
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
    from tinymim.pipeline.planning import load, plan

    planned = {s.name: c for s, _, c in plan(load("pipelines/demo"), tmp_path)}
    assert {c["train"]["epochs"] for c in planned.values()} != {1}
    cfg = load("pipelines/demo", ['command_line=["train.epochs=1", "finetune:train.batch_size=64"]'])
    planned = {s.name: (s.task, c) for s, _, c in plan(cfg, tmp_path)}
    assert all(c["train"]["epochs"] == 1 for _, c in planned.values())
    assert all(c["train"]["batch_size"] == 64 for t, c in planned.values() if t == "finetune")
    assert any(c["train"]["batch_size"] != 64 for t, c in planned.values() if t != "finetune")
    from tinymim.pipeline.report import write_report

    (tmp_path / "out").mkdir()
    report = write_report(cfg, tmp_path / "out").read_text()
    assert "`train.epochs=1 finetune:train.batch_size=64`" in report


@pytest.mark.slow
def test_two_shards_share_a_pipeline_each_stage_run_once_and_wait_for_what_they_build_on(tmp_path):
    """--shard 0/2 and 1/2 on the same output, started together: every stage runs in exactly one
    process (stage j in shard j % 2), whichever starts first: shard 1's student waits for shard 0's
    teacher, shard 0's fine-tune for shard 1's student; the plain command then reuses all four and
    writes the report."""
    import yaml
    from conftest import subprocess_env

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_pipeline()))
    out = tmp_path / "out"
    env = subprocess_env()
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


def _files(root) -> dict:
    """Every file under root: its bytes and mtime (what must not change)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _weights(path) -> tuple:
    """A safetensors file's tensors (as bytes) and metadata: equal however its header is ordered."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, f.metadata()


def _stage_files(out, names) -> dict:
    return {n: _files(out / n) for n in names}


@pytest.mark.slow
def test_a_moved_or_copied_pipeline_reuses_every_stage(tmp_path):
    """Stage records name their upstream stages relative to the pipeline folder: after a move or a
    copy nothing retrains (no .superseded/, every file of every stage unchanged); a stage resumed
    there takes its upstream from the new place; records of absolute paths still match in place."""
    import shutil

    spec = tiny_pipeline()
    spec["stages"] = spec["stages"][:3]  # teacher -> student (teacher.checkpoint) -> ft_student (init)
    cfg = _as_config(spec)
    names = ["teacher", "student", "ft_student"]
    first = tmp_path / "a" / "pipe"
    assert [s["reused"] for s in run_pipeline(cfg, first)] == [False] * 3
    ids = run_ids(first)
    record = RunDir(first / "student").read_record()
    assert record["config"]["teacher"]["checkpoint"] == "<pipeline>/teacher"
    assert "teacher.checkpoint=<pipeline>/teacher" in record["overrides"]
    assert RunDir(first / "ft_student").read_record()["config"]["init"] == "<pipeline>/student"
    before = _stage_files(first, names)

    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    assert [s["reused"] for s in run_pipeline(cfg, moved)] == [True] * 3
    assert not (moved / ".superseded").exists() and run_ids(moved) == ids
    assert _stage_files(moved, names) == before

    copy = tmp_path / "c" / "copy"
    shutil.copytree(moved, copy)
    assert [s["reused"] for s in run_pipeline(cfg, copy)] == [True] * 3
    assert not (copy / ".superseded").exists() and run_ids(copy) == ids
    assert {n: {k: v[0] for k, v in f.items()} for n, f in _stage_files(copy, names).items()} == \
        {n: {k: v[0] for k, v in f.items()} for n, f in before.items()}

    # a stage that runs again in the copy (its weights lost: re-exported from last.pt) resumes there,
    # pointed at the copy's teacher; its run id stays, nothing downstream is redone
    (copy / "student" / "student.safetensors").unlink()
    assert [s["reused"] for s in run_pipeline(cfg, copy)] == [True, False, True]
    assert not (copy / ".superseded").exists() and run_ids(copy) == ids
    assert f"checkpoint: {copy / 'teacher'}\n" in (copy / "student" / "config.yaml").read_text()
    assert _weights(copy / "student" / "student.safetensors") == _weights(moved / "student" / "student.safetensors")
    assert (copy / "student" / "metrics.jsonl").read_bytes() == before["student"]["metrics.jsonl"][0]
    assert _stage_files(moved, names) == before  # the original untouched

    # records written before they were portable (absolute paths) still match where they were made
    for n in names:
        path = moved / n / RunDir.RECORD
        path.write_text(path.read_text().replace("<pipeline>/", f"{moved}/"))
    old = _stage_files(moved, names)
    assert [s["reused"] for s in run_pipeline(cfg, moved)] == [True] * 3
    assert not (moved / ".superseded").exists() and _stage_files(moved, names) == old


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[-1]


def test_pipeline_output_that_is_a_run_folder_is_refused(tmp_path, capsys):
    import yaml

    from tinymim.cli import main

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_pipeline()))
    run = tmp_path / "run"  # a finished single run: config, checkpoint, weights
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: vit_custom}\ntrain: {epochs: 1}\n")
    (run / "checkpoints" / "last.pt").write_bytes(b"checkpoint")
    (run / "model.safetensors").write_bytes(b"weights")
    before = _files(run)
    assert main(["pipeline", "--config", str(recipe), "--output", str(run)]) == 1
    line = _last_line(capsys.readouterr().err)
    assert line.startswith(f"error: --output {run} is a run's folder (it holds config.yaml, last.pt, "
                           "model.safetensors)") and "choose another --output" in line
    assert _files(run) == before and sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "model.safetensors"]  # no .lock, no stage folder

    stage = tmp_path / "pipe" / "student"  # one stage of a pipeline
    stage.mkdir(parents=True)
    (stage / RunDir.RECORD).write_text('{"stage": "student"}\n')
    (stage / "config.yaml").write_text("train: {epochs: 1}\n")
    before = _files(tmp_path / "pipe")
    assert main(["pipeline", "--config", str(recipe), "--output", str(stage)]) == 1
    line = _last_line(capsys.readouterr().err)
    assert line.startswith(f"error: --output {stage} is the run folder of stage 'student' of the pipeline in "
                           f"{stage.parent}") and f"give --output {stage.parent}" in line
    assert _files(tmp_path / "pipe") == before and sorted(p.name for p in stage.iterdir()) == [
        "config.yaml", RunDir.RECORD]


def test_config_pipeline_prints_the_resolved_pipeline(capsys):
    from tinymim.cli import main

    assert main(["config", "pipeline", "--config", "pipelines/demo"]) == 0
    out = capsys.readouterr().out
    assert 'stages[0].name = "student_tinymim"' in out and 'stages[1].init = "student_tinymim"' in out
    assert "stages[0].task = " in out and "# str: a task of the registry" in out
    assert out.splitlines()[0].startswith("overrides = ")
