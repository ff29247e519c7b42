"""`tinymim demo`: the main job on a built-in default, offline, in minutes on a laptop CPU.

Runs the pipeline recipe `pipelines/demo` (MAE teacher -> TinyMIM student -> fine-tune it and a
from-scratch twin) on 6,000 built-in synthetic images, or on real data with --data:
- `cifar10`: torchvision's CIFAR-10 (in ~/.cache/tinymim/cifar10; downloaded once if missing),
- a folder with `train/` and `val/` (or `test/`) ImageFolders,
- a folder with `train.tar` and `test.tar` of such ImageFolders (extracted into OUTPUT/data).
Pre-training sees 6,000 images (a fixed random sample of real data), fine-tuning 2,000 of them
with labels; the report compares the two fine-tuned models.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from tinymim.config import ConfigError

IMAGES = 6000


def data_overrides(data: str, output: Path) -> tuple[list[str], list[str]]:
    """(overrides for every stage, extra ones for fine-tuning) that point the demo at `data`."""
    if data == "synthetic":
        return ["data.name=synthetic", f"data.synthetic_size={IMAGES}"], []
    if data in ("cifar10", "cifar100"):
        return [f"data.name={data}", f"data.subset={IMAGES}"], ["data.subset=2000"]
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"--data {data}: not a folder; use synthetic, cifar10, or a folder with train/ and "
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
    return ([f"data.name=folder", f"data.root={(root / 'train').resolve()}", f"data.subset={IMAGES}"],
            [f"data.val_root={val.resolve()}", "data.subset=2000"])


def run_demo(output: str | Path = "runs/demo", data: str = "synthetic", progress: bool = True,
             overrides: list[str] = ()) -> Path:
    """Run the demo pipeline into `output`; `overrides` reach every stage (after the demo's own)."""
    from tinymim.pipeline import load, run_pipeline

    output = Path(output)
    common, finetune = data_overrides(data, output)
    cfg = load("pipelines/demo")
    cfg.overrides = [*cfg.overrides, *common, f"train.progress={str(progress).lower()}"]
    cfg.task_overrides["finetune"] = [*cfg.task_overrides.get("finetune", []), *finetune]
    for stage in cfg.stages:  # after the task overrides, so they win
        stage.overrides = [*stage.overrides, *overrides]
    run_pipeline(cfg, output)
    return output / "report.md"
