import os
import tarfile
from pathlib import Path

import pytest

from tinymim.data.pretrain import DataConfig
from tinymim.models.vit import ModelConfig
from tinymim.tasks.distill import DistillConfig, TeacherConfig

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


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
