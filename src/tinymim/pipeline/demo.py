"""`tinymim demo`: the main job on a built-in default, in minutes on a laptop CPU.

Runs the pipeline recipe `pipelines/demo`: a small CIFAR-10 MAE teacher shipped with tinymim
(`builtin:cifar10_mae_vit128x6`, made by `tinymim mae`; tinymim/teachers/*/README.md gives the
command) teaches a 4x smaller student its Q-K / V-V relations (TinyMIM); the student is then
fine-tuned on labelled images beside two from-scratch baselines of its shape, budget and images (the
best setup of a grid chosen on held-out images, and the same-recipe twin), and all three are scored
on the test split. Data (--data):
- `cifar10` (default): torchvision's CIFAR-10 in ~/.cache/tinymim/cifar10, downloaded once. Offline
  and without a cached copy, the demo says so in one line and runs on synthetic images instead;
- a folder with train/ and val/ (or test/) ImageFolders, or with train.tar and test.tar (extracted
  into OUTPUT/data), such as a copy of CIFAR-10;
- `synthetic`: procedural images, offline. They cannot show the effect, and the report says so.
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from tinymim.core.config import ConfigError
from tinymim.core.errors import DataError
from tinymim.data.sources import TorchvisionCIFAR
from tinymim.pipeline.planning import load
from tinymim.pipeline.stages import run_pipeline

PRETRAIN_IMAGES = 50000  # the training images (CIFAR-10's all), without labels
FINETUNE_IMAGES = 10000  # a fixed random sample, with labels, for every fine-tuned model
SYNTHETIC_NOTE = (
    "These results come from synthetic images (procedural stripes and blobs), not real ones. The shipped "
    "teacher learned real images, and synthetic classes are told apart by colour and stripe angle alone: "
    "this run checks that the pipeline works and cannot show whether TinyMIM helps. Run `tinymim demo` "
    "with CIFAR-10 (`--data cifar10`, or --data pointing at a copy) to see the effect.")


def cifar10_ready() -> str | None:
    """None when torchvision's CIFAR-10 is cached or could be downloaded; else why not."""
    try:
        TorchvisionCIFAR("cifar10", None, train=True)
        TorchvisionCIFAR("cifar10", None, train=False)
    except DataError as e:
        return str(e).split(";")[0]
    return None


def data_overrides(data: str, output: Path) -> tuple[list[str], list[str]]:
    """(overrides for every stage, extra ones for fine-tuning) that point the demo at `data`."""
    if data == "synthetic":
        return ["data.name=synthetic", f"data.synthetic_size={PRETRAIN_IMAGES}"], [
            f"data.subset={FINETUNE_IMAGES}"]
    if data in ("cifar10", "cifar100"):
        return [f"data.name={data}", f"data.subset={PRETRAIN_IMAGES}"], [f"data.subset={FINETUNE_IMAGES}"]
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"--data {data}: not a folder; use cifar10, synthetic, or a folder with train/ and "
                          "val/ (or test/) ImageFolders, or with train.tar and test.tar")
    if not (root / "train").is_dir() and (root / "train.tar").is_file():
        extracted = output / "data"
        for split in ("train", "test", "val"):
            tar = root / f"{split}.tar"
            if tar.is_file() and not (extracted / split).is_dir():
                with tarfile.open(tar) as t:
                    t.extractall(extracted, filter="data")
        root = extracted
    val = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or val is None:
        raise ConfigError(f"--data {data}: expected {root}/train and {root}/val (or test) ImageFolders")
    return (["data.name=folder", f"data.root={(root / 'train').resolve()}", f"data.subset={PRETRAIN_IMAGES}"],
            [f"data.val_root={val.resolve()}", f"data.subset={FINETUNE_IMAGES}"])


def run_demo(output: str | Path = "runs/demo", data: str = "cifar10", progress: bool = True,
             overrides: list[str] = ()) -> Path:
    """Run the demo pipeline into `output`; `overrides` reach every stage (after the demo's own)."""
    output = Path(output)
    if data == "cifar10":
        why = cifar10_ready()
        if why is not None:
            print(f"tinymim demo: {why}, so this run uses synthetic images, which cannot show TinyMIM's effect; "
                  "to use real images, point --data at a copy of CIFAR-10 (a folder with train/ and test/ "
                  "ImageFolders, or with train.tar and test.tar)", file=sys.stderr, flush=True)
            data = "synthetic"
    common, finetune = data_overrides(data, output)
    cfg = load("pipelines/demo")
    if data == "synthetic":
        cfg.notes = [SYNTHETIC_NOTE, *cfg.notes]
    cfg.overrides = [*cfg.overrides, *common, f"train.progress={str(progress).lower()}"]
    cfg.task_overrides["finetune"] = [*cfg.task_overrides.get("finetune", []), *finetune]
    for stage in cfg.stages:  # after the task overrides, so they win
        stage.overrides = [*stage.overrides, *overrides]
    run_pipeline(cfg, output)
    return output / "report.md"
