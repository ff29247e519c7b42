"""Evaluation under distribution shift: ImageNet-A / ImageNet-R and ImageNet-C style corruptions.

- ImageNet-A and ImageNet-R hold 200 of the 1000 ImageNet classes, one folder per WordNet id. A
  1000-way classifier is scored on the subset by keeping only the logits of those 200 classes
  (their ImageNet indices, in the folders' sorted order), then taking the arg-max.
- ImageNet-C: `root/<corruption>/<severity 1-5>/<class>/<image>`. For corruption c with top-1 errors
  E_{s,c} over severities s = 1..5, the corruption error normalized by AlexNet is
      CE_c = sum_s E_{s,c} / sum_s E_{s,c}^AlexNet,      mCE = mean over the 15 corruptions of CE_c
  (Hendrycks & Dietterich, 2019). The unnormalized mean error is mean_{c,s} E_{s,c}.
- `corrupt_folder` writes such a corruption tree from any ImageFolder (8 of the 15 corruptions, those that
  need nothing beyond numpy and Pillow), so CIFAR-10-C-style checks run anywhere.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinymim.core.errors import TinymimError
from tinymim.core.guards import check_classes
from tinymim.tasks import TASKS
from tinymim.tasks.base import load_run_model

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
    from timm.data import ImageNetInfo

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
    """Per-corruption mean error and the overall mean error; CE per corruption and mCE when the
    corruptions are exactly the reference's (ImageNet-C's 15).

    errors: corruption -> top-1 errors (fractions) per severity.
    """
    out = {"mean_error": float(np.mean([e for errs in errors.values() for e in errs])),
           "per_corruption": {c: float(np.mean(errs)) for c, errs in errors.items()}}
    if reference is not None and set(errors) == set(reference):  # mCE is defined over all 15
        ce = {c: float(np.mean(errs)) / reference[c] for c, errs in errors.items()}
        out["ce"] = ce
        out["mce"] = float(np.mean(list(ce.values())))
    return out


def evaluate_folder(model: torch.nn.Module, loader, device: torch.device,
                    class_indices: list[int] | None = None) -> dict:
    """Top-1 / top-5 (%) and mean cross-entropy of a classifier over a loader; logits restricted to
    `class_indices` when given (labels are positions in that list)."""
    from tinymim.data.classification import classification_sums, sums_to_metrics

    model.eval()
    return sums_to_metrics(classification_sums(model, loader, device, class_indices))


# ---------------------------------------------------------------------------------------------
# corruptions (ImageNet-C parameters; spatial ones scaled from 224px to the image size)


def _gaussian_noise(x, s, rng, size):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x, s, rng, size):
    c = [60, 25, 12, 5, 3][s - 1]
    return rng.poisson(x * c) / c


def _impulse_noise(x, s, rng, size):
    c = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    x = x.copy()
    hit = rng.random(x.shape[:2]) < c
    salt = rng.random(x.shape[:2]) < 0.5
    x[hit & salt], x[hit & ~salt] = 1.0, 0.0
    return x


def _defocus_blur(x, s, rng, size):
    from PIL import ImageFilter

    radius = [3, 4, 6, 8, 10][s - 1] * size / 224
    img = Image.fromarray((x * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius / 2))
    return np.asarray(img, dtype=np.float64) / 255


def _brightness(x, s, rng, size):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]
    hsv = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).convert("HSV"), dtype=np.float64) / 255
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.asarray(Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB"), dtype=np.float64) / 255


def _contrast(x, s, rng, size):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _pixelate(x, s, rng, size):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    img = Image.fromarray((x * 255).astype(np.uint8))
    w, h = img.size
    img = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(img, dtype=np.float64) / 255


def _jpeg_compression(x, s, rng, size):
    quality = [25, 18, 15, 10, 7][s - 1]
    buf = io.BytesIO()
    Image.fromarray((x * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255


CORRUPTIONS = {f.__name__[1:]: f for f in (_gaussian_noise, _shot_noise, _impulse_noise, _defocus_blur, _brightness,
                                           _contrast, _pixelate, _jpeg_compression)}


def corrupt_image(img: Image.Image, corruption: str, severity: int, seed: int = 0) -> Image.Image:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; available: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    from tinymim.data.images import to_rgb8

    x = np.asarray(to_rgb8(img), dtype=np.float64) / 255
    y = CORRUPTIONS[corruption](x, severity, np.random.default_rng(seed), min(img.size))
    return Image.fromarray((np.clip(y, 0, 1) * 255).round().astype(np.uint8))


def corrupt_folder(src: str | Path, dst: str | Path, corruptions=None, severities=(1, 2, 3, 4, 5),
                   limit_per_class: int | None = None) -> int:
    """Write dst/<corruption>/<severity>/<class>/<image>.png from the ImageFolder src; returns images written."""
    from tinymim.data.sources import FolderImages

    corruptions = list(corruptions or CORRUPTIONS)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise TinymimError(f"unknown corruption(s) {', '.join(unknown)}; available: {', '.join(CORRUPTIONS)}")
    if not all(1 <= s <= 5 for s in severities):
        raise TinymimError(f"severities must be 1..5, got {list(severities)}")
    if limit_per_class is not None and limit_per_class < 1:
        raise TinymimError(f"--per-class must be positive, got {limit_per_class}")
    source = FolderImages(src)
    per_class: dict[int, int] = {}
    chosen = []
    for i, (path, label) in enumerate(source.samples):
        if limit_per_class is None or per_class.get(label, 0) < limit_per_class:
            per_class[label] = per_class.get(label, 0) + 1
            chosen.append(i)
    written = 0
    for i in chosen:
        img, label = source.load(i)
        name = Path(source.samples[i][0]).stem + ".png"
        for c in corruptions:
            for s in severities:
                out = Path(dst) / c / str(s) / source.classes[label] / name
                out.parent.mkdir(parents=True, exist_ok=True)
                corrupt_image(img, c, s, seed=i * 31 + s).save(out)
                written += 1
    return written


# ---------------------------------------------------------------------------------------------
# `tinymim eval`


def load_classifier(source: str | Path, weights: str = "best"):
    """A fine-tuned classifier (its class names as `.classes`) and its config, from a `tinymim finetune`
    run directory: its best evaluation's weights, or with weights="last" its final ones."""
    trained = load_run_model(TASKS["finetune"], source, best=weights == "best")
    trained.model.classes = trained.classes  # None for runs made before tinymim recorded them
    return trained.model, trained.config


