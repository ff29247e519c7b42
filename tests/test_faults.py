"""Fault injection: for each fault, nothing saved is lost, the error is one line, and wherever the run
can go on, its final weights are bit-identical to those of an uninterrupted run.

Every run here is the real command line in a subprocess (tests/faulty_run.py injects disk-full and
kill-mid-write faults into the checkpoint writer); `straight` is the uninterrupted reference.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MICRO_FINETUNE, SMALL_DISTILL, signal_once_marked, with_overrides
from conftest import subprocess_env as env
from PIL import Image
from safetensors.torch import load_file

import tinymim.tasks as tasks
from tinymim.core.files import RunDirError
from tinymim.core.rundir import RunDir

HERE = Path(__file__).resolve().parent
TINY = with_overrides(SMALL_DISTILL, "student.embed_dim=96", "student.depth=3", "student.drop_path_rate=0.1",
                      "data.synthetic_size=256", "data.num_workers=1", "train.batch_size=32", "train.epochs=3",
                      "train.checkpoint_every=4")  # 8 steps an epoch, 24 in all; checkpoints at 4, 8, ..., 20
DISTILL = ["distill", *TINY]


def cli(output, args=DISTILL, fault: tuple | None = None, umask: int | None = None, **popen):
    """The command line for a run (with an injected checkpoint fault: (kind, n))."""
    prefix = [sys.executable, str(HERE / "faulty_run.py"), *map(str, fault), "--"] if fault else \
        [sys.executable, "-m", "tinymim"]
    return [*prefix, *args, "--output", str(output)]


def run(output, args=DISTILL, fault=None, umask=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cli(output, args, fault), env=env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in RunDir(run_dir).read_metrics() if "loss" in r]


def assert_same_weights(a: Path, b: Path, name="student.safetensors") -> None:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_same_run(reference: Path, other: Path) -> None:
    """Bit-identical final weights; the same metric steps and losses (no duplicates from replays)."""
    assert_same_weights(reference, other)
    assert steps(other) == steps(reference)
    la = [r["loss"] for r in RunDir(reference).read_metrics() if "loss" in r]
    lb = [r["loss"] for r in RunDir(other).read_metrics() if "loss" in r]
    assert lb == pytest.approx(la, abs=1e-6)
    assert not list(other.rglob("*.tmp")), "a temporary file was left behind"


def checkpoint_step(run_dir: Path) -> tuple[int, bool]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["global_step"], ckpt["finished"]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = steps(run_dir)
        if done and done[-1] >= step:
            return done[-1]
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {step} (rc {proc.poll()})")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run, made under umask 027."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    r = run(out, umask=0o027)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run that stopped on a full disk while writing its second checkpoint: last.pt holds step 4,
    metrics.jsonl runs to step 8."""
    out = tmp_path_factory.mktemp("faults") / "interrupted"
    r = run(out, fault=("enospc", 2))
    assert r.returncode == 1, r.stderr[-3000:]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_files_take_the_umask(straight):
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "checkpoints/last.pt"):
        assert (straight / name).stat().st_mode & 0o777 == 0o640, name  # 0666 & ~027: readable by the group


