"""Can the loader feed a GPU? ImageNet-like JPEGs through tinymim's decode paths.

Generates --images JPEGs of about 500x375 at quality 90 (a smooth random field plus grain, so they
compress like photographs, not like noise or flat colour), in two class folders, then measures for
each path the paired views ready on the device per second (224px crops, flip, jitter, normalized):
- pillow:        `data.decode=cpu`, Pillow decodes, crops and resizes in --workers loader processes;
- pillow+draft:  the same with `data.jpeg_draft=true` (a JPEG decoded at 1/2, 1/4 or 1/8 scale when its
                 crop keeps at least 224 pixels a side there);
- device:        `data.decode=device`, workers read the file and its header, the device decodes the batch
                 (torchvision decode_jpeg, nvJPEG on CUDA), crops, resizes and flips, between batches;
- device+prefetch: the same, the next batch decoded in tinymim's prefetch thread (on CUDA on a side
                 stream) while the current one is handed over (`data.prefetch=1`).
Each path runs alone; in training the device paths share the GPU with the step. With --step-rate
(images/s of the training step, e.g. from gpu_throughput.py's JSON) it says whether each keeps up.
Every rate is also given per loader core (views/s / workers).

--draft-study measures Pillow on one core, no loader (per-core views/s, the fraction of views
drafted, and how far the drafted views are from the exact ones: mean absolute difference in 0-255
levels, largest per-view mean, PSNR) on two generated sets: the ImageNet-like one and a large-photo
one (1200-1600 x 900-1200, where the crop is usually large enough to draft).

    python benchmarks/speed/jpeg_loader_throughput.py [--images 4096] [--workers 16] [--batch 256]
        [--device cuda] [--step-rate IMG_PER_S | --step-json gpu_throughput.json] [--dir DIR [--keep]]
        [--paths pillow pillow+draft device device+prefetch] [--draft-study [--study-images 64]]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_LIKE = ((450, 551), (330, 421))  # width and height ranges of the generated images
LARGE = ((1200, 1601), (900, 1201))
PATHS = {"pillow": {"decode": "cpu"}, "pillow+draft": {"decode": "cpu", "jpeg_draft": True},
         "device": {"decode": "device", "prefetch": 0}, "device+prefetch": {"decode": "device", "prefetch": 1}}


def make_jpeg(args) -> int:
    path, seed, *size = args
    (w0, w1), (h0, h1) = size[0] if size else IMAGENET_LIKE
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(w0, w1)), int(rng.integers(h0, h1))
    small = Image.fromarray(rng.uniform(0, 255, (int(rng.integers(6, 16)), int(rng.integers(8, 20)), 3))
                            .astype(np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.float32)
    arr += rng.normal(0, 10, arr.shape)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def generate(root: Path, n: int, workers: int, size=IMAGENET_LIKE) -> float:
    for c in ("class_a", "class_b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    jobs = [(root / ("class_a" if i % 2 else "class_b") / f"{i:06d}.jpg", i, size) for i in range(n)]
    with multiprocessing.Pool(max(1, workers)) as pool:
        sizes = pool.map(make_jpeg, jobs, chunksize=32)
    return sum(sizes) / len(sizes)


def views_per_second(root: Path, path: str, workers: int, batch: int, device: torch.device, epochs: int,
                     img_size: int = 224) -> float:
    from tinymim.data.loader import build_loader
    from tinymim.data.prefetch import Prefetcher
    from tinymim.data.pretrain import DataConfig, paired_views, with_device_images

    cfg = DataConfig(name="folder", root=str(root), img_size=img_size, num_workers=workers, **PATHS[path])
    prefetch = cfg.prefetch if cfg.decode == "device" else 0
    loader, sampler = build_loader(cfg, batch, pin_memory=device.type == "cuda" and not prefetch)
    images, t0 = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up (worker start, nvJPEG handles, page cache)
        sampler.set_epoch(epoch)
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batches = iter(loader)
        if prefetch:
            batches = Prefetcher(batches, lambda b: with_device_images(b, cfg, device), prefetch, device)
        try:
            for b in batches:
                teacher, student = paired_views(b, cfg, device)
                if epoch:
                    images += teacher.shape[0]
        finally:
            if prefetch:
                batches.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def draft_study(root: Path, img_size: int, images: int, seeds: int = 4) -> dict:
    """Pillow on one core, exact vs drafted views of the same samples: per-core views/s (median of 3
    passes, interleaved), the fraction drafted, and the drafted views' distance from the exact ones."""
    from tinymim.data.pretrain import DataConfig
    from tinymim.data.sources import FolderImages
    from tinymim.data.view_dataset import PairedViewDataset, draft_scale

    src = FolderImages(root)
    items = [(i, 1000 * s + i) for s in range(seeds) for i in range(min(images, len(src)))]
    sets = {name: PairedViewDataset(src, DataConfig(name="folder", root=str(root), img_size=img_size,
                                                    jpeg_draft=draft))
            for name, draft in (("exact", False), ("draft", True))}
    times = {name: [] for name in sets}
    for _ in range(3):
        for name, ds in sets.items():
            t0 = time.process_time()  # CPU time of this process: a busy machine's other jobs do not count
            for item in items:
                ds[item]
            times[name].append(time.process_time() - t0)
    diffs, mses, drafted = [], [], 0
    for index, seed in items:
        a, b = sets["exact"][(index, seed)][0].float(), sets["draft"][(index, seed)][0].float()
        w, h = Image.open(src.samples[index][0]).size
        box = sets["exact"].draw(random.Random(seed), w, h)[0]
        drafted += draft_scale(box[2], box[3], img_size) > 1
        diffs.append((a - b).abs().mean().item())
        mses.append(((a - b) ** 2).mean().item())
    rate = {name: len(items) / sorted(t)[1] for name, t in times.items()}
    mse = sum(mses) / len(mses)
    return {"views": len(items), "img_size": img_size, "exact_views_per_s_per_core": rate["exact"],
            "draft_views_per_s_per_core": rate["draft"], "speedup": rate["draft"] / rate["exact"],
            "drafted_fraction": drafted / len(items), "mean_abs_diff_levels": sum(diffs) / len(diffs),
            "max_view_mean_abs_diff_levels": max(diffs),
            "psnr_db": 10 * math.log10(255 ** 2 / mse) if mse > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--paths", nargs="*", default=list(PATHS), choices=list(PATHS),
                    help="loader paths to measure (none: only the draft study)")
    ap.add_argument("--step-rate", type=float, default=None, help="images/s of the training step to compare with")
    ap.add_argument("--step-json", default=None, help="gpu_throughput.py's JSON: its best tinymim rate")
    ap.add_argument("--draft-study", action="store_true", help="Pillow exact vs drafted views on one core")
    ap.add_argument("--study-images", type=int, default=64, help="draft study: images per set (x 4 crops each)")
    ap.add_argument("--dir", default=None, help="where to generate the JPEGs (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the JPEGs in --dir/jpegs (for a training run after)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    step_rate = args.step_rate
    if step_rate is None and args.step_json and Path(args.step_json).is_file():
        summary = json.loads(Path(args.step_json).read_text()).get("summary_images_per_s", {})
        step_rate = max((v for k, v in summary.items() if k.startswith("tinymim")), default=None)
    if args.keep and not args.dir:
        ap.error("--keep needs --dir")
    result = {"images": args.images, "workers": args.workers, "batch": args.batch, "device": str(device),
              "cpu_cores": os.cpu_count(), "step_rate": step_rate, "img_size": args.img_size, "paths": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    with (contextlib.nullcontext(args.dir) if args.keep else tempfile.TemporaryDirectory(dir=args.dir)) as tmp:
        root = Path(tmp) / "jpegs"
        if args.paths:
            t0 = time.perf_counter()
            mean_bytes = generate(root, args.images, args.workers)
            result["mean_kib"] = mean_bytes / 1024
            print(f"{args.images} JPEGs, mean {mean_bytes / 1024:.0f} KiB, generated in "
                  f"{time.perf_counter() - t0:.0f}s; {args.workers} workers, batch {args.batch}, device {device}, "
                  f"{os.cpu_count()} CPU cores", flush=True)
        for path in args.paths:
            try:
                rate = views_per_second(root, path, args.workers, args.batch, device, args.epochs, args.img_size)
            except Exception as e:  # noqa: BLE001 - report and go on to the other paths
                print(f"{path}: failed: {type(e).__name__}: {e}", flush=True)
                result["paths"][path] = f"failed: {type(e).__name__}: {e}"
                continue
            per_core = rate / max(1, args.workers)
            result["paths"][path] = {"views_per_s": rate, "views_per_s_per_worker": per_core}
            keeps_up = "" if step_rate is None else (
                f"; {'sustains' if rate >= step_rate else 'does not sustain'} the step's {step_rate:.0f} img/s")
            print(f"{path}: {rate:.0f} views/s, {per_core:.0f} per worker{keeps_up}", flush=True)
            save()
        if args.draft_study:
            result["draft_study"] = {}
            for name, size in (("imagenet_like", IMAGENET_LIKE), ("large", LARGE)):
                folder = Path(tmp) / f"study_{name}"
                generate(folder, args.study_images, args.workers, size)
                r = result["draft_study"][name] = draft_study(folder, args.img_size, args.study_images)
                print(f"draft study, {name} ({size[0][0]}-{size[0][1] - 1} x {size[1][0]}-{size[1][1] - 1}), "
                      f"{args.img_size}px: exact {r['exact_views_per_s_per_core']:.0f}, drafted "
                      f"{r['draft_views_per_s_per_core']:.0f} views/s per core ({r['speedup']:.2f}x, "
                      f"{100 * r['drafted_fraction']:.0f}% of views drafted); drafted vs exact: mean "
                      f"{r['mean_abs_diff_levels']:.2f} levels (worst view {r['max_view_mean_abs_diff_levels']:.2f}), "
                      f"PSNR {r['psnr_db']:.1f} dB", flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
