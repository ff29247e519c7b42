"""Evaluation a user can see and size: a progress bar during every evaluation of fine-tuning, linear
probing and segmentation; eval_limit scores N images evenly spaced over the split and the metrics say
"N of M"; sliding-window inference runs its windows in batches, with the logits of one at a time."""
import pytest
import torch
from PIL import Image
from test_segmentation import _seg_folder, tiny_segment_overrides

import tinymim.tasks as tasks
from tinymim.core.config import ConfigError
from tinymim.core.rundir import RunDir

MICRO = ["data.name=folder", "model.name=vit_custom", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
         "model.num_heads=2", "data.img_size=32", "data.num_workers=0", "data.eval_crop_pct=1.0", "train.batch_size=4",
         "train.epochs=1", "train.precision=fp32", "train.warmup_epochs=0", "train.log_every=1"]


def class_folders(root, per_class: int):
    for c, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), colour).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture
def evaluated(monkeypatch):
    """The indices of the evaluation split each evaluation read, in order (data read in this process)."""
    from tinymim.data.classification import ClassifyDataset
    from tinymim.data.segmentation import SegmentationDataset

    seen = []
    for cls in (ClassifyDataset, SegmentationDataset):
        original = cls.__getitem__

        def spy(self, item, original=original):
            if isinstance(item, int):  # evaluation reads by index, training by (index, seed)
                seen.append(item)
            return original(self, item)

        monkeypatch.setattr(cls, "__getitem__", spy)
    return seen


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_a_classifier_evaluates_n_evenly_spaced_images_of_m_under_a_bar(tmp_path, capsys, evaluated, task):
    train, val = class_folders(tmp_path / "train", 4), class_folders(tmp_path / "val", 10)
    extra = ["mixup=0", "cutmix=0", "data.auto_augment=null", "data.reprob=0"] if task == "finetune" else []
    cfg = tasks.load_config(task, None, [*MICRO, *extra, f"data.root={train}", f"data.val_root={val}", "eval_limit=5",
                                         "train.progress=true"])
    tasks.run(task, cfg, tmp_path / "run")
    # 5 of the 20 validation images, spread over both classes' folders: indices 0, 5, 10, 14, 19
    assert evaluated == [0, 5, 10, 14, 19]
    record = [r for r in RunDir(tmp_path / "run").read_metrics() if "val_top1" in r][-1]
    assert (record["val_images"], record["val_of_images"]) == (5, 20)
    assert round(record["val_top1"] * 5 / 100) == record["val_top1"] * 5 / 100  # a share of 5 images
    err = capsys.readouterr().err
    assert f"{task} eval:" in err and "/5 [" in err  # the evaluation's own bar, over its 5 images


def test_without_a_limit_the_whole_split_is_scored_and_no_count_is_added(tmp_path, evaluated):
    train, val = class_folders(tmp_path / "train", 4), class_folders(tmp_path / "val", 3)
    cfg = tasks.load_config("finetune", None, [*MICRO, "mixup=0", "cutmix=0", "data.auto_augment=null",
                                               "data.reprob=0", f"data.root={train}", f"data.val_root={val}",
                                               "eval_limit=6", "train.progress=false"])
    tasks.run("finetune", cfg, tmp_path / "run")
    assert evaluated == list(range(6))  # a limit the split does not exceed: every image
    record = [r for r in RunDir(tmp_path / "run").read_metrics() if "val_top1" in r][-1]
    assert "val_images" not in record and "val_of_images" not in record


def test_segmentation_validates_n_of_m_images_under_a_bar(tmp_path, capsys, evaluated):
    root = _seg_folder(tmp_path / "data", "train", 4)
    _seg_folder(root, "val", 6, seed=1)
    cfg = tasks.load_config("segment", None, tiny_segment_overrides(root, "train.max_steps=1", "eval_limit=3",
                                                                     "train.progress=true"))
    tasks.run("segment", cfg, tmp_path / "run")
    validation = [r for r in RunDir(tmp_path / "run").read_metrics() if "val_mIoU" in r]
    assert len(validation) == 1 and (validation[0]["val_images"], validation[0]["val_of_images"]) == (3, 6)
    assert evaluated[:3] == [0, 2, 5]  # then the picture of the predictions reads its own
    err = capsys.readouterr().err
    assert "segment eval:" in err and "/3 [" in err


@pytest.mark.parametrize("task", ["finetune", "linprobe", "segment"])
def test_an_eval_limit_below_one_is_refused_in_one_line(task):
    with pytest.raises(ConfigError, match=r"eval_limit must be 1 or more \(or null: the whole split\), got 0") as e:
        tasks.load_config(task, None, ["eval_limit=0"])
    assert "\n" not in str(e.value)


