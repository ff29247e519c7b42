"""Relation maps to look at: teacher vs student, chosen relations, heads and query tokens, as a PNG.

`tinymim visualize RUN_DIR --image IMG --output maps.png` rebuilds the teacher and the student of a
`tinymim distill` run, feeds both the image (resized and center-cropped to the run's size) and draws one
row per (relation, head, query token): the image with the query patch outlined | the teacher's map over
the patch grid | a gap | the student's map, the two maps on one colour scale with its colorbar beside them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinymim.core.errors import TinymimError
from tinymim.data.images import decode_image
from tinymim.data.pretrain import normalize
from tinymim.method.relations import RELATION_NAMES, relation_logits
from tinymim.tasks import TASKS
from tinymim.tasks.base import load_run_model
from tinymim.tasks.distill import build_distill_task
from tinymim.train.distributed import HeldLogs, seed_everything

# the columns of a row: image | teacher | gap | student | colorbar (relative widths)
COLUMNS = ("image", "teacher", "gap", "student", "colorbar")
WIDTHS = (1.0, 1.0, 0.18, 1.0, 0.07)


def load_run(run_dir: str | Path):
    """The DistillTask of a distill run with its student's trained weights (load_trained's: for a run
    still training, its latest checkpoint's); the teacher rebuilt as the run built it."""
    trained = load_run_model(TASKS["distill"], run_dir, latest=True)
    seed_everything(trained.config.train.seed)  # the same models as the run built (a random teacher included)
    task = build_distill_task(trained.config)
    task.student.load_state_dict(trained.model.state_dict())
    return task.eval(), trained.config


def relation_maps(run_dir, image: str | Path, relations=("qk", "vv"), heads=(0,), queries=None):
    """(the cropped image, the rows, the patch grid, the number of prefix tokens, the teacher's block) of a
    distill run: one row (relation, head, query, teacher map, student map) per combination, each map a
    softmax over the patch grid."""
    unknown = [r for r in relations if r not in RELATION_NAMES]
    if unknown:
        raise TinymimError(f"unknown relation(s) {', '.join(unknown)}; choose from {', '.join(RELATION_NAMES)}")
    try:
        img = decode_image(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TinymimError(f"cannot read the image {image}: too many pixels, a possible decompression bomb "
                           f"({str(e).rstrip('.')}); pass a downscaled copy") from None
    except Exception as e:  # noqa: BLE001 - missing, not an image, broken (Pillow raises many kinds), no RGB
        raise TinymimError(f"cannot read the image {image}: {getattr(e, 'strerror', None) or e}") from None
    with HeldLogs(replay=False):  # the rebuilt run's setup notes are not this command's business
        task, cfg = load_run(run_dir)
    size = cfg.data.img_size
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = normalize(x, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        t_qkv, s_qkv = task.relation_qkv(x)
    grid_h, grid_w = task.student.patch_embed.grid_size
    prefix = task.student.num_prefix_tokens
    n_heads = t_qkv[0].shape[1]
    queries = list(queries) if queries else [prefix + (grid_h // 2) * grid_w + grid_w // 2]  # the center patch
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise TinymimError(f"head {bad[0]} does not exist: the maps have heads 0..{n_heads - 1}")
    bad = [q for q in queries if not 0 <= q < prefix + grid_h * grid_w]
    if bad:
        raise TinymimError(f"query token {bad[0]} does not exist: tokens are 0..{prefix + grid_h * grid_w - 1}")
    rows = []
    for rel in relations:
        t_map = torch.softmax(relation_logits(t_qkv, rel)[0].float(), -1)
        s_map = torch.softmax(relation_logits(s_qkv, rel)[0].float(), -1)
        for h in heads:
            for q in queries:
                rows.append((rel, h, q, t_map[h, q, prefix:].reshape(grid_h, grid_w).numpy(),
                             s_map[h, q, prefix:].reshape(grid_h, grid_w).numpy()))
    return img, rows, (grid_h, grid_w), prefix, cfg.teacher.target_block


def relation_figure(run_dir, image: str | Path, relations=("qk", "vv"), heads=(0,), queries=None, cell: int = 128):
    """The matplotlib figure of relation_grid: a row per (relation, head, query) of COLUMNS, titled on top,
    the row's relation, head and query on its left, the teacher and student maps sharing the row's colorbar."""
    import matplotlib  # lazy: plotting is this command's business only; Agg is chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img, rows, (grid_h, grid_w), prefix, teacher_block = relation_maps(run_dir, image, relations, heads, queries)
    dpi, inch = 100, cell / 100
    fig = plt.figure(figsize=(inch * (sum(WIDTHS) + 0.9), inch * len(rows) + 0.55), dpi=dpi)
    # fixed margins in inches (the row labels on the left, the column titles on top), not fractions of the figure
    width, height = fig.get_size_inches()
    spec = fig.add_gridspec(len(rows), len(COLUMNS), width_ratios=WIDTHS, wspace=0.06, hspace=0.08,
                            left=0.42 / width, right=1 - 0.48 / width, top=1 - 0.5 / height, bottom=0.05 / height)
    titles = {"image": "image\n(query outlined)", "teacher": f"teacher\nblock {teacher_block}",
              "student": "student\nlast block"}
    for r, (rel, h, q, t_map, s_map) in enumerate(rows):
        vmax = float(max(t_map.max(), s_map.max()))
        image_ax = fig.add_subplot(spec[r, 0])
        image_ax.imshow(np.asarray(img), extent=(0, grid_w, grid_h, 0), interpolation="bilinear")
        token = f"query {q}" + (" (prefix token)" if q < prefix else "")
        image_ax.set_ylabel(f"{rel.upper()}, head {h}\n{token}", fontsize=8)
        shown = None
        for name, values in (("teacher", t_map), ("student", s_map)):
            ax = fig.add_subplot(spec[r, COLUMNS.index(name)])
            shown = ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax, extent=(0, grid_w, grid_h, 0),
                              interpolation="nearest")
            ax.set_label(name)
            if r == 0:
                ax.set_title(titles[name], fontsize=9)
        if r == 0:
            image_ax.set_title(titles["image"], fontsize=9)
        image_ax.set_label("image")
        for ax in fig.axes[-3:]:
            ax.set_xticks([])
            ax.set_yticks([])
            if q >= prefix:  # the query patch, outlined on the image and both maps
                pr, pc = divmod(q - prefix, grid_w)
                ax.add_patch(Rectangle((pc, pr), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
        bar = fig.colorbar(shown, cax=fig.add_subplot(spec[r, COLUMNS.index("colorbar")]))
        bar.ax.set_label("colorbar")
        bar.ax.tick_params(labelsize=7)
        if r == 0:
            bar.ax.set_title("weight", fontsize=7, loc="left")
    return fig


def relation_grid(run_dir, image: str | Path, output: str | Path, relations=("qk", "vv"), heads=(0,),
                  queries=None, cell: int = 128) -> Path:
    """Write relation_figure as a PNG at `output` (its folder made); returns the path."""
    import matplotlib.pyplot as plt

    fig = relation_figure(run_dir, image, relations, heads, queries, cell)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=fig.dpi)
    finally:
        plt.close(fig)
    return out
