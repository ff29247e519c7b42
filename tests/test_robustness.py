"""ImageNet-A/R logit restriction, the mCE formula, corruption trees and `tinymim eval`."""
import math

import numpy as np
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
    assert "over 2 corruptions x 2 severities, 6 images each" in out and "comparable to the paper" not in out
    import json
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["protocol"] == "corruptions" and math.isfinite(result["mean_error"]) and "mce" not in result
    assert set(result["top1"]) == {"gaussian_noise", "contrast"} and set(result["top1"]["contrast"]) == {"1", "5"}
    # plain protocol on the clean folder
    assert main(["eval", str(tmp_path / "run"), "--data", str(src), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out


def _labelled_folder(root, n: int, classes: int = 3, seed: int = 5):
    from tinymim.data.sources import SyntheticImages

    images = SyntheticImages(size=n, img_size=32, num_classes=classes, seed=seed)
    for i in range(n):
        img, c = images.load(i)
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"class_{c}" / f"{i:02d}.png")
    return root


def test_eval_limit_scores_evenly_spaced_images_with_a_progress_bar(tmp_path, capsys):
    """--limit N scores the N images spread_picks chooses over each folder's sorted files (the same scores as
    a folder of just those), says "N of M images", and a progress bar counts every image scored; a 3-severity
    tree's error is named for what it is, not as ImageNet-C's mCE."""
    import json
    import shutil

    from test_downstream import tiny_finetune_config

    from tinymim.tasks.segment_eval import spread_picks

    cfg = tiny_finetune_config(max_steps=2)
    cfg.data.synthetic_classes = 3
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    clean = _labelled_folder(tmp_path / "clean", 12)
    files = sorted(clean.rglob("*.png"), key=lambda f: (f.parent.name, f.name))
    for i in spread_picks(len(files), 5):  # the 5 --limit 5 scores, as a folder of their own
        (tmp_path / "picked" / files[i].parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(files[i], tmp_path / "picked" / files[i].parent.name / files[i].name)
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", run, "--data", str(clean), "--workers", "0", "--limit", "5", "--json",
                 str(tmp_path / "limited.json")]) == 0
    out, err = capsys.readouterr()
    assert "(5 of 12 images, evenly spaced: --limit 5)" in out and "5/5" in err and "eval" in err
    assert main(["eval", run, "--data", str(tmp_path / "picked"), "--workers", "0", "--no-progress", "--json",
                 str(tmp_path / "picked.json")]) == 0
    out, err = capsys.readouterr()
    assert "(5 images)" in out and "eval" not in err
    limited, picked = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("limited", "picked"))
    assert limited["images"] == picked["images"] == 5 and limited["of_images"] == 12
    assert limited["top1"] == picked["top1"] and limited["loss"] == pytest.approx(picked["loss"], rel=1e-6)
    assert main(["corrupt", str(clean), "--output", str(tmp_path / "c"), "--corruptions", "gaussian_noise",
                 "contrast", "--severities", "1", "2", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--data", str(tmp_path / "c"), "--workers", "0", "--limit", "4"]) == 0
    out, err = capsys.readouterr()
    assert "24/24" in err  # 2 corruptions x 3 severities x 4 images, under one bar
    assert "over 2 corruptions x 3 severities, 4 of 12 images each (evenly spaced: --limit 4)" in out
    assert "mCE: not computed" in out and "not comparable to ImageNet-C mCE" in out and "AlexNet)" not in out
    assert main(["eval", run, "--data", str(clean), "--limit", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit must be a positive number of images, got 0" in err


def test_eval_scores_the_data_given_for_a_run_that_held_out_training_images(tmp_path, capsys):
    """A run fine-tuned with data.holdout evaluated on held-out training images; tinymim eval --data scores
    the folder it is given, not those."""
    import json

    from test_downstream import tiny_finetune_config

    cfg = tiny_finetune_config(max_steps=2)
    cfg.data.synthetic_classes, cfg.data.holdout = 3, 40
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    assert main(["eval", str(tmp_path / "run"), "--data", str(_labelled_folder(tmp_path / "clean", 9)),
                 "--workers", "0", "--json", str(tmp_path / "r.json")]) == 0
    assert "(9 images)" in capsys.readouterr().out and json.loads((tmp_path / "r.json").read_text())["images"] == 9


def test_eval_limit_on_a_segment_run(tmp_path, capsys):
    """A segment run's --limit N scores the N frames spread over the split: the same mIoU as a split of just those."""
    import json
    import shutil

    from test_segmentation import _seg_folder, tiny_segment_overrides

    from tinymim.tasks import load_config
    from tinymim.tasks.segment_eval import spread_picks

    root = _seg_folder(tmp_path / "data", "train", 4)
    _seg_folder(root, "val", 7, seed=1)
    tasks.run("segment", load_config("segment", None, tiny_segment_overrides(root, "train.max_steps=2")),
              tmp_path / "run")
    for kind in ("images", "annotations"):
        (root / kind / "picked").mkdir()
        for i in spread_picks(7, 3):  # 0, 3, 6
            shutil.copy(root / kind / "val" / f"{i}.png", root / kind / "picked" / f"{i}.png")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(root), "--workers", "0", "--limit", "3", "--json",
                 str(tmp_path / "limited.json")]) == 0
    out, err = capsys.readouterr()
    assert "(3 of 7 images of split val, evenly spaced: --limit 3)" in out
    assert "segment eval" in err and "0/3 " in err  # a progress bar over the 3 images
    assert main(["eval", str(tmp_path / "run"), "--data", str(root), "--split", "picked", "--workers", "0",
                 "--json", str(tmp_path / "picked.json")]) == 0
    limited, picked = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("limited", "picked"))
    assert limited["images"] == picked["images"] == 3 and limited["of_images"] == 7
    assert limited["mIoU"] == pytest.approx(picked["mIoU"]) and limited["aAcc"] == pytest.approx(picked["aAcc"])


def test_mce_is_comparable_to_the_paper_only_for_imagenet_c_of_an_imagenet_classifier():
    from tinymim.evaluate.robustness import format_report, is_imagenet_classifier

    def result(errors: dict, comparable: bool, num_classes: int) -> dict:
        table = {c: {str(s + 1): 100 * (1 - e) for s, e in enumerate(errs)} for c, errs in errors.items()}
        out = {"protocol": "corruptions", "top1": table, **corruption_errors(errors), "skipped_images": 0,
               "images": 50, "of_images": 50, "num_classes": num_classes}
        return {**out, "comparable_to_paper": comparable and "mce" in out}

    full = {c: [e] * 5 for c, e in ALEXNET_ERROR.items()}  # AlexNet's own errors: mCE 100
    text = format_report(result(full, True, 1000))
    assert "mCE 100.0 (ImageNet-C: the 15 corruptions x 5 severities, normalized by AlexNet's errors: " \
           "comparable to the paper)" in text
    text = format_report(result(full, False, 10))  # the same tree made from a 10-class model's data
    assert "AlexNet-normalized mean CE 100.0 over the 15 x 5: not comparable to ImageNet-C mCE" in text
    assert "this model has 10 classes" in text and "comparable to the paper" not in text
    three = {c: [e] * 3 for c, e in ALEXNET_ERROR.items()}  # all 15, 3 severities: no AlexNet-normalized mCE
    assert "mce" not in corruption_errors(three)
    text = format_report(result(three, True, 1000))
    assert "mCE: not computed" in text and "this tree has 15 corruptions x 3 severities" in text
    assert "mCE 1" not in text and "comparable to the paper" not in text
    assert is_imagenet_classifier(None, 1000) and is_imagenet_classifier(imagenet_wnids(), 1000)
    assert not is_imagenet_classifier(None, 10) and not is_imagenet_classifier([str(i) for i in range(1000)], 1000)


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

    import tinymim.evaluate.exportable as exportable
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
    monkeypatch.setattr(exportable, "builtin_teacher", lambda spec: tmp_path / "run" if spec == "builtin:x" else None)
    robustness.knn_evaluate(f"{BUILTIN_PREFIX}x", str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0)
    assert seen[-1] == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def _photo(size: int) -> Image.Image:
    """A smooth picture with edges (noise-free: the corruptions' effects are then what differs)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * xx) * 0.5 + 0.5, yy, (xx > 0.5) * 0.8 + 0.1], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("size", [64, 224])
def test_builtin_corruptions_match_the_reference_definitions(size, monkeypatch):
    """The six tinymim writes itself against imagecorruptions (the reference): the deterministic ones
    pixel for pixel (within rounding), the noises in their strength."""
    import tinymim.evaluate.corruptions as corruptions

    ref = pytest.importorskip("imagecorruptions")
    img = _photo(size)
    x = np.asarray(img, dtype=np.float64)
    for name in corruptions.BUILTIN:
        for severity in (1, 3, 5):
            with monkeypatch.context() as m:
                m.setattr(corruptions, "reference", lambda: None)
                ours = np.asarray(corruptions.corrupt_image(img, name, severity, seed=1), dtype=np.float64)
            np.random.seed(0)
            theirs = ref.corrupt(np.asarray(img), severity=severity, corruption_name=name,
                                 **({"seed": 0} if name == "impulse_noise" else {})).astype(np.float64)
            if name in ("contrast", "pixelate", "jpeg_compression"):
                assert np.abs(ours - theirs).max() <= 1, (name, severity)
            else:  # random: the same mean change per value
                a, b = np.abs(ours - x).mean(), np.abs(theirs - x).mean()
                assert abs(a - b) <= 0.05 * b, (name, severity, a, b)


def test_every_imagenet_c_corruption_is_written_and_seeded():
    import tinymim.evaluate.corruptions as corruptions

    pytest.importorskip("imagecorruptions")
    img = _photo(32)
    assert corruptions.available() == [*corruptions.IMAGENET_C, *corruptions.EXTRA]
    for name in corruptions.available():
        a, b = (np.asarray(corruptions.corrupt_image(img, name, 3, seed=7)) for _ in range(2))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b), name  # the same for the same seed
        if name not in ("brightness",):
            assert not np.array_equal(a, np.asarray(img)), name  # and it does something
    with pytest.raises(TinymimError, match="too small"):
        corruptions.corrupt_image(_photo(16), "fog", 1)


def test_corrupt_counts_and_names_constant_outputs(tmp_path, capsys):
    """A corruption whose output is one colour is counted and named by corruption and severity: contrast of a
    flat source image is flat (a real case, with or without the extra); the clean run says nothing."""
    from tinymim.evaluate.corruptions import degenerate

    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        _photo(32).save(tmp_path / "src" / cls / "photo.png")
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "src" / "b" / "flat.png")
    assert main(["corrupt", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--corruptions", "contrast",
                 "gaussian_noise", "--severities", "1", "5"]) == 0
    out, err = capsys.readouterr()
    assert "wrote 12 images" in out and len(list((tmp_path / "out").rglob("*.png"))) == 12
    assert err.count("\n") == 1 and err.startswith("warning: 2 of 12 written images are constant (one colour)")
    assert "contrast severity 1: 1 constant (e.g. contrast/1/b/flat.png); contrast severity 5: 1 constant" in err
    assert "gaussian_noise" not in err
    flat = np.asarray(Image.open(tmp_path / "out" / "contrast" / "5" / "b" / "flat.png"))
    assert (flat == flat[0, 0]).all()  # the named file is indeed one colour
    assert main(["corrupt", str(tmp_path / "src"), "--output", str(tmp_path / "clean"),
                 "--corruptions", "gaussian_noise", "--severities", "3"]) == 0
    assert capsys.readouterr().err == ""
    assert degenerate(Image.new("RGB", (0, 0))) == "empty" and degenerate(Image.new("L", (4, 4), 7)) == "constant"
    assert degenerate(_photo(8)) is None and degenerate(Image.new("RGB", (4, 4), (0, 0, 0))) == "constant"
    tilted = np.zeros((4, 4, 3), np.uint8)
    tilted[0, 0, 2] = 1  # one value differs in one channel: not constant
    assert degenerate(Image.fromarray(tilted)) is None


def test_the_references_all_black_spatter_is_caught():
    """imagecorruptions' spatter at severity 1 divides 0 by 0 for some seeds and returns an all-black image
    (the case tinymim corrupt once wrote without a word): degenerate() calls it constant, with no warning."""
    import warnings

    import tinymim.evaluate.corruptions as corruptions

    pytest.importorskip("imagecorruptions")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference's RuntimeWarnings stay inside corrupt_image
        black = corruptions.corrupt_image(_photo(32), "spatter", 1, seed=35)
        assert corruptions.degenerate(black) == "constant" and np.asarray(black).max() == 0
        assert corruptions.degenerate(corruptions.corrupt_image(_photo(32), "spatter", 1, seed=36)) is None


def test_without_the_extra_the_rest_say_how_to_get_them(monkeypatch):
    import tinymim.evaluate.corruptions as corruptions

    monkeypatch.setattr(corruptions, "reference", lambda: None)
    assert corruptions.available() == list(corruptions.BUILTIN)
    with pytest.raises(TinymimError, match=r"glass_blur corruption needs.*tinymim\[corruptions\]"):
        corruptions.corrupt_image(_photo(32), "glass_blur", 1)
    with pytest.raises(TinymimError, match="unknown corruption 'nope'"):
        corruptions.corrupt_image(_photo(32), "nope", 1)


def test_mce_over_the_15_against_alexnet():
    errors = {c: [e] * 5 for c, e in ALEXNET_ERROR.items()}  # AlexNet's own errors: every CE is 1
    out = corruption_errors({**errors, "saturate": [0.5] * 5})  # a validation corruption is reported, not in mCE
    assert out["mce"] == pytest.approx(1.0) and set(out["ce"]) == set(ALEXNET_ERROR)
    assert "saturate" in out["per_corruption"]
    half = corruption_errors({c: [e / 2] * 5 for c, e in ALEXNET_ERROR.items()})
    assert half["mce"] == pytest.approx(0.5)
    assert "mce" not in corruption_errors({"fog": [0.5] * 5})


@pytest.mark.slow
def test_eval_imagenet_c_protocol_gives_mce(tmp_path, capsys):
    """`tinymim corrupt` writes all 15 at 5 severities; `tinymim eval --protocol imagenet-c` scores them and
    reports mCE as the mean over the 15 of the model's error / AlexNet's error, checked from its own table."""
    import json

    from test_downstream import tiny_finetune_config

    from tinymim.data.sources import SyntheticImages

    pytest.importorskip("imagecorruptions")
    cfg = tiny_finetune_config(max_steps=2)
    cfg.data.synthetic_classes = 2
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    images = SyntheticImages(size=4, img_size=32, num_classes=2, seed=5)
    for i in range(4):
        img, c = images.load(i)
        (tmp_path / "clean" / f"class_{c}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "clean" / f"class_{c}" / f"{i}.png")
    assert main(["corrupt", str(tmp_path / "clean"), "--output", str(tmp_path / "c"), "--corruptions",
                 *ALEXNET_ERROR]) == 0
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "c"), "--workers", "0",
                 "--protocol", "imagenet-c", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    ce = {c: sum(1 - t / 100 for t in result["top1"][c].values()) / 5 / ALEXNET_ERROR[c] for c in ALEXNET_ERROR}
    assert result["mce"] == pytest.approx(sum(ce.values()) / 15)
    capsys.readouterr()
    (tmp_path / "c" / "fog" / "5").rename(tmp_path / "fog5")  # one severity short: refused in one line
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "c"), "--workers", "0",
                 "--protocol", "imagenet-c"]) == 1
    assert "needs all 15 corruptions at severities 1..5" in capsys.readouterr().err


def test_each_of_the_15_at_severity_3_is_the_reference_itself():
    """With the extra, tinymim's corruption of an image is imagecorruptions' own, seeded the same way."""
    import tinymim.evaluate.corruptions as corruptions

    ref = pytest.importorskip("imagecorruptions")
    img = _photo(64)
    for name in corruptions.IMAGENET_C:
        ours = np.asarray(corruptions.corrupt_image(img, name, 3, seed=11), dtype=np.float64)
        np.random.seed(11)
        theirs = ref.corrupt(np.asarray(img), severity=3, corruption_name=name,
                             **({"seed": 11} if name in ("impulse_noise", "glass_blur") else {}))
        assert np.abs(ours - theirs).mean() < 1, name
