import os

# One thread per process unless the caller says otherwise: the models here are tiny, and on a busy
# machine (CI may share its 2 cores) OpenMP's spinning barriers with 2 threads made the suite about
# 3x slower than with 1. Set before torch is imported, so it holds in this process and in every
# subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tinymim.data.pretrain import DataConfig  # noqa: E402
from tinymim.models.vit import ModelConfig  # noqa: E402
from tinymim.tasks.distill_config import DistillConfig, TeacherConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

ROOT = Path(__file__).resolve().parents[1]  # the project
SHARED = ROOT.parent / "shared"  # real data and trained teachers, beside the project (tests that read it are slow)
SHARED_DATA = SHARED / "data"
SHARED_TEACHERS = SHARED / "teachers"
CIFAR_TAR = SHARED_DATA / "cifar10" / "train.tar"

# a command prefix: 2 processes on this machine (gloo on CPUs); add the script, or "-m", "tinymim"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def subprocess_env(**extra: str) -> dict:
    """The environment of a test's subprocess: one thread, unbuffered output (read while it runs), and
    no RANK / WORLD_SIZE of an outer torchrun; extra variables on top."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def signal_once_marked(cmd: list[str], marker: Path, env: dict, sig=None,
                       timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd`; once it has written `marker` (it holds there until signalled: tests/faulty_run.py),
    send it `sig` (SIGTERM) and return its result. Waits for the file, never for a fixed time."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(sig or signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def with_overrides(base: list[str], *changes: str) -> list[str]:
    """base (key=value overrides) with each change in place of the entry of its key, or appended."""
    out = list(base)
    for change in changes:
        key = change.split("=", 1)[0] + "="
        at = [i for i, item in enumerate(out) if item.startswith(key)]
        if at:
            out[at[0]] = change
        else:
            out.append(change)
    return out


# Tiny runs as command-line overrides (for `tinymim ...`, main() or load_config); with_overrides changes them.
# MICRO_DISTILL: 32-wide 2-block student and teacher, patch 8, 2 steps of 16 on 32 synthetic images.
MICRO_DISTILL = ["student.name=vit_custom", "student.img_size=32", "student.patch_size=8", "student.embed_dim=32",
                 "student.depth=2", "student.num_heads=2", "teacher.model.name=vit_custom",
                 "teacher.model.img_size=32", "teacher.model.patch_size=8", "teacher.model.embed_dim=32",
                 "teacher.model.depth=2", "teacher.model.num_heads=2", "teacher.target_block=2",
                 "data.name=synthetic", "data.img_size=32", "data.num_workers=0", "data.synthetic_size=32",
                 "train.batch_size=16", "train.max_steps=2", "train.precision=fp32", "train.progress=false",
                 "train.warmup_epochs=0"]
# SMALL_DISTILL: tiny_distill_config's shapes (a 48-wide 2-block student, 3 heads, of a 64-wide 3-block
# teacher, patch 4) on synthetic 32px images; the data size, batch and epochs are the caller's.
SMALL_DISTILL = ["student.name=vit_custom", "student.patch_size=4", "student.embed_dim=48", "student.depth=2",
                 "student.num_heads=3", "teacher.model.name=vit_custom", "teacher.model.patch_size=4",
                 "teacher.model.embed_dim=64", "teacher.model.depth=3", "teacher.model.num_heads=4",
                 "data.name=synthetic", "data.img_size=32", "train.precision=fp32", "train.progress=false",
                 "train.log_every=1", "train.blr=2e-3", "train.warmup_epochs=0.5"]
# MICRO_FINETUNE: a 32-wide 2-block classifier, patch 8, augmentation off, 1 epoch of batch 4; give the data.
MICRO_FINETUNE = ["model.name=vit_custom", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
                  "model.num_heads=2", "data.img_size=32", "data.num_workers=0", "data.auto_augment=null",
                  "data.reprob=0", "mixup=0", "cutmix=0", "train.batch_size=4", "train.epochs=1",
                  "train.precision=fp32", "train.progress=false", "train.warmup_epochs=0"]


def tiny_vit(dim=48, depth=2, heads=3, patch=4, img=32, **kw) -> ModelConfig:
    return ModelConfig(name="vit_custom", img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                       num_heads=heads, **kw)


def tiny_distill_config(**train) -> DistillConfig:
    from tinymim.train.config import TrainConfig

    return DistillConfig(
        student=tiny_vit(dim=48, depth=2, heads=3, init="mae", pos_embed="sincos"),  # as DistillConfig's
        teacher=TeacherConfig(model=tiny_vit(dim=64, depth=3, heads=4)),
        data=DataConfig(name="synthetic", img_size=32, num_workers=0, synthetic_size=256),
        train=TrainConfig(**{"batch_size": 32, "epochs": 1, "warmup_epochs": 0.5, "precision": "fp32",
                             "progress": False, "log_every": 1, "blr": 1e-3, **train}))


@pytest.fixture(scope="session")
def cifar_train(tmp_path_factory) -> Path:
    """../shared/data/cifar10/train.tar extracted once per test session (ImageFolder layout)."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real data not present: {CIFAR_TAR} (the shared data folder beside the project)")
    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(out, filter="data")
    return out / "train"


@pytest.fixture
def benchmark_module(monkeypatch):
    """Import a script of benchmarks/speed/ or benchmarks/experiments/ as its siblings do (they import each
    other by name)."""
    import importlib

    for folder in ("speed", "experiments"):
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / folder))
    return importlib.import_module

