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


def test_loss_plot_axes_start_where_the_data_does():
    import matplotlib.pyplot as plt

    from tinymim.pipeline.report import loss_figure

    epochs, losses = [0.1, 0.9, 1.8, 2.0], [0.76, 0.70, 0.60, 0.51]
    fig = loss_figure({"student (distill)": [{"epoch": e, "loss": v} for e, v in zip(epochs, losses)]})
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert 0.05 < x0 <= 0.1 and 2.0 <= x1 < 2.05  # from the first logged epoch, not from 0
    assert 0.49 < y0 <= 0.51 and 0.76 <= y1 < 0.78 and ax.get_yscale() == "linear"  # the losses' range
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "training loss")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["student (distill)"]
    plt.close(fig)
    wide = {"mae": [{"epoch": e, "loss": 1.5 / (e + 1)} for e in range(10)],
            "distill": [{"epoch": e, "loss": 0.8 / (e + 1) ** 2} for e in range(10)]}  # 1.5 down to 0.008
    fig = loss_figure(wide)
    ax = fig.axes[0]
    y0, y1 = ax.get_ylim()
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "training loss (log scale)"
    assert 0.006 < y0 <= 0.008 and 1.5 <= y1 < 2.0
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["mae", "distill"]
    plt.close(fig)


def test_accuracy_plot_curves_and_final_dots_on_axes_around_the_values():
    import matplotlib.pyplot as plt

    from tinymim.pipeline.report import accuracy_figure

    curves = {"student": [{"epoch": e, "val_top1": t} for e, t in ((1, 24.4), (2, 27.6), (3, 29.8), (4, 28.6))],
              "scratch": [{"epoch": e, "val_top1": t} for e, t in ((1, 22.8), (2, 26.4), (3, 29.8), (4, 27.6))]}
    finals = {"student": 28.6, "scratch": 27.6}
    fig = accuracy_figure(curves, finals)
    left, right = fig.axes
    (x0, x1), (y0, y1) = left.get_xlim(), left.get_ylim()
    assert 0.8 < x0 <= 1 and 4 <= x1 < 4.2 and 22 < y0 <= 22.8 and 29.8 <= y1 < 30.6
    assert (left.get_xlabel(), left.get_ylabel()) == ("epoch", "validation top-1 (%)")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["student", "scratch"]
    lo, hi = right.get_xlim()
    assert 26.5 < lo < 27.6 and 28.6 < hi < 29.7  # around the two values: a 1-point gap is visible, not a sliver
    assert [t.get_text() for t in right.get_yticklabels()] == ["student", "scratch"]
    assert right.get_xlabel() == "final top-1 (%)"
    dots = right.collections[-1]  # each run's dot in its curve's colour
    assert [tuple(c) for c in dots.get_facecolors()[:, :3]] == [
        tuple(plt.matplotlib.colors.to_rgb(line.get_color())) for line in left.get_lines()]
    plt.close(fig)
