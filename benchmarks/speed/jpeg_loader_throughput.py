"""Can the loader feed a GPU? ImageNet-like JPEGs through tinymim's two decode paths.

Generates --images JPEGs of about 500x375 at quality 90 (a smooth random field plus grain, so they
compress like photographs, not like noise or flat colour), in two class folders, then measures for
each path the paired views ready on the device per second (224px crops, flip, jitter, normalized):
- pillow: `data.decode=cpu`, Pillow decodes, crops and resizes in --workers loader processes;
- device: `data.decode=device`, workers read the file and its header, the device decodes the batch
  (torchvision decode_jpeg, nvJPEG on CUDA), crops, resizes and flips.
Each path runs alone; in training the device path shares the GPU with the step. With --step-rate
(images/s of the training step, e.g. from gpu_throughput.py's JSON) it says whether each keeps up.

    python benchmarks/speed/jpeg_loader_throughput.py [--images 4096] [--workers 16] [--batch 256]
        [--device cuda] [--step-rate IMG_PER_S | --step-json gpu_throughput.json] [--dir DIR [--keep]]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_jpeg(args) -> int:
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(450, 551)), int(rng.integers(330, 421))
    small = Image.fromarray(rng.uniform(0, 255, (int(rng.integers(6, 16)), int(rng.integers(8, 20)), 3))
                            .astype(np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.float32)
    arr += rng.normal(0, 10, arr.shape)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def generate(root: Path, n: int, workers: int) -> float:
    for c in ("class_a", "class_b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    jobs = [(root / ("class_a" if i % 2 else "class_b") / f"{i:06d}.jpg", i) for i in range(n)]
    with multiprocessing.Pool(workers) as pool:
        sizes = pool.map(make_jpeg, jobs, chunksize=32)
    return sum(sizes) / len(sizes)


def views_per_second(root: Path, decode: str, workers: int, batch: int, device: torch.device, epochs: int) -> float:
    from tinymim.data.loader import build_loader
    from tinymim.data.pretrain import DataConfig, paired_views

    cfg = DataConfig(name="folder", root=str(root), img_size=224, num_workers=workers, decode=decode)
    loader, sampler = build_loader(cfg, batch, pin_memory=device.type == "cuda")
    images, t0 = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up (worker start, nvJPEG handles, page cache)
        sampler.set_epoch(epoch)
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for b in loader:
            teacher, student = paired_views(b, cfg, device)
            if epoch:
                images += teacher.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--step-rate", type=float, default=None, help="images/s of the training step to compare with")
    ap.add_argument("--step-json", default=None, help="gpu_throughput.py's JSON: its best tinymim rate")
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
    with (contextlib.nullcontext(args.dir) if args.keep else tempfile.TemporaryDirectory(dir=args.dir)) as tmp:
        root = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        mean_bytes = generate(root, args.images, args.workers)
        print(f"{args.images} JPEGs, mean {mean_bytes / 1024:.0f} KiB, generated in {time.perf_counter() - t0:.0f}s; "
              f"{args.workers} workers, batch {args.batch}, device {device}, {os.cpu_count()} CPU cores", flush=True)
        result = {"images": args.images, "mean_kib": mean_bytes / 1024, "workers": args.workers, "batch": args.batch,
                  "device": str(device), "cpu_cores": os.cpu_count(), "step_rate": step_rate}
        for decode in ("cpu", "device"):
            try:
                rate = views_per_second(root, decode, args.workers, args.batch, device, args.epochs)
            except Exception as e:  # noqa: BLE001 - report and go on to the other path
                print(f"{decode}: failed: {type(e).__name__}: {e}", flush=True)
                result[decode] = str(e)
                continue
            result[decode] = rate
            keeps_up = "" if step_rate is None else (
                f"; {'sustains' if rate >= step_rate else 'does not sustain'} the step's {step_rate:.0f} img/s")
            print(f"decode={decode}: {rate:.0f} views/s{keeps_up}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
