"""data.jpeg_draft: a JPEG decoded at 1/2, 1/4 or 1/8 scale when its random crop still has at least
img_size pixels a side there, then one resize. Close to the exact view where it applies, the exact
view where it does not."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_device_decode import natural_jpegs

from tinymim.data.pretrain import DataConfig
from tinymim.data.sources import FolderImages
from tinymim.data.view_dataset import PairedViewDataset, draft_scale

# drafted views against exact ones, 0-255 levels (measured: 0.5-0.6 mean, 0.9 worst view on these images;
# benchmarks/speed/jpeg_loader_throughput.py --draft-study: 0.63 mean, 1.18 worst, 49 dB on large photos)
MEAN_LEVELS, WORST_VIEW_LEVELS = 1.0, 2.0


def both(root, img_size):
    src = FolderImages(root)
    return tuple(PairedViewDataset(src, DataConfig(name="folder", root=str(root), img_size=img_size, jpeg_draft=d))
                 for d in (False, True))


def test_draft_scale_never_reduces_a_crop_below_the_output_size():
    assert draft_scale(447, 600, 224) == 1 and draft_scale(448, 448, 224) == 2
    assert draft_scale(900, 2000, 224) == 4 and draft_scale(1792, 1800, 224) == 8 and draft_scale(5000, 5000, 224) == 8
    for h in range(1, 600, 7):
        for w in range(1, 600, 11):
            s = draft_scale(h, w, 64)
            assert (s == 1 or min(h, w) >= 64 * s) and (s == 8 or min(h, w) < 64 * 2 * s)


def test_drafted_views_are_within_a_level_of_the_exact_views(tmp_path):
    root = natural_jpegs(tmp_path, per_class=4)
    Image.fromarray(np.asarray(Image.open(root / "a" / "0.jpg").convert("L"))).save(root / "a" / "gray.jpg", quality=90)
    exact, drafted = both(root, 64)  # 500x375 images: crops of 128+ pixels a side are drafted
    diffs, reduced = [], 0
    for i in range(len(exact)):
        for seed in range(8):
            a, b = exact[(i, seed)], drafted[(i, seed)]
            assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3:] == b[3:]  # the same draws
            d = (a[0].float() - b[0].float()).abs().mean().item()
            diffs.append(d)
            reduced += d > 0
    assert reduced > len(diffs) // 2  # most of these crops are drafted
    mean = sum(diffs) / len(diffs)
    assert max(diffs) < WORST_VIEW_LEVELS and mean < MEAN_LEVELS, (max(diffs), mean)


def test_no_draft_where_the_crop_is_too_small_and_for_other_files(tmp_path):
    root = natural_jpegs(tmp_path, per_class=3)
    Image.new("RGB", (900, 900), (10, 200, 30)).save(root / "a" / "big.png")  # not a JPEG: decoded whole
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")  # unreadable: the same substitute
    exact, drafted = both(root, 224)  # no crop of a 500x375 image has 448 pixels a side
    for i in range(len(exact)):
        for seed in range(4):
            a, b = exact[(i, seed)], drafted[(i, seed)]
            assert torch.equal(a[0], b[0]) and a[3:] == b[3:]


def test_draft_is_a_pretraining_choice():
    from tinymim.core.config import ConfigError
    from tinymim.tasks import load_config

    folder = ["data.name=folder", "data.root=images"]
    assert load_config("distill", None, [*folder, "data.jpeg_draft=true"]).data.jpeg_draft is True
    assert load_config("distill", None, []).data.jpeg_draft is False  # the default: the measured choice
    with pytest.raises(ConfigError, match="data.jpeg_draft applies to pre-training views"):
        load_config("finetune", None, ["data.jpeg_draft=true"])
    # where it would change nothing (no JPEG files, or the GPU decodes them whole) it is refused
    for where in (["data.name=synthetic"], [*folder, "data.decode=device"]):
        with pytest.raises(ConfigError, match="data.jpeg_draft reduces JPEG files Pillow decodes .* would change "
                                              "nothing: leave it off"):
            load_config("distill", None, [*where, "data.jpeg_draft=true"])
