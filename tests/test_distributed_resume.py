"""torchrun (gloo, 2 processes) matches one process; a SIGKILLed run resumes to the same weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import torch
from conftest import SMALL_DISTILL
from conftest import subprocess_env as env
from safetensors.torch import load_file

from tinymim.core.rundir import RunDir

pytestmark = pytest.mark.slow  # every run here is a subprocess, most under torchrun

TINY = SMALL_DISTILL


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run).read_metrics() if "loss" in r]


TORCHRUN = [*conftest.TORCHRUN, "-m", "tinymim"]
TWO_PROCESS = ["distill", *TINY, "student.drop_path_rate=0.0", "data.synthetic_size=256", "data.num_workers=0",
               "train.batch_size=32", "train.epochs=2"]  # 16 steps, a checkpoint every epoch (8 steps)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """An uninterrupted run under torchrun with 2 processes (gloo)."""
    two = tmp_path_factory.mktemp("torchrun") / "two"
    r = subprocess.run([*TORCHRUN, *TWO_PROCESS, "--output", str(two)], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return two


def test_torchrun_two_processes_match_one(tmp_path, two_processes):
    one, two = tmp_path / "one", two_processes
    subprocess.run([sys.executable, "-m", "tinymim", *TWO_PROCESS, "--output", str(one)], check=True, env=env(),
                   capture_output=True, timeout=300)
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) == 16
    for (step, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-4, (step, la, lb)
    assert a[-1][1] < a[0][1]  # it learned something, identically
    wa, wb = load_file(one / "student.safetensors"), load_file(two / "student.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_sigkill_and_restart_gives_the_same_weights(tmp_path):
    args = ["distill", *TINY, "student.embed_dim=96", "student.depth=3", "student.num_heads=3",
            "student.drop_path_rate=0.1", "data.synthetic_size=512", "data.num_workers=2",
            "train.batch_size=32", "train.epochs=3", "train.checkpoint_every=4"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, "-m", "tinymim", *args, "--output"]
    subprocess.run(cmd + [str(straight)], check=True, env=env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(cmd + [str(killed)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().strip():
            complete = metrics.read_text().split("\n")[:-1]  # a line being written is not complete yet
            if complete:
                step = json.loads(complete[-1])["step"]
            if step >= 22:  # mid-epoch 2, with checkpoints written at steps 4, 8, ..., 20
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 22 <= step < 48 and not (killed / "student.safetensors").exists(), "the run was not killed part-way"
    ckpt = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert 4 <= ckpt["global_step"] < 48 and not ckpt["finished"]

    r = subprocess.run(cmd + [str(killed)], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    wa, wb = load_file(straight / "student.safetensors"), load_file(killed / "student.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # metrics are not duplicated by the replayed steps
    assert [s for s, _ in losses(killed)] == [s for s, _ in losses(straight)]
    assert [v for _, v in losses(killed)] == pytest.approx([v for _, v in losses(straight)], abs=1e-6)


def test_sigterm_under_torchrun_stops_every_process_at_one_step_and_resumes_exactly(tmp_path, two_processes):
    """The scheduler signals every process of the job (here: the whole process group, torchrun's agent
    included). Both ranks stop after the same step, rank 0 writes the checkpoint for both (each rank's
    RNG state), and the same command resumes to the uninterrupted run's weights, bit for bit."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*TORCHRUN, *TWO_PROCESS, "--output", str(out)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= 3:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stops = [line for line in err.splitlines() if line.startswith("stopped on SIGTERM at step")]
    assert len(stops) == 1, err[-3000:]  # one line, from rank 0
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    step = ckpt["global_step"]
    assert stops[0].startswith(f"stopped on SIGTERM at step {step} of 16;") and 3 <= step < 16
    assert not ckpt["finished"] and ckpt["world"] == 2 and len(ckpt["rng"]) == 2 and all(ckpt["rng"])
    assert not (out / "student.safetensors").exists()

    r = subprocess.run([*TORCHRUN, *TWO_PROCESS, "--output", str(out)], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and f"resuming {out} from step {step}" in r.stderr, r.stderr[-3000:]
    wa, wb = load_file(two_processes / "student.safetensors"), load_file(out / "student.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [s for s, _ in losses(out)] == [s for s, _ in losses(two_processes)]

