"""Evaluation under distribution shift: ImageNet-A / ImageNet-R and ImageNet-C style corruptions.

- ImageNet-A and ImageNet-R hold 200 of the 1000 ImageNet classes, one folder per WordNet id. A
  1000-way classifier is scored on the subset by keeping only the logits of those 200 classes
  (their ImageNet indices, in the folders' sorted order), then taking the arg-max.
- ImageNet-C: `root/<corruption>/<severity 1-5>/<class>/<image>`. For corruption c with top-1 errors
  E_{s,c} over severities s = 1..5, the corruption error normalized by AlexNet is
      CE_c = sum_s E_{s,c} / sum_s E_{s,c}^AlexNet,      mCE = mean over the 15 corruptions of CE_c
  (Hendrycks & Dietterich, 2019). The unnormalized mean error is mean_{c,s} E_{s,c}. AlexNet's errors are
  ImageNet-C's: mCE is computed only for a tree of all 15 at severities 1..5, and called comparable to
  the paper's only for an ImageNet-1k classifier; any other tree reports its mean error, named as such.
- `evaluate_path(limit=N)` (`tinymim eval --limit N`) scores N images of each evaluated folder, evenly
  spaced over its sorted files (class folders in order, so every class in proportion), the same N in
  every corruption folder; the report says "N of M images".
- `corrupt_folder` (evaluate/corruptions.py, `tinymim corrupt`) writes such a corruption tree from any
  ImageFolder (all 15 with the corruptions extra, six without it), so CIFAR-10-C-style checks run anywhere.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from timm.data import ImageNetInfo

from tinymim.core.errors import TinymimError
from tinymim.core.guards import check_classes
from tinymim.core.rundir import RunDir
from tinymim.data.classification import ClassifyDataConfig, build_eval_loader, classification_sums, sums_to_metrics
from tinymim.data.images import warn_unreadable
from tinymim.data.sources import data_root, is_tar
from tinymim.evaluate.corruptions import IMAGENET_C
from tinymim.evaluate.exportable import build_exportable
from tinymim.models.vit import TokenFeatures
from tinymim.tasks import TASKS
from tinymim.tasks.base import load_run_model
from tinymim.tasks.segment import evaluate_segmentation_run
from tinymim.tasks.segment_eval import limit_split
from tinymim.train.knn import _sample, knn_loader_accuracy

log = logging.getLogger(__name__)

# AlexNet's top-1 error on ImageNet-C, averaged over the 5 severities (Hendrycks & Dietterich 2019);
# since each CE_c divides sums over the same 5 severities, the averages normalize identically.
ALEXNET_ERROR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order."""
    return list(ImageNetInfo().label_names())


def subset_class_indices(folder_wnids: list[str], all_wnids: list[str] | None = None) -> list[int]:
    """ImageNet indices of a subset's classes, in the subset's (sorted folder) order."""
    all_wnids = all_wnids or imagenet_wnids()
    index = {w: i for i, w in enumerate(all_wnids)}
    missing = [w for w in folder_wnids if w not in index]
    if missing:
        raise TinymimError(f"class folders {', '.join(missing[:5])} are not among the model's classes (ImageNet-1k "
                           "WordNet ids like n01443537); a subset folder must name classes the model was trained on")
    return [index[w] for w in folder_wnids]


def corruption_errors(errors: dict[str, list[float]], reference: dict[str, float] | None = ALEXNET_ERROR) -> dict:
    """Per-corruption mean error and the overall mean error; CE per corruption and mCE over the
    reference's corruptions (ImageNet-C's 15) when all of them are there at all 5 severities (others are
    reported, not in mCE).

    errors: corruption -> top-1 errors (fractions) per severity, severities 1..5 in order.
    """
    out = {"mean_error": float(np.mean([e for errs in errors.values() for e in errs])),
           "per_corruption": {c: float(np.mean(errs)) for c, errs in errors.items()}}
    if reference is not None and all(len(errors.get(c, ())) == 5 for c in reference):  # mCE: all 15 x 5
        ce = {c: float(np.mean(errors[c])) / reference[c] for c in reference}
        out["ce"] = ce
        out["mce"] = float(np.mean(list(ce.values())))
    return out