@pytest.mark.slow
def test_a_second_process_on_the_same_run_refuses_and_changes_nothing(straight, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(cli(out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / ".lock").is_file() or f"pid {first.pid} " not in (out / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # hold the first run still while the second one tries
    try:
        second = run(out, args=[*DISTILL, "train.seed=1"])  # a job launched twice, with another seed
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1 and second.stderr.startswith("error: ")
    assert f"in use by another tinymim process (pid {first.pid} on" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert_same_run(straight, out)  # the first run's weights, config and metrics are its own


@pytest.mark.slow
def test_the_lock_of_a_killed_run_does_not_block(straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(proc, out, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "pid" in (out / ".lock").read_text()  # the holder's note stays; the kernel dropped the lock
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_mid_epoch_checkpoints_then_resumes_exactly(straight, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = wait_for_step(proc, out, 9)  # epoch 2 of 3
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    step, finished = checkpoint_step(out)
    assert last_line(err) == (f"stopped on {sig.name} at step {step} of 24; checkpoint written to "
                              f"{out / 'checkpoints' / 'last.pt'}; run the same command again to resume")
    assert seen <= step < 24 and not finished and not (out / "student.safetensors").exists()
    assert "Traceback" not in err
    r = run(out)
    assert r.returncode == 0 and f"resuming {out} from step {step}" in r.stderr, r.stderr[-3000:]
    assert_same_run(straight, out)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_sigkill_while_writing_a_checkpoint(straight, tmp_path, n):
    """n=1: killed in the first checkpoint (none complete yet: the restart starts over, and its metrics
    do not repeat steps 1-4); n=2: the previous checkpoint (step 4) survives intact."""
    out = tmp_path / "run"
    r = run(out, fault=("kill", n))
    assert r.returncode == -signal.SIGKILL
    orphans = list((out / "checkpoints").glob("last.pt.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size >= 64 * 1024
    if n == 1:
        assert not (out / "checkpoints" / "last.pt").exists()
    else:
        assert checkpoint_step(out) == (4, False)
    assert steps(out)[-1] == 4 * n
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left by an interrupted write" in r.stderr
    assert_same_run(straight, out)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_then_resume(straight, interrupted, tmp_path):
    run_dir = copy_run(interrupted, tmp_path / "run")
    assert checkpoint_step(run_dir) == (4, False)  # the checkpoint before the failed one, intact
    assert not list(run_dir.rglob("*.tmp")) and steps(run_dir)[-1] == 8
    r = run(run_dir)  # more space: the same command resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, run_dir)


@pytest.mark.slow
def test_disk_full_message_is_one_line(tmp_path):
    r = run(tmp_path / "run", fault=("enospc", 1))
    assert r.returncode == 1
    line = last_line(r.stderr)
    assert line.startswith(f"error: no space left on the device of {tmp_path / 'run' / 'checkpoints'} while "
                           "writing last.pt")
    assert "run the same command again to resume" in line and "unexpected pos" not in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_disk_full_while_writing_the_final_weights_then_resume(straight, tmp_path):
    out = tmp_path / "run"
    r = run(out, fault=("enospc", 1, "student.safetensors"))
    assert r.returncode == 1 and "while writing student.safetensors" in last_line(r.stderr), r.stderr[-3000:]
    # the last step's checkpoint (written before the final evaluation and export); no weights file
    assert checkpoint_step(out) == (24, False)
    assert not (out / "student.safetensors").exists() and not list(out.rglob("*.tmp"))
    r = run(out)
    assert r.returncode == 0 and f"resuming {out} from step 24" in r.stderr, r.stderr[-3000:]
    assert_same_run(straight, out)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_lost_or_damaged_final_weights_are_exported_again(straight, tmp_path, damage):
    run_dir = copy_run(straight, tmp_path / "run")
    weights = run_dir / "student.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = run(run_dir)
    assert r.returncode == 0 and "already holds a finished run" in r.stdout, r.stderr[-3000:]
    assert "exported again" in r.stderr
    assert_same_weights(straight, run_dir)
    from safetensors import safe_open

    metadata = [safe_open(str(d / "student.safetensors"), "pt").metadata() for d in (straight, run_dir)]
    assert metadata[0] == metadata[1] and "student" in metadata[0]  # (the header's key order may differ)


@pytest.mark.slow
def test_a_finished_run_whose_checkpoint_was_removed_stays_finished(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")  # removed to save space: the weights are what matters
    r = run(run_dir)
    assert r.returncode == 0 and "already holds a finished run" in r.stdout, r.stderr[-3000:]
    assert_same_weights(straight, run_dir)
    r = run(run_dir, args=[*DISTILL, "train.blr=1e-2"])  # config.yaml still guards it
    assert r.returncode == 1 and "different config (train.blr: 0.002 -> 0.01)" in r.stderr


@pytest.mark.slow
def test_partial_metrics_line_and_truncated_config_resume(straight, interrupted, tmp_path):
    run_dir = copy_run(interrupted, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.1')  # a kill in the middle of a line
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config[: len(config) // 2])
    r = run(run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == config  # rewritten from the checkpoint's copy
    assert_same_run(straight, run_dir)


@pytest.mark.slow
def test_without_config_yaml_the_checkpoint_config_still_guards_resume(interrupted, tmp_path):
    run_dir = copy_run(interrupted, tmp_path / "run")
    (run_dir / "config.yaml").unlink()

    def saved():  # what the run saved, byte for byte; .lock names whichever process last held it (its pid)
        return sorted((p.name, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")

    before = saved()
    r = run(run_dir, args=[*DISTILL, "train.blr=1e-2"])
    assert r.returncode == 1 and "holds a run with a different config (train.blr: 0.002 -> 0.01)" in r.stderr
    assert r.stderr.count("\n") == 1
    assert saved() == before


@pytest.mark.slow
def test_a_finished_run_refuses_a_changed_config(straight):
    before = (straight / "checkpoints" / "last.pt").stat().st_mtime_ns
    r = run(straight, args=[*DISTILL, "train.epochs=4"])
    assert r.returncode == 1 and "different config (train.epochs: 3 -> 4)" in r.stderr
    assert (straight / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def _image_folder(root: Path, classes: dict[str, int], size: int = 32) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (size, size), (40 * c + 3 * i, 100, 255 - 40 * c)).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_changed_data_source_is_a_different_run(tmp_path):
    data = _image_folder(tmp_path / "data", {"a": 40, "b": 40})
    args = [a for a in DISTILL if not a.startswith(("data.name", "data.synthetic_size"))]
    args += ["data.name=folder", f"data.root={data}", "train.batch_size=16"]
    out = tmp_path / "run"
    r = run(out, args=args, fault=("enospc", 2))
    assert r.returncode == 1 and checkpoint_step(out) == (4, False)
    shrunk = shutil.copytree(data, tmp_path / "shrunk")
    (shrunk / "b" / "0.png").unlink()
    r = run(out, args=[*args, f"data.root={shrunk}"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "the data changed since" in r.stderr and "80 images of 2 classes" in r.stderr
    assert "79 images of 2 classes" in r.stderr
    moved = shutil.copytree(data, tmp_path / "moved")  # the same images elsewhere: the same run
    r = run(out, args=[*args, f"data.root={moved}"])
    assert r.returncode == 0, r.stderr[-3000:]


def _finetune_args(train: Path, val: Path) -> list[str]:
    return ["finetune", *with_overrides(MICRO_FINETUNE, "data.name=folder", f"data.root={train}",
                                        f"data.val_root={val}", "train.batch_size=8")]


@pytest.mark.slow
def test_a_missing_class_folder_is_refused_at_finetune_and_at_eval(tmp_path):
    train = _image_folder(tmp_path / "train", {"cat": 8, "dog": 8, "fox": 8})
    val = _image_folder(tmp_path / "val", {"cat": 2, "dog": 2, "fox": 2})
    partial = _image_folder(tmp_path / "partial", {"cat": 2, "fox": 2})  # "dog" missing: labels would shift
    other = _image_folder(tmp_path / "other", {"cat": 2, "dog": 2, "fox": 2, "owl": 2})

    r = run(tmp_path / "bad", args=_finetune_args(train, partial))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "missing dog" in r.stderr and not (tmp_path / "bad").exists()

    out = tmp_path / "ft"
    r = run(out, args=_finetune_args(train, val))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "classes.json").read_text())["classes"] == ["cat", "dog", "fox"]
    for folder, words in ((partial, "missing dog"), (other, "extra owl")):
        r = subprocess.run([sys.executable, "-m", "tinymim", "eval", str(out), "--data", str(folder), "--workers", "0"],
                           env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "tinymim", "eval", str(out), "--data", str(val), "--workers", "0"],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "6 images" in r.stdout, r.stderr[-3000:]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_a_killed_loader_worker_is_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out, 5)
    workers = _children(proc.pid)
    if not workers:
        proc.kill()
        pytest.skip("cannot list the run's worker processes here (/proc/PID/task/PID/children)")
    for w in workers:
        os.kill(w, signal.SIGKILL)  # what the out-of-memory killer does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert last_line(err).startswith("error: a data-loading worker died") and "Traceback" not in err
    assert checkpoint_step(out)[0] >= 4


@pytest.mark.slow
def test_a_data_error_inside_a_worker_is_one_line(tmp_path):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    for i in range(40):
        (data / f"{i}.jpg").write_bytes(b"not a jpeg at all")
    args = [a for a in DISTILL if not a.startswith(("data.name", "data.synthetic_size"))]
    r = run(tmp_path / "run", args=[*args, "data.name=folder", f"data.root={data.parent}", "train.batch_size=16"])
    assert r.returncode == 1
    assert last_line(r.stderr).startswith("error: 16 consecutive images could not be read")
    assert "Traceback" not in r.stderr


def test_unwritable_output_is_one_line(tmp_path, monkeypatch):
    """Read-only and permission-denied folders (injected: the tests may run as root, which ignores modes)."""
    import errno

    from tinymim.core import rundir

    for code, words in ((errno.EROFS, "read-only"), (errno.EACCES, "permission denied")):
        def refuse(*a, **k):
            raise OSError(code, os.strerror(code), str(tmp_path / "run" / ".lock"))

        monkeypatch.setattr(rundir.os, "open", refuse)
        with pytest.raises(RunDirError, match=words) as e:
            with RunDir(tmp_path / "run").lock():
                pass
        assert "\n" not in str(e.value)
        monkeypatch.undo()
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# start-up, loader workers, evaluation, trackers


def _stop_during_start_up(out: Path, marker: Path) -> subprocess.CompletedProcess:
    """SIGTERM to a run that is certainly still starting: tests/faulty_run.py holds its start-up (before
    anything is built) until the signal has arrived."""
    return signal_once_marked(cli(out, DISTILL, ("startup", 0, marker)), marker, env())


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_and_loses_nothing(straight, interrupted, tmp_path):
    fresh = tmp_path / "fresh"
    r = _stop_during_start_up(fresh, tmp_path / "starting1")
    assert r.returncode == 75, r.stderr[-3000:]
    assert last_line(r.stderr).startswith("stopped on SIGTERM during start-up, before step 1 of 24; nothing had "
                                          "trained yet") and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (fresh / "checkpoints" / "last.pt").exists()
    assert run(fresh).returncode == 0
    assert_same_run(straight, fresh)

    resumed = copy_run(interrupted, tmp_path / "resumed")  # last.pt at step 4
    before = (resumed / "checkpoints" / "last.pt").read_bytes()
    r = _stop_during_start_up(resumed, tmp_path / "starting2")
    assert r.returncode == 75 and "before step 5 of 24; its checkpoint at step 4 is kept" in last_line(r.stderr)
    assert (resumed / "checkpoints" / "last.pt").read_bytes() == before
    assert run(resumed).returncode == 0
    assert_same_run(straight, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["EOFError", "ConnectionResetError", "RuntimeError"])
def test_a_dead_loader_worker_in_each_form_is_one_line(tmp_path, form):
    """Which error a worker's death raises depends on when it died; each is the same one line."""
    out = tmp_path / "run"
    r = run(out, fault=(form, 6))  # the 6th batch: after the checkpoint at step 4
    assert r.returncode == 1, r.stderr[-3000:]
    assert last_line(r.stderr).startswith("error: a data-loading worker died "
                                          f"({'DataLoader' if form == 'RuntimeError' else form}")
    assert "Traceback" not in r.stderr and checkpoint_step(out) == (4, False)


@pytest.mark.slow
def test_an_evaluation_that_fails_keeps_its_epoch_and_is_redone_on_resume(tmp_path):
    train = _image_folder(tmp_path / "train", {"cat": 8, "dog": 8})
    val = _image_folder(tmp_path / "val", {"cat": 2, "dog": 2})
    args = [*_finetune_args(train, val), "train.epochs=2", "train.checkpoint_every=1000"]  # 2 steps an epoch
    straight = tmp_path / "straight"
    assert run(straight, args=args).returncode == 0
    out = tmp_path / "failed"
    r = run(out, args=args, fault=("evalfail", 1))  # the first epoch's evaluation
    assert r.returncode == 1 and last_line(r.stderr).startswith("error: a data-loading worker died"), r.stderr[-3000:]
    assert checkpoint_step(out) == (2, False)  # the epoch's training was saved before its evaluation
    assert run(out, args=args).returncode == 0
    assert_same_weights(straight, out, "model.safetensors")
    evals = [[(r["step"], r["val_top1"]) for r in RunDir(d).read_metrics() if "val_top1" in r] for d in (straight, out)]
    assert evals[0] == evals[1] and [s for s, _ in evals[1]] == [2, 4]


def test_a_nan_before_the_first_checkpoint_does_not_claim_one(tmp_path):
    from conftest import tiny_distill_config

    from tinymim.core.errors import NonFiniteLossError

    cfg = tiny_distill_config(blr=1e9, checkpoint_every=1000, epochs=3)
    with pytest.raises(NonFiniteLossError) as err:
        tasks.run("distill", cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert "No checkpoint had been written yet" in str(err.value) and "is kept" not in str(err.value)


def test_a_missing_tensorboard_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    from tinymim.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main([*DISTILL, "train.tensorboard=true", "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'tinymim[tensorboard]'" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_overrides_may_stand_on_both_sides_of_output(tmp_path):
    out = tmp_path / "run"
    args = [a for a in DISTILL if a != "train.epochs=3"]
    r = subprocess.run([sys.executable, "-m", "tinymim", *args[:6], "--output", str(out), *args[6:], "train.epochs=1"],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = RunDir(out).stored_config()
    assert cfg["student"]["embed_dim"] == 96 and cfg["train"]["epochs"] == 1 and steps(out)[-1] == 8


@pytest.mark.slow
def test_a_bad_validation_label_is_refused_before_training(tmp_path):
    """A label map in the validation split with a value that is no class: refused before the first epoch
    trains (it used to stop the run after the epoch, before its checkpoint, on every re-run)."""
    import numpy as np
    from test_segmentation import _seg_folder, tiny_segment_overrides

    root = _seg_folder(tmp_path / "data", "train", 8)
    _seg_folder(root, "val", 3, seed=1)
    bad = root / "annotations" / "val" / "2.png"
    label = np.asarray(Image.open(bad)).copy()
    label[10, 10] = 7  # 4 classes and the ignore label 255: 7 is neither
    Image.fromarray(label).save(bad)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tinymim", "segment", *tiny_segment_overrides(root, "train.max_steps=4"),
                        "--output", str(out)], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: {bad} holds label value(s) 7, neither a class (0..3)")
    assert not out.exists()


@pytest.mark.slow
def test_16_bit_and_float_images_score_as_their_8_bit_originals(tmp_path):
    """The same pictures stored as 16-bit PNGs (value x 257) and as float TIFFs (value / 255) are the
    same images to tinymim: `tinymim eval` gives identical scores (a 16-bit PNG used to read as white)."""
    import numpy as np

    train = _image_folder(tmp_path / "train", {"cat": 6, "dog": 6})
    val = _image_folder(tmp_path / "val", {"cat": 3, "dog": 3})
    out = tmp_path / "ft"
    assert run(out, args=_finetune_args(train, val)).returncode == 0
    for img in val.rglob("*.png"):
        gray = np.asarray(Image.open(img).convert("L"))  # one channel: what 16-bit and float files hold
        for kind in ("ref", "16bit", "float"):
            (tmp_path / kind / img.parent.name).mkdir(parents=True, exist_ok=True)
        dest = img.relative_to(val)
        Image.fromarray(gray).save(tmp_path / "ref" / dest)
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit" / dest)  # mode I;16
        Image.fromarray(gray.astype(np.float32) / 255, mode="F").save((tmp_path / "float" / dest).with_suffix(".tif"))
    scores = {}
    for folder in ("ref", "16bit", "float"):
        r = subprocess.run([sys.executable, "-m", "tinymim", "eval", str(out), "--data", str(tmp_path / folder),
                            "--workers", "0", "--json", str(tmp_path / f"{folder}.json")], env=env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        scores[folder] = json.loads((tmp_path / f"{folder}.json").read_text())
    assert scores["ref"]["images"] == 6
    for folder in ("16bit", "float"):
        assert {k: scores[folder][k] for k in ("images", "top1", "loss")} == \
            {k: scores["ref"][k] for k in ("images", "top1", "loss")}, folder
