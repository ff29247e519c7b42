"""Pictures a person reads at a glance: the segmentation predictions picture and the pipeline report's plots
(the relation maps of `tinymim visualize`: tests/test_visualize.py)."""
import numpy as np
import pytest
import torch
from test_segmentation import _seg_folder, tiny_segment_overrides

from tinymim.data.segmentation import SegmentationFolder
from tinymim.tasks import load_config
from tinymim.tasks.segment import build_segment_task
from tinymim.tasks.segment_eval import prediction_figure, prediction_picture, spread_picks


def test_spread_picks_cover_the_split():
    assert spread_picks(101, 4) == [0, 33, 67, 100]
    assert spread_picks(3, 4) == [0, 1, 2] and spread_picks(1, 4) == [0] and spread_picks(0, 4) == []


def test_predictions_picture_titled_columns_varied_frames_and_a_class_legend(tmp_path):
    import matplotlib.pyplot as plt

    root = _seg_folder(tmp_path / "data", "val", 10)
    cfg = load_config("segment", None, tiny_segment_overrides(root, "data.class_names=[sky,road,car,tree]"))
    model = build_segment_task(cfg).model
    folder = SegmentationFolder(cfg.data, "val")
    (root / "images" / "val" / "3.png").write_bytes(b"not a picture")  # unreadable: its next frame stands in
    fig, shown = prediction_figure(model, folder, cfg.data, torch.device("cpu"), count=4)
    assert shown == [0, 4, 6, 9]  # spread over the split (0, 3, 6, 9), 3 unreadable
    columns = ("image", "ground truth", "prediction")
    assert [ax.get_label() for ax in fig.axes] == list(columns) * 4
    assert [ax.get_title() for ax in fig.axes[:3]] == list(columns)
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["0", "4", "6", "9"]  # each row names its frame
    palette = np.array([*folder.palette, (0, 0, 0)], dtype=np.uint8)
    for row, i in enumerate(shown):  # the truth panel is the label map in the legend's colours
        label = folder.load(i)[1]
        truth = fig.axes[3 * row + 1].get_images()[0].get_array()
        assert np.array_equal(truth, palette[np.where(label == 255, 4, label)])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["sky", "road", "car", "tree", "ignored (255)"]
    colours = [tuple(np.round(np.array(h.get_facecolor()[:3]) * 255).astype(int)) for h in legend.legend_handles]
    assert colours == [tuple(int(v) for v in c) for c in palette]
    plt.close(fig)
    path = prediction_picture(model, folder, cfg.data, tmp_path / "predictions.png", torch.device("cpu"))
    from PIL import Image

    assert Image.open(path).size[0] > 3 * 240


@pytest.mark.slow  # a 11-class legend on the real CamVid validation split
def test_camvid_predictions_picture_spreads_over_the_split(tmp_path):
    from conftest import SHARED_DATA

    tar = SHARED_DATA / "camvid" / "camvid.tar"
    if not tar.is_file():
        pytest.skip(f"real data not present: {tar}")
    import matplotlib.pyplot as plt

    cfg = load_config("segment", "camvid/segment_micro", [f"data.root={tar}", "model.embed_dim=32", "model.depth=4",
                                                          "model.num_heads=2", "blocks=[1,2,3,4]"])
    folder = SegmentationFolder(cfg.data, "val")
    fig, shown = prediction_figure(build_segment_task(cfg).model, folder, cfg.data, torch.device("cpu"))
    assert shown == spread_picks(len(folder), 4) and len(folder) == 101
    assert len({ax.get_ylabel() for ax in fig.axes[::3]}) == 4
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*cfg.data.class_names, "ignored (11)"]
    plt.close(fig)