def evaluate_folder(model: torch.nn.Module, loader, device: torch.device,
                    class_indices: list[int] | None = None, progress=None) -> dict:
    """Top-1 / top-5 (%) and mean cross-entropy of a classifier over a loader; logits restricted to
    `class_indices` when given (labels are positions in that list). `progress`: a tqdm bar advanced by
    the images of each batch."""
    model.eval()
    return sums_to_metrics(classification_sums(model, counted(loader, progress), device, class_indices))


def counted(loader, progress):
    """The loader's batches, advancing `progress` (a tqdm bar; None: none) by each batch's images."""
    for batch in loader:
        yield batch
        if progress is not None:
            progress.update(len(batch["label"]) + int(batch.get("skipped", 0)))


def is_imagenet_classifier(classes: list[str] | None, num_classes: int) -> bool:
    """Whether a classifier's outputs are ImageNet-1k's classes (its recorded class names the WordNet ids,
    or, for a run that recorded none, 1000 outputs): the models AlexNet's ImageNet-C errors compare with."""
    if num_classes != 1000:
        return False
    return classes is None or list(classes) == imagenet_wnids()


# ---------------------------------------------------------------------------------------------
# `tinymim eval`


def load_classifier(source: str | Path, weights: str = "best"):
    """A fine-tuned classifier (its class names as `.classes`) and its config, from a `tinymim finetune`
    run directory: its best evaluation's weights, or with weights="last" its final ones."""
    trained = load_run_model(TASKS["finetune"], source, best=weights == "best")
    trained.model.classes = trained.classes  # None for runs made before tinymim recorded them
    return trained.model, trained.config


def evaluate_path(source, data: str | Path, protocol: str = "auto", weights: str = "best", batch_size: int = 128,
                  num_workers: int = 2, device: str | None = None, split: str | None = None,
                  limit: int | None = None, progress: bool = True) -> dict:
    """Evaluate a fine-tuned run on a folder: plain ImageFolder, a 200-class ImageNet subset
    (ImageNet-A/R) or a corruption tree (ImageNet-C style); with `limit`, N images of each folder (evenly
    spaced over it); with `progress`, a progress bar over every image to score on stderr."""
    if limit is not None and limit < 1:
        raise TinymimError(f"--limit must be a positive number of images, got {limit}")
    if RunDir(source).task() == "segment":
        return evaluate_segmentation_run(source, data, split or "val", num_workers, limit, progress)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_classifier(source, weights)
    model.to(dev)
    root = Path(data_root(str(data)))  # a tar of the folder is extracted once
    if not root.is_dir():
        raise TinymimError(f"evaluation data {root} does not exist; pass --data an ImageFolder, a class subset "
                           "or a corruption tree")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = model.classes
    if protocol == "auto":
        if subdirs and all((root / d / "1").is_dir() for d in subdirs):
            protocol = "corruptions"
        elif cfg.num_classes == 1000 and 0 < len(subdirs) < 1000:
            protocol = "subset"
        else:
            protocol = "plain"

    def check(folder: Path) -> None:
        """The class folders must be the head's, or every label is wrong."""
        found = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if classes is not None:
            check_classes(classes, found, f"{folder}", "evaluate on a folder with the training data's class "
                          "folders (for a 200-class ImageNet subset use --protocol subset)")
        elif len(found) != cfg.num_classes:
            raise TinymimError(f"{folder} has {len(found)} class folders, the model {cfg.num_classes} classes: "
                               "every label would be wrong; evaluate on a folder with the training data's classes")

    folder_images = {}  # each evaluated folder's images, before the limit

    def loader_for(folder):
        # holdout=0: a run that held out training images for its evaluations is scored on --data, not on them
        dcfg = replace(cfg.data, name="folder", val_root=str(folder), num_workers=num_workers, holdout=0)
        loader = build_eval_loader(dcfg, batch_size)
        folder_images[str(folder)] = len(loader.dataset)
        return limit_split(loader, limit)  # the images fine-tuning's eval_limit picks

    def scored(loaders: dict, class_indices=None) -> dict:
        """name -> evaluate_folder of each loader, under one progress bar over all their images."""
        from tqdm.auto import tqdm

        total = sum(len(loader.dataset) for loader in loaders.values())
        with tqdm(total=total, desc="eval", unit="img", dynamic_ncols=True, disable=not progress,
                  file=sys.stderr) as bar:
            out = {}
            for name, loader in loaders.items():
                bar.set_postfix_str(name, refresh=False)
                out[name] = evaluate_folder(model, loader, dev, class_indices, bar)
            return out

    def said(result: dict) -> dict:
        """The result, with a warning when unreadable images were left out of its scores, and what of each
        folder was scored: of_images, its images, and limit when --limit cut them."""
        warn_unreadable(result["skipped_images"], result.get("images", "other"))
        result["of_images"] = max(folder_images.values())
        if limit is not None:
            result["limit"] = limit
        return result

    if protocol == "plain":
        check(root)
        return said({"protocol": "plain", **scored({root.name: loader_for(root)})[root.name]})
    if protocol == "subset":
        indices = subset_class_indices(subdirs, classes)
        return said({"protocol": "subset", "classes": len(indices),
                     **scored({root.name: loader_for(root)}, indices)[root.name]})
    if protocol not in ("corruptions", "imagenet-c"):
        raise TinymimError(f"unknown protocol {protocol!r}: auto, plain, subset, corruptions or imagenet-c")
    if protocol == "imagenet-c":  # mCE: every one of the 15 at severities 1..5
        missing = [c for c in IMAGENET_C if not all((root / c / str(s)).is_dir() for s in range(1, 6))]
        if missing:
            raise TinymimError(f"--protocol imagenet-c needs all 15 corruptions at severities 1..5; {root} lacks "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: write them with "
                               "`tinymim corrupt` (all 15 need pip install 'tinymim[corruptions]')")
    severities = {}
    for c in subdirs:
        sev = [d.name for d in (root / c).iterdir() if d.is_dir()]
        if not all(x.isdigit() and 1 <= int(x) <= 5 for x in sev):
            raise TinymimError(f"{root / c} should hold severity folders 1..5, found {', '.join(sorted(sev)[:5])}")
        severities[c] = sorted(sev, key=int)
        for x in severities[c]:
            check(root / c / x)
    results = scored({f"{c}/{s}": loader_for(root / c / s) for c in subdirs for s in severities[c]})
    errors = {c: [1 - results[f"{c}/{s}"]["top1"] / 100 for s in severities[c]] for c in subdirs}
    table = {c: {s: results[f"{c}/{s}"]["top1"] for s in severities[c]} for c in subdirs}
    scored_images = [r["images"] for r in results.values()]
    out = {"protocol": protocol, "top1": table, **corruption_errors(errors),
           "skipped_images": sum(r["skipped_images"] for r in results.values()),
           "images": max(scored_images), "corruptions": len(subdirs),
           "severities": sorted({int(s) for sev in severities.values() for s in sev}),
           "mean_top1": float(np.mean([t for row in table.values() for t in row.values()]))}
    out["comparable_to_paper"] = "mce" in out and is_imagenet_classifier(classes, cfg.num_classes)
    out["num_classes"] = cfg.num_classes
    return said(out)


