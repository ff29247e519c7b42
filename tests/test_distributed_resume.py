"""torchrun (gloo, 2 processes) matches one process; a SIGKILLed run resumes to the same weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = ["student.name=vit_custom", "student.patch_size=4", "student.embed_dim=48", "student.depth=2",
        "student.num_heads=3", "teacher.model.name=vit_custom", "teacher.model.patch_size=4",
        "teacher.model.embed_dim=64", "teacher.model.depth=3", "teacher.model.num_heads=4",
        "data.name=synthetic", "data.img_size=32", "train.precision=fp32", "train.progress=false",
        "train.log_every=1", "train.blr=2e-3", "train.warmup_epochs=0.5"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_torchrun_two_processes_match_one(tmp_path):
    args = ["distill", *TINY, "student.drop_path_rate=0.0", "data.synthetic_size=256", "data.num_workers=0",
            "train.batch_size=32", "train.epochs=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "tinymim", *args, "--output", str(one)], check=True, env=env(),
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "tinymim", *args, "--output", str(two)], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
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
            step = json.loads(metrics.read_text().strip().splitlines()[-1])["step"]
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