def evaluate_path(source, data: str | Path, protocol: str = "auto", weights: str = "best", batch_size: int = 128,
                  num_workers: int = 2, device: str | None = None, split: str | None = None) -> dict:
    """Evaluate a fine-tuned run on a folder: plain ImageFolder, a 200-class ImageNet subset
    (ImageNet-A/R) or a corruption tree (ImageNet-C style)."""
    from dataclasses import replace

    from tinymim.core.rundir import RunDir
    from tinymim.data.classification import build_eval_loader

    if RunDir(source).task() == "segment":
        from tinymim.tasks.segment import evaluate_segmentation_run

        return evaluate_segmentation_run(source, data, split or "val", num_workers)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_classifier(source, weights)
    model.to(dev)
    root = Path(data)
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

    def loader_for(folder):
        dcfg = replace(cfg.data, name="folder", val_root=str(folder), num_workers=num_workers)
        return build_eval_loader(dcfg, batch_size)

    def said(result: dict) -> dict:
        """The result, with a warning when unreadable images were left out of its scores."""
        if result["skipped_images"]:
            log.warning("%d unreadable images skipped (each named above): the scores are over the %s readable "
                        "ones", result["skipped_images"], result.get("images", "other"))
        return result

    if protocol == "plain":
        check(root)
        return said({"protocol": "plain", **evaluate_folder(model, loader_for(root), dev)})
    if protocol == "subset":
        indices = subset_class_indices(subdirs, classes)
        return said({"protocol": "subset", "classes": len(indices),
                     **evaluate_folder(model, loader_for(root), dev, class_indices=indices)})
    if protocol != "corruptions":
        raise TinymimError(f"unknown protocol {protocol!r}: auto, plain, subset or corruptions")
    errors, table, skipped = {}, {}, 0
    for c in subdirs:
        sev = [d.name for d in (root / c).iterdir() if d.is_dir()]
        if not all(x.isdigit() for x in sev):
            raise TinymimError(f"{root / c} should hold severity folders 1..5, found {', '.join(sorted(sev)[:5])}")
        sev = sorted(sev, key=int)
        for x in sev:
            check(root / c / x)
        res = [evaluate_folder(model, loader_for(root / c / s), dev) for s in sev]
        errors[c] = [1 - r["top1"] / 100 for r in res]
        table[c] = dict(zip(sev, (r["top1"] for r in res)))
        skipped += sum(r["skipped_images"] for r in res)
    return said({"protocol": "corruptions", "top1": table, **corruption_errors(errors), "skipped_images": skipped})


