import os

# One thread per process unless the caller says otherwise: the models here are tiny, and on a busy
# machine (CI may share its 2 cores) OpenMP's spinning barriers with 2 threads made the suite about
# 3x slower than with 1. Set before torch is imported, so it holds in this process and in every
# subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tinymim.data.pretrain import DataConfig  # noqa: E402
from tinymim.models.vit import ModelConfig  # noqa: E402
from tinymim.tasks.distill import DistillConfig, TeacherConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_TAR = SHARED_DATA / "cifar10" / "train.tar"


def tiny_vit(dim=48, depth=2, heads=3, patch=4, img=32, **kw) -> ModelConfig:
    return ModelConfig(name="vit_custom", img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                       num_heads=heads, **kw)


def tiny_distill_config(**train) -> DistillConfig:
    from tinymim.train.engine import TrainConfig

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
    """Import a script of benchmarks/ as its siblings do (they import each other by name)."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module

