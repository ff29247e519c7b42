"""ImageNet-A/R logit restriction, the mCE formula, corruption trees and `tinymim eval`."""
import math

import pytest
import torch
from PIL import Image

import tinymim.tasks as tasks
from tinymim.cli import main
from tinymim.core.errors import TinymimError
from tinymim.data.classification import ClassifyDataConfig, build_eval_loader
from tinymim.evaluate.robustness import (
    ALEXNET_ERROR,
    corruption_errors,
    evaluate_folder,
    imagenet_wnids,
    subset_class_indices,
)


class ColorCodedClassifier(torch.nn.Module):
    """1000-way logits: the image's red level picks one of `targets` (ImageNet indices) with logit 1;
    class 999 (outside the subset) always gets logit 5, so an unrestricted arg-max is always wrong."""

    def __init__(self, targets):
        super().__init__()
        self.targets = targets

    def forward(self, x):
        logits = torch.zeros(len(x), 1000)
        logits[:, 999] = 5.0
        level = x[:, 0].mean((1, 2))  # 50/255, 128/255 or 200/255
        choice = torch.bucketize(level, torch.tensor([0.35, 0.65]))
        logits[torch.arange(len(x)), torch.tensor(self.targets)[choice]] = 1.0
        return logits


def test_subset_restriction_on_a_fake_imagenet_r_layout(tmp_path):
    wnids = imagenet_wnids()
    subset = [wnids[7], wnids[300], wnids[42]]  # folders sort as: wnids[7], wnids[42], wnids[300]
    folders = sorted(subset)
    assert subset_class_indices(folders, wnids) == [7, 42, 300]
    reds = {folders[0]: [50, 50], folders[1]: [200], folders[2]: [200]}  # predicted positions 0,0 | 2 | 2
    for w, levels in reds.items():
        (tmp_path / w).mkdir()
        for i, r in enumerate(levels):
            Image.new("RGB", (8, 8), (r, 0, 0)).save(tmp_path / w / f"{i}.png")
    cfg = ClassifyDataConfig(name="folder", val_root=str(tmp_path), img_size=8, eval_crop_pct=1.0,
                             mean=[0, 0, 0], std=[1, 1, 1], num_workers=0)
    model = ColorCodedClassifier(targets=[7, 42, 300])
    restricted = evaluate_folder(model, build_eval_loader(cfg, 4), torch.device("cpu"),
                                 class_indices=subset_class_indices(folders, wnids))
    # hand count: folder 0 -> 2 of 2 right; folder 1 (label 1) -> predicted 2, wrong; folder 2 -> right
    assert restricted["top1"] == pytest.approx(75.0) and restricted["images"] == 4
    unrestricted = evaluate_folder(model, build_eval_loader(cfg, 4), torch.device("cpu"))
    assert unrestricted["top1"] == 0.0  # class 999 wins everywhere without the restriction
    with pytest.raises(TinymimError, match="not among the model.s classes"):
        subset_class_indices(["cat", "dog"], wnids)


def test_mce_formula_by_hand():
    errors = {c: [0.5] * 5 for c in ALEXNET_ERROR}
    errors["contrast"] = [0.2, 0.4, 0.6, 0.8, 1.0]
    out = corruption_errors(errors)
    ce = {c: (0.5 * 5) / (ALEXNET_ERROR[c] * 5) for c in ALEXNET_ERROR}
    ce["contrast"] = (0.2 + 0.4 + 0.6 + 0.8 + 1.0) / (ALEXNET_ERROR["contrast"] * 5)
    assert out["ce"] == pytest.approx(ce)
    assert out["mce"] == pytest.approx(sum(ce.values()) / 15)
    assert out["ce"]["gaussian_noise"] == pytest.approx(0.5 / 0.886428)
    assert out["mean_error"] == pytest.approx((14 * 2.5 + 3.0) / 75)
    # fewer corruptions (a CIFAR-C-style tree): mean error only, no AlexNet-normalized mCE
    partial = corruption_errors({"gaussian_noise": [0.1, 0.3], "contrast": [0.2]})
    assert "mce" not in partial and partial["mean_error"] == pytest.approx(0.2)


