"""Relation maps to look at: teacher vs student, chosen relations, heads and query tokens, as a PNG.

`tinymim visualize RUN_DIR --image IMG --output grid.png` rebuilds the teacher and the student of a
`tinymim distill` run, feeds both the image (resized and center-cropped to the run's size) and draws,
for each (relation, head, query token): the image with the query patch outlined, the teacher's map
over the patch grid and the student's, as heat maps on a shared scale. No plotting library needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tinymim.core.errors import TinymimError
from tinymim.data.images import decode_image
from tinymim.data.pretrain import normalize
from tinymim.method.relations import RELATION_NAMES, relation_logits
from tinymim.tasks import TASKS
from tinymim.tasks.base import load_run_model
from tinymim.tasks.distill import build_distill_task
from tinymim.train.distributed import HeldLogs, seed_everything

# a perceptually ordered dark-blue -> green -> yellow ramp (control points of viridis)
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """H x W values in [0, vmax] -> H x W x 3 uint8."""
    t = np.clip(values / max(vmax, 1e-12), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def load_run(run_dir: str | Path):
    """The DistillTask of a distill run with its student's trained weights (load_trained's: for a run
    still training, its latest checkpoint's); the teacher rebuilt as the run built it."""
    trained = load_run_model(TASKS["distill"], run_dir, latest=True)
    seed_everything(trained.config.train.seed)  # the same models as the run built (a random teacher included)
    task = build_distill_task(trained.config)
    task.student.load_state_dict(trained.model.state_dict())
    return task.eval(), trained.config


def relation_grid(run_dir, image: str | Path, output: str | Path, relations=("qk", "vv"), heads=(0,),
                  queries=None, cell: int = 128) -> Path:
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
            if not 0 <= h < n_heads:
                raise TinymimError(f"head {h} does not exist: the maps have heads 0..{n_heads - 1}")
            for q in queries:
                rows.append((rel, h, q, t_map[h, q, prefix:].reshape(grid_h, grid_w).numpy(),
                             s_map[h, q, prefix:].reshape(grid_h, grid_w).numpy()))

    label_h = 14
    canvas = Image.new("RGB", (3 * cell, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (rel, h, q, tm, sm) in enumerate(rows):
        y = r * (cell + label_h)
        draw.text((2, y), f"{rel.upper()} head {h} query {q}: image | teacher | student", fill="black")
        y += label_h
        panel = img.resize((cell, cell), Image.BICUBIC)
        if q >= prefix:  # outline the query patch
            pr, pc = divmod(q - prefix, grid_w)
            ph, pw = cell / grid_h, cell / grid_w
            ImageDraw.Draw(panel).rectangle([pc * pw, pr * ph, (pc + 1) * pw - 1, (pr + 1) * ph - 1], outline="red")
        canvas.paste(panel, (0, y))
        vmax = float(max(tm.max(), sm.max()))
        for col, m in ((1, tm), (2, sm)):
            heat = Image.fromarray(colorize(m, vmax)).resize((cell, cell), Image.NEAREST)
            canvas.paste(heat, (col * cell, y))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