def _images_said(result: dict, extra: str = "") -> str:
    """'N images...', or with --limit 'N of M images ..., evenly spaced: --limit N'."""
    skipped = f", {result['skipped_images']} unreadable skipped" if result.get("skipped_images") else ""
    if result.get("limit") is not None and result.get("of_images", 0) > result["limit"]:
        return (f"{result['images']} of {result['of_images']} images{extra}, evenly spaced: --limit "
                f"{result['limit']}{skipped}")
    return f"{result['images']} images{extra}{skipped}"


def format_report(result: dict) -> str:
    if result["protocol"] == "segmentation":
        rows = [f"| {name} | {iou:.2f} |" for name, iou in result["per_class_iou"].items()]
        images = _images_said(result, f" of split {result['split']}")
        return "\n".join([f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}  "
                          f"({images})", "", "| class | IoU |", "|---|---|", *rows])
    if result["protocol"] not in ("corruptions", "imagenet-c"):
        extra = f" over {result['classes']} classes (logits restricted)" if "classes" in result else ""
        return (f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
                f"({_images_said(result, extra)})")
    sev = sorted({s for row in result["top1"].values() for s in row}, key=int)
    lines = ["| corruption | " + " | ".join(f"sev {s} top-1" for s in sev) + " | mean error | CE |",
             "|---|" + "---|" * (len(sev) + 2)]
    for c, row in result["top1"].items():
        ce = result.get("ce", {}).get(c)
        lines.append(f"| {c} | " + " | ".join(f"{row.get(s, float('nan')):.2f}" for s in sev)
                     + f" | {100 * result['per_corruption'][c]:.2f} | {'' if ce is None else f'{100 * ce:.1f}'} |")
    shape = f"{len(result['top1'])} corruption{'s' * (len(result['top1']) != 1)} x {len(sev)} severities"
    each = f"{result['images']} images each"
    if result.get("limit") is not None and result.get("of_images", 0) > result["limit"]:
        each = f"{result['images']} of {result['of_images']} images each (evenly spaced: --limit {result['limit']})"
    lines.append(f"\nmean top-1 error {100 * result['mean_error']:.2f}% (mean corrupted top-1 "
                 f"{100 - 100 * result['mean_error']:.2f}%) over {shape}, {each}; not AlexNet-normalized")
    if result.get("comparable_to_paper"):
        lines.append(f"mCE {100 * result['mce']:.1f} (ImageNet-C: the 15 corruptions x 5 severities, normalized by "
                     "AlexNet's errors: comparable to the paper)")
    elif "mce" in result:
        lines.append(f"AlexNet-normalized mean CE {100 * result['mce']:.1f} over the 15 x 5: not comparable to "
                     f"ImageNet-C mCE (AlexNet's errors are on ImageNet-1k; this model has {result['num_classes']} "
                     "classes)")
    else:
        lines.append(f"mCE: not computed: it is defined for the 15 ImageNet-C corruptions at severities 1..5 "
                     f"(AlexNet-normalized); this tree has {shape}, and its mean error is not comparable to "
                     "ImageNet-C mCE")
    if result.get("skipped_images"):
        lines.append(f"{result['skipped_images']} unreadable images skipped (errors are over the readable ones)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `tinymim knn`


def knn_evaluate(source, train_root: str, val_root: str, model_name: str | None = None, block: int | None = None,
                 k: int = 20, temperature: float = 0.07, mean=None, std=None, batch_size: int = 256,
                 num_workers: int = 2, bank_size: int | None = None, features: str = "auto",
                 pool: str = "avg") -> dict:
    """k-NN top-1 of a model's frozen features: those `tinymim export` writes for the same `features`
    and `pool` (tinymim.models.features; a classifier's: its pre-logits), or the average patch token
    entering block `block` (1-indexed) of the whole model. `source`: a run directory, a shipped teacher
    (`builtin:NAME`) or a weights file with `model_name`. Images are prepared as the run prepared them
    (its mean, std and crop; ImageNet's for a bare file) unless `mean`/`std` say otherwise."""
    if k < 1 or not temperature > 0 or (bank_size is not None and bank_size < 1):
        raise TinymimError(f"k ({k}) and --bank-size ({bank_size}) must be positive, and the temperature "
                           f"({temperature}) above 0")
    for folder in (train_root, val_root):
        if not Path(folder).is_dir() and not is_tar(folder):
            raise TinymimError(f"{folder} is not a folder; --data and --val take labelled ImageFolders "
                               "(root/<class>/<image>) or tars of them (train.tar, test.tar)")
    if block is not None and (features, pool) != ("auto", "avg"):
        raise TinymimError("--block takes the mean patch token entering that block: leave out --features and --pool")
    model, info = build_exportable(source, model_name, "final" if block is not None else features, pool)
    if block is not None and not 1 <= block <= len(model.blocks) + 1:
        raise TinymimError(f"--block {block} is out of range: the model has blocks 1..{len(model.blocks)} "
                           f"({len(model.blocks) + 1}: after the last)")
    if block is None and info["note"]:
        log.info("%s", info["note"])
    if model.num_classes:  # a classifier: its pre-logits (the export loaded with num_classes=0)
        model.reset_classifier(0)
    size, run = model.patch_embed.img_size[0], model.pretrained_cfg  # the run's own preprocessing
    data = ClassifyDataConfig(name="folder", root=str(train_root), val_root=str(val_root), img_size=size,
                              eval_crop_pct=run["crop_pct"], num_workers=num_workers,
                              mean=list(mean if mean is not None else run["mean"]),
                              std=list(std if std is not None else run["std"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return knn_loader_accuracy(model.to(device) if block is None else TokenFeatures(model.to(device), block),
                               _sample(build_eval_loader(data, batch_size, split_train=True), bank_size),
                               build_eval_loader(data, batch_size), device, k, temperature)