def test_eval_on_a_corruption_folder_prints_a_table(tmp_path, capsys):
    from test_downstream import tiny_finetune_config


    cfg = tiny_finetune_config(max_steps=2)
    cfg.data.synthetic_classes = 3
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    src = tmp_path / "clean"
    from tinymim.data.sources import SyntheticImages
    images = SyntheticImages(size=6, img_size=32, num_classes=3, seed=5)
    for i in range(6):
        img, c = images.load(i)
        (src / f"class_{c}").mkdir(parents=True, exist_ok=True)
        img.save(src / f"class_{c}" / f"{i}.png")
    assert main(["corrupt", str(src), "--output", str(tmp_path / "corrupted"),
                 "--corruptions", "gaussian_noise", "contrast", "--severities", "1", "5"]) == 0
    assert len(list((tmp_path / "corrupted").rglob("*.png"))) == 6 * 2 * 2
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "corrupted"), "--workers", "0",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| corruption | sev 1 top-1 | sev 5 top-1 | mean error | CE |" in out
    assert "| gaussian_noise |" in out and "| contrast |" in out and "mCE: not computed" in out
    import json
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["protocol"] == "corruptions" and math.isfinite(result["mean_error"]) and "mce" not in result
    assert set(result["top1"]) == {"gaussian_noise", "contrast"} and set(result["top1"]["contrast"]) == {"1", "5"}
    # plain protocol on the clean folder
    assert main(["eval", str(tmp_path / "run"), "--data", str(src), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_knn_command_on_a_distilled_student(tmp_path, capsys):
    from conftest import tiny_distill_config

    from tinymim.data.sources import SyntheticImages

    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "run")
    for split, seed in (("train", 0), ("val", 1)):
        images = SyntheticImages(size=40, img_size=32, num_classes=4, seed=seed)
        for i in range(40):
            img, c = images.load(i)
            (tmp_path / split / f"class_{c}").mkdir(parents=True, exist_ok=True)
            img.save(tmp_path / split / f"class_{c}" / f"{i}.png")
    capsys.readouterr()
    assert main(["knn", str(tmp_path / "run"), "--data", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                 "--workers", "0", "--block", "2"]) == 0
    out = capsys.readouterr().out
    assert "k-NN (k=20, T=0.07) top-1" in out and "40 queries, bank of 40" in out


def test_knn_prepares_images_as_the_run_did_and_takes_builtin_names(tmp_path, monkeypatch):
    """The k-NN bank and queries are normalized with the run's own mean/std (not ImageNet's), and a
    shipped teacher is taken by its builtin: name as export takes it."""
    from conftest import tiny_distill_config

    import tinymim.evaluate.robustness as robustness
    from tinymim.models.checkpoint import BUILTIN_PREFIX

    cfg = tiny_distill_config(max_steps=1)
    cfg.data.mean, cfg.data.std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    tasks.run("distill", cfg, tmp_path / "run")
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    seen = []

    def loader(data, batch_size, split_train=False):
        seen.append((list(data.mean), list(data.std)))
        return []

    monkeypatch.setattr(robustness, "build_eval_loader", loader)
    monkeypatch.setattr(robustness, "knn_loader_accuracy", lambda *a, **k: {"knn_top1": 0.0})
    robustness.knn_evaluate(tmp_path / "run", str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0)
    assert seen == [([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])] * 2
    robustness.knn_evaluate(tmp_path / "run", str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0,
                            mean=[0.5] * 3, std=[0.25] * 3)
    assert seen[-1] == ([0.5] * 3, [0.25] * 3)
    monkeypatch.setattr(robustness, "builtin_teacher", lambda spec: tmp_path / "run" if spec == "builtin:x" else None)
    robustness.knn_evaluate(f"{BUILTIN_PREFIX}x", str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0)
    assert seen[-1] == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
