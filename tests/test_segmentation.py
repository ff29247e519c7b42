"""Segmentation pieces: metrics against hand counts, sliding-window inference, the pyramid's strides, and
the UperNet head against a plain restatement."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_vit

from tinymim.models.segmenter import (
    FCNHead,
    Segmenter,
    UperHead,
    ViTPyramid,
    confusion_matrix,
    segmentation_metrics,
    slide_inference,
)
from tinymim.models.vit import create_vit

IGNORE = 255


def test_metrics_equal_hand_counts_with_ignored_pixels():
    # 3 classes; label 255 ignored. Pixels (label -> prediction):
    label = torch.tensor([[0, 0, 1, 1], [1, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm = confusion_matrix(pred, label, 3, IGNORE)
    # class 0: true 2 (pred 0, 1) ; class 1: true 3 (pred 1, 1, 0) ; class 2: true 1 (pred 2)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    m = segmentation_metrics(cm, ["a", "b", "c"])
    iou = {"a": 1 / (2 + 2 - 1), "b": 2 / (3 + 3 - 2), "c": 1 / (1 + 1 - 1)}  # tp / (true + predicted - tp)
    assert m["per_class_iou"] == pytest.approx({k: 100 * v for k, v in iou.items()})
    assert m["mIoU"] == pytest.approx(100 * sum(iou.values()) / 3)
    assert m["mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 1) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 6)  # the two ignored pixels count nowhere


def test_a_class_absent_everywhere_is_left_out_of_the_means():
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    m = segmentation_metrics(confusion_matrix(pred, label, 3, IGNORE))
    assert math.isnan(m["per_class_iou"]["2"])
    assert m["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_pyramid_strides_are_4_8_16_32_for_patch_16():
    vit = create_vit(tiny_vit(dim=32, depth=4, heads=2, patch=16, img=64))
    feats = ViTPyramid(vit, blocks=(1, 2, 3, 4))(torch.randn(2, 3, 64, 64))
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    assert all(f.shape[1] == 32 for f in feats)


def test_sliding_window_on_one_window_equals_whole_image():
    vit = create_vit(tiny_vit(dim=32, depth=4, heads=2, patch=8, img=32))
    model = Segmenter(vit, num_classes=5, blocks=(1, 2, 3, 4), channels=16, aux_channels=8).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slide_inference(model, x, 5, window=32, stride=21), model(x))


def test_sliding_window_averages_overlaps_like_mmseg():
    """A 'model' that returns the mean of its window everywhere: every pixel's result is the average of the
    window means covering it, counted by hand for a 1 x 6 image, window 4, stride 2 (windows 0-4, 2-6)."""
    class WindowMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)

    x = torch.arange(6.0).view(1, 1, 1, 6)
    out = slide_inference(WindowMean(), x, 1, window=4, stride=2)
    first, second = x[..., :4].mean(), x[..., 2:].mean()
    expected = torch.tensor([first, first, (first + second) / 2, (first + second) / 2, second, second])
    assert torch.allclose(out.flatten(), expected)


def test_uper_head_matches_a_plain_restatement():
    """The head's forward, restated step by step with the same modules (PPM on the top level, top-down
    sums, 3x3 convs, upsample and fuse)."""
    torch.manual_seed(0)
    head = UperHead(8, 6, 3).eval()
    feats = [torch.randn(2, 8, s, s) for s in (16, 8, 4, 2)]

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        top = feats[3]
        psp = head.bottleneck(torch.cat([top] + [up(b(top), top.shape[-2:]) for b in head.ppm], 1))
        l2 = head.lateral[2](feats[2]) + up(psp, (4, 4))
        l1 = head.lateral[1](feats[1]) + up(l2, (8, 8))
        l0 = head.lateral[0](feats[0]) + up(l1, (16, 16))
        o = [head.fpn[0](l0), head.fpn[1](l1), head.fpn[2](l2), psp]
        fused = head.fuse(torch.cat([o[0]] + [up(t, (16, 16)) for t in o[1:]], 1))
        assert torch.allclose(head(feats), head.classifier(fused), atol=1e-6)
        aux = FCNHead(8, 4, 3).eval()
        assert aux(feats).shape == (2, 3, 4, 4)


def test_segmenter_trains_with_an_auxiliary_head():
    vit = create_vit(tiny_vit(dim=32, depth=4, heads=2, patch=8, img=32))
    model = Segmenter(vit, num_classes=4, blocks=(1, 2, 3, 4), channels=16, aux_channels=8).train()
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == aux.shape == (2, 4, 32, 32)
    loss = F.cross_entropy(logits, torch.randint(0, 4, (2, 32, 32))) + 0.4 * F.cross_entropy(
        aux, torch.randint(0, 4, (2, 32, 32)))
    loss.backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None


def _pairs(root, split="train", sizes=((16, 12),), label_values=(0, 1, 2)):
    import numpy as np
    from PIL import Image

    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * i, 20, 30)).save(root / "images" / split / f"img{i}.jpg")
        label = np.resize(np.array(label_values, dtype=np.uint8), (h, w))
        Image.fromarray(label).save(root / "annotations" / split / f"img{i}.png")
    return root


def test_segmentation_folder_reads_pairs_and_reduces_the_zero_label(tmp_path):
    from tinymim.data.segmentation import SegmentationDataConfig, SegmentationFolder

    root = _pairs(tmp_path, label_values=(0, 1, 3))
    image, label = SegmentationFolder(SegmentationDataConfig(root=str(root), num_classes=4), "train").load(0)
    assert image.size == (16, 12) and label.shape == (12, 16) and set(label.flatten().tolist()) == {0, 1, 3}
    ade = SegmentationDataConfig(root=str(root), num_classes=3, reduce_zero_label=True)
    _, reduced = SegmentationFolder(ade, "train").load(0)
    assert set(reduced.flatten().tolist()) == {255, 0, 2}  # 0 ignored, 1 -> 0, 3 -> 2


@pytest.mark.parametrize("fault", ["image without a label", "label map of another size", "label outside the classes"])
def test_bad_segmentation_data_is_one_line_naming_the_file(tmp_path, fault):
    from tinymim.data.pretrain import DataError
    from tinymim.data.segmentation import SegmentationDataConfig, SegmentationFolder

    root = _pairs(tmp_path, label_values=(0, 1, 11))  # CamVid: 11 classes 0..10, 11 ignored
    cfg = SegmentationDataConfig(root=str(root), num_classes=11, ignore_index=11)
    if fault == "image without a label":
        (root / "annotations" / "train" / "img0.png").unlink()
        with pytest.raises(DataError, match=r"img0\.jpg has no label map") as e:
            SegmentationFolder(cfg, "train")
    else:
        from PIL import Image

        if fault == "label map of another size":
            Image.new("L", (8, 8)).save(root / "annotations" / "train" / "img0.png")
            match = r"img0\.png is 8x8, its image img0\.jpg 16x12"
        else:
            Image.new("L", (16, 12), 12).save(root / "annotations" / "train" / "img0.png")
            match = r"img0\.png holds label value\(s\) 12, neither a class \(0\.\.10\) nor the ignore label 11"
        with pytest.raises(DataError, match=match) as e:
            SegmentationFolder(cfg, "train").load(0)
    assert "\n" not in str(e.value)
    _, label = SegmentationFolder(SegmentationDataConfig(root=str(_pairs(tmp_path / "ok", label_values=(0, 11))),
                                                         num_classes=11, ignore_index=11), "train").load(0)
    assert set(label.flatten().tolist()) == {0, 11}  # the ignore label itself is fine


@pytest.mark.slow  # the real CamVid
def test_camvid_reads_with_its_classes_and_ignore_label(tmp_path):
    """The real ../shared/data/camvid (SegNet split): every validation pair loads, labels within 0..11."""
    import tarfile

    import numpy as np
    from conftest import SHARED_DATA

    from tinymim.data.segmentation import CAMVID_CLASSES, SegmentationDataConfig, SegmentationFolder

    tar = SHARED_DATA / "camvid" / "camvid.tar"
    if not tar.is_file():
        pytest.skip(f"real data not present: {tar}")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, members=[m for m in t.getmembers() if "/val/" in m.name or m.isdir()], filter="data")
    cfg = SegmentationDataConfig(root=str(tmp_path / "camvid"), num_classes=11, ignore_index=11,
                                 class_names=CAMVID_CLASSES)
    folder = SegmentationFolder(cfg, "val")
    assert len(folder) == 101 and folder.classes[3] == "road"
    seen = set()
    for i in range(len(folder)):
        image, label = folder.load(i)
        seen |= set(np.unique(label).tolist())
    assert image.size == (480, 360) and seen == set(range(12))


def _seg_folder(root, split, n, size=(48, 36), classes=4, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = rng.integers(0, classes, (size[1] // 4, size[0] // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        label[:2] = 255  # an ignored band
        c = label.astype(np.int64) % 8
        image = np.stack([c * 30, 255 - c * 30, c * 20], -1) + rng.integers(0, 20, (*label.shape, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
        Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    return root


@pytest.mark.slow  # a subprocess, then torchrun
def test_two_process_evaluation_sums_the_same_confusion_matrix(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TORCHRUN, subprocess_env

    root = _seg_folder(tmp_path / "data", "val", 5)
    worker = Path(__file__).resolve().parent / "seg_eval_worker.py"
    env = subprocess_env()
    one = subprocess.run([sys.executable, str(worker), str(root)], env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*TORCHRUN, str(worker), str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    read = [json.loads(next(line for line in r.stdout.splitlines() if line.startswith("METRICS "))[8:])
            for r in (one, two)]
    assert read[0] == read[1] and read[0]["aAcc"] > 0  # the same sums: every metric equal, exactly


def tiny_segment_overrides(root, *extra: str) -> list[str]:
    """A 4-block, 32-wide segmenter on _seg_folder data (4 classes, 32-pixel crops), batch 4, fp32."""
    return ["model.name=vit_custom", "model.patch_size=8", "model.embed_dim=32", "model.depth=4",
            "model.num_heads=2", "blocks=[1,2,3,4]", "channels=16", "aux_channels=8", f"data.root={root}",
            "data.num_classes=4", "data.scale=[48,36]", "data.crop_size=32", "data.eval_stride=21",
            "data.num_workers=0", "train.batch_size=4", "train.warmup_steps=1", "train.precision=fp32",
            "train.progress=false", "train.log_every=1", *extra]


def test_segment_task_trains_evaluates_and_records_classes(tmp_path):
    from tinymim.core.rundir import RunDir
    from tinymim.tasks import load_config, run

    root = _seg_folder(tmp_path / "data", "train", 8)
    _seg_folder(root, "val", 2, seed=1)
    cfg = load_config("segment", None, tiny_segment_overrides(root, "data.class_names=[a,b,c,d]", "train.max_steps=4"))
    last = run("segment", cfg, tmp_path / "run")
    assert last["step"] == 4 and 0 <= last["val_mIoU"] <= 100 and "loss_aux" in last
    out = RunDir(tmp_path / "run")
    assert out.read_classes() == ["a", "b", "c", "d"] and out.weights().name == "segmenter.safetensors"
    assert out.task() == "segment"
    from PIL import Image

    picture = Image.open(tmp_path / "run" / "predictions.png")  # image | ground truth | prediction, 2 rows
    assert picture.width > 3 * 240 and picture.height > 2 * 180  # (its layout: tests/test_pictures.py)
    from tinymim.cli import main

    assert main(["eval", str(tmp_path / "run"), "--data", str(root), "--split", "val", "--workers", "0",
                 "--json", str(tmp_path / "eval.json")]) == 0
    import json

    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 2 and set(result["per_class_iou"]) == {"a", "b", "c", "d"}
    assert result["mIoU"] == pytest.approx(last["val_mIoU"])  # the same evaluation as the run's own


def test_eval_every_validates_every_n_epochs_and_at_the_end(tmp_path):
    from tinymim.core.files import read_jsonl
    from tinymim.tasks import load_config, run

    root = _seg_folder(tmp_path / "data", "train", 8)  # batch 4: 2 steps an epoch, 5 epochs
    _seg_folder(root, "val", 2, seed=1)
    cfg = load_config("segment", None, tiny_segment_overrides(root, "train.max_steps=10", "eval_every=3"))
    run("segment", cfg, tmp_path / "run")
    evaluated = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_mIoU" in r]
    assert evaluated == [6, 10]  # epoch 3, then the last epoch (5)


@pytest.mark.parametrize("size,channels,decay", [("tiny", 768, 0.8), ("small", 768, 0.75), ("base", 768, 0.75),
                                                 ("tiny_star", 768, 0.8)])
def test_ade20k_recipes_have_the_papers_settings(size, channels, decay):
    from tinymim.tasks import load_config

    cfg = load_config("segment", f"ade20k/segment_vit_{size}")
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.data.crop_size, cfg.train.lr) == (160_000, 16, 512, 1e-4)
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.betas, cfg.train.weight_decay) == (
        "poly_mmcv", 1500, [0.9, 0.999], 0.05)
    assert (cfg.layer_decay, cfg.channels, cfg.aux_channels, cfg.aux_weight) == (decay, channels, 256, 0.4)
    assert (cfg.data.num_classes, cfg.data.reduce_zero_label, cfg.data.eval_stride) == (150, True, 341)
    assert cfg.blocks == [4, 6, 8, 12] and cfg.model.drop_path_rate == 0.1
    assert (cfg.rel_pos_bias, cfg.layer_scale, cfg.sync_bn, cfg.loss_average, cfg.head_init, cfg.data.hue_delta) == (
        True, 1.0, "auto", "all_pixels", "mmseg", 18)  # the release's backbone and mmseg 0.11's defaults
    from tinymim.data.segmentation import ADE20K_CLASSES

    assert cfg.data.class_names == ADE20K_CLASSES and len(set(ADE20K_CLASSES)) == 150


def test_a_pipeline_can_end_in_segmentation(tmp_path):
    """A `segment` stage takes an earlier stage as its init, with that model's architecture."""
    from tinymim.core.config import from_dict
    from tinymim.pipeline.planning import PipelineConfig, plan

    cfg = from_dict(PipelineConfig, {"stages": [
        {"name": "student", "task": "distill", "config": "cifar10/distill_micro"},
        {"name": "seg", "task": "segment", "config": "camvid/segment_micro", "init": "student",
         "overrides": ["blocks=[1,2,3,4]"]}]})
    planned = {stage.name: config for stage, _, config in plan(cfg, tmp_path)}
    seg = planned["seg"]
    assert seg["init"] == str(tmp_path / "student")
    assert (seg["model"]["embed_dim"], seg["model"]["depth"], seg["model"]["num_heads"]) == (64, 4, 2)