def test_limit_split_shares_the_picks_among_processes():
    import torch.utils.data as tud

    from tinymim.tasks.segment_eval import limit_split

    split = list(range(100))
    shards = [limit_split(tud.DataLoader(tud.Subset(split, range(r, 100, 3)), batch_size=2), 7, r, 3)
              for r in range(3)]
    picked = sorted(i for s in shards for i in s.dataset.indices)
    assert picked == [0, 16, 33, 50, 66, 82, 99]  # 7 evenly spaced over 0..99, each taken once
    assert all(s.batch_size == 2 for s in shards)


def one_window_at_a_time(model, img, num_classes, window, stride):
    """mmseg's slide_inference as written there: every window through the model on its own, logits summed
    where windows overlap and divided by the count."""
    b, _, h, w = img.shape
    out = torch.zeros(b, num_classes, h, w, dtype=torch.float64)
    count = torch.zeros(1, 1, h, w, dtype=torch.float64)
    ys = sorted({min(y, max(h - window, 0)) for y in range(0, max(h - window, 0) + stride, stride)})
    xs = sorted({min(x, max(w - window, 0)) for x in range(0, max(w - window, 0) + stride, stride)})
    for y in ys:
        for x in xs:
            out[:, :, y:y + window, x:x + window] += model(img[:, :, y:y + window, x:x + window]).double()
            count[:, :, y:y + window, x:x + window] += 1
    return out / count


@pytest.mark.parametrize("max_batch", [1, 4, 64])
def test_batched_windows_give_the_logits_of_one_window_at_a_time(max_batch):
    from tinymim.models.segmenter import Segmenter, slide_inference
    from tinymim.models.vit import ModelConfig, create_vit

    torch.manual_seed(0)
    vit = create_vit(ModelConfig(name="vit_custom", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2))
    model = Segmenter(vit, 5, blocks=(1, 2, 3, 4), channels=16, aux_channels=8).eval()
    with torch.no_grad():
        for m in model.modules():  # BatchNorm statistics that are not the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        img = torch.randn(2, 3, 45, 70)  # 2 x 3 windows of 32 at stride 21, the last ones moved back
        expected = one_window_at_a_time(model, img, 5, 32, 21)
        got = slide_inference(model, img, 5, 32, 21, max_batch=max_batch)
    assert got.shape == (2, 5, 45, 70)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_images_of_one_size_are_scored_together_with_the_metrics_of_one_at_a_time(tmp_path):
    """data.eval_batch_size stacks images of one size (windows and all) and gives the confusion matrix of
    the release's one image at a time; images of different sizes still go one by one."""
    from test_segmentation import _pairs

    from tinymim.tasks.segment_eval import eval_loader, evaluate_segmenter

    root = _seg_folder(tmp_path / "data", "val", 5, seed=2)
    cfg = tasks.load_config("segment", None, tiny_segment_overrides(root, "model.img_size=32"))
    torch.manual_seed(0)
    model = tasks.build_task("segment", cfg).model
    one = evaluate_segmenter(model, eval_loader(cfg.data, "val"), cfg.data, torch.device("cpu"))
    cfg.data.eval_batch_size = 3
    batched = eval_loader(cfg.data, "val")
    assert [len(b[0]["image"]) for b in batched] == [3, 2]
    together = evaluate_segmenter(model, batched, cfg.data, torch.device("cpu"))
    # the same predictions (a batched product may round a last bit differently: a near-tie pixel may flip)
    assert {k: v for k, v in together.items() if k != "per_class_iou"} == pytest.approx(
        {k: v for k, v in one.items() if k != "per_class_iou"}, abs=0.1)
    assert together["per_class_iou"] == pytest.approx(one["per_class_iou"], abs=0.1)
    mixed = _pairs(tmp_path / "mixed", sizes=((16, 12), (20, 16)))
    cfg.data.root = str(mixed)
    cfg.data.num_classes = 3
    (batch,) = eval_loader(cfg.data, "train")
    assert [tuple(b["label"].shape) for b in batch] == [(1, 12, 16), (1, 16, 20)]


def test_knn_shows_a_bar_over_the_bank_and_the_queries_and_scores_as_without(capsys):
    from torch.utils.data import DataLoader

    from tinymim.train.knn import knn_loader_accuracy

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.arange(24) % 3
    items = [{"image": x[i], "label": y[i]} for i in range(24)]
    bank, queries = DataLoader(items[:16], batch_size=4), DataLoader(items[16:], batch_size=4)
    shown = knn_loader_accuracy(torch.nn.Identity(), bank, queries, torch.device("cpu"), k=3)
    err = capsys.readouterr().err
    assert "k-NN bank" in err and "/16 " in err and "k-NN queries" in err and "/8 " in err  # each over its images
    quiet = knn_loader_accuracy(torch.nn.Identity(), bank, queries, torch.device("cpu"), k=3, progress=False)
    assert capsys.readouterr().err == "" and quiet == shown and shown["bank"] == 16