def format_report(result: dict) -> str:
    if result["protocol"] == "segmentation":
        rows = [f"| {name} | {iou:.2f} |" for name, iou in result["per_class_iou"].items()]
        return "\n".join([f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}  "
                          f"({result['images']} images of split {result['split']})", "", "| class | IoU |",
                          "|---|---|", *rows])
    if result["protocol"] != "corruptions":
        extra = f" over {result['classes']} classes (logits restricted)" if "classes" in result else ""
        unreadable = f", {result['skipped_images']} unreadable skipped" if result.get("skipped_images") else ""
        return (f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
                f"({result['images']} images{extra}{unreadable})")
    sev = sorted({s for row in result["top1"].values() for s in row}, key=int)
    lines = ["| corruption | " + " | ".join(f"sev {s} top-1" for s in sev) + " | mean error | CE |",
             "|---|" + "---|" * (len(sev) + 2)]
    for c, row in result["top1"].items():
        ce = result.get("ce", {}).get(c)
        lines.append(f"| {c} | " + " | ".join(f"{row.get(s, float('nan')):.2f}" for s in sev)
                     + f" | {100 * result['per_corruption'][c]:.2f} | {'' if ce is None else f'{100 * ce:.1f}'} |")
    lines.append(f"\nmean error {100 * result['mean_error']:.2f}%")
    if "mce" in result:
        lines.append(f"mCE {100 * result['mce']:.1f} (normalized by AlexNet)")
    else:
        lines.append("mCE: not computed (defined for the 15 ImageNet-C corruptions, normalized by AlexNet's errors)")
    if result.get("skipped_images"):
        lines.append(f"{result['skipped_images']} unreadable images skipped (errors are over the readable ones)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `tinymim knn`


def knn_evaluate(source, train_root: str, val_root: str, model_name: str | None = None, block: int | None = None,
                 k: int = 20, temperature: float = 0.07, mean=None, std=None, batch_size: int = 256,
                 num_workers: int = 2, bank_size: int | None = None) -> dict:
    """k-NN top-1 of a model's frozen features: the average patch token after the final norm, or
    entering block `block` (1-indexed)."""
    from tinymim.core.errors import TinymimError
    from tinymim.data.classification import ClassifyDataConfig, build_eval_loader
    from tinymim.evaluate.export import build_exportable
    from tinymim.models.vit import TokenFeatures
    from tinymim.train.knn import _eval_crop_pct, _sample, knn_loader_accuracy

    if k < 1 or not temperature > 0 or (bank_size is not None and bank_size < 1):
        raise TinymimError(f"k ({k}) and --bank-size ({bank_size}) must be positive, and the temperature "
                           f"({temperature}) above 0")
    for folder in (train_root, val_root):
        if not Path(folder).is_dir():
            raise TinymimError(f"{folder} is not a folder; --data and --val take labelled ImageFolders "
                               "(root/<class>/<image>)")
    model, _ = build_exportable(source, model_name)
    if block is not None and not 1 <= block <= len(model.blocks) + 1:
        raise TinymimError(f"--block {block} is out of range: the model has blocks 1..{len(model.blocks)} "
                           f"({len(model.blocks) + 1}: after the last)")
    size = model.patch_embed.img_size[0]
    data = ClassifyDataConfig(name="folder", root=str(train_root), val_root=str(val_root), img_size=size,
                              eval_crop_pct=_eval_crop_pct(size), num_workers=num_workers)
    if mean is not None:
        data.mean = list(mean)
    if std is not None:
        data.std = list(std)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return knn_loader_accuracy(TokenFeatures(model.to(device), block),
                               _sample(build_eval_loader(data, batch_size, split_train=True), bank_size),
                               build_eval_loader(data, batch_size), device, k, temperature)
