"""The micro recipes on real CIFAR-10: an MAE teacher, then relation distillation into a student."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from tinymim.cli import main
from tinymim.core.rundir import RunDir

pytestmark = pytest.mark.slow  # real CIFAR-10 (cifar_train), an epoch of each recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "cifar10"


def read_metrics(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()


@pytest.fixture(scope="module")
def mae_teacher(cifar_train, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mae"
    rc = main(["mae", "--config", str(RECIPES / "mae_micro.yaml"), "--output", str(run),
               "data.name=folder", f"data.root={cifar_train}", "data.subset=10240", "train.epochs=1",
               "train.warmup_epochs=0.2", "train.progress=false"])
    assert rc == 0
    return run


def test_mae_micro_leaves_an_encoder(mae_teacher):
    metrics = read_metrics(mae_teacher)
    assert metrics[-1]["loss"] <= 0.7 * metrics[0]["loss"], (metrics[0]["loss"], metrics[-1]["loss"])
    print(f"mae micro: loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f} in {metrics[-1]['step']} steps")
    state = load_file(mae_teacher / "encoder.safetensors")
    assert not any(k.startswith("decoder") for k in state)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=0)
    vit.load_state_dict(state)  # a plain timm ViT, strict


def test_distill_micro_loss_halves_in_first_epoch(mae_teacher, cifar_train, tmp_path):
    run = tmp_path / "distill"
    rc = main(["distill", "--config", str(RECIPES / "distill_micro.yaml"), "--output", str(run),
               "data.name=folder", f"data.root={cifar_train}", f"teacher.checkpoint={mae_teacher}",
               "data.subset=20480", "train.epochs=1", "train.warmup_epochs=0.3", "train.log_every=5",
               "train.progress=false"])
    assert rc == 0
    metrics = read_metrics(run)
    first, last = metrics[0], metrics[-1]
    assert last["epoch"] == pytest.approx(1.0)
    assert last["loss"] <= 0.5 * first["loss"], (first["loss"], last["loss"])
    print(f"distill micro: loss {first['loss']:.4f} -> {last['loss']:.4f} in {last['step']} steps")
    assert {"step", "epoch", "loss", "loss_qk", "loss_vv", "lr", "images_per_s"} <= set(first)
    # run-directory contract
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    state = load_file(run / "student.safetensors")
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=0)
    vit.load_state_dict(state)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    # the same command again: finished runs say so and do nothing
    before = (run / "metrics.jsonl").read_text()
    assert main(["distill", "--config", str(RECIPES / "distill_micro.yaml"), "--output", str(run),
                 "data.name=folder", f"data.root={cifar_train}", f"teacher.checkpoint={mae_teacher}",
                 "data.subset=20480", "train.epochs=1", "train.warmup_epochs=0.3", "train.log_every=5",
                 "train.progress=false"]) == 0
    assert (run / "metrics.jsonl").read_text() == before
