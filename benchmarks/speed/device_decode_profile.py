"""Where the time of `data.decode=device` goes, per batch: batched decode, one-by-one decode, the
per-image crop/resize/flip, against Pillow's decode + crop on one CPU core. Generated ImageNet-like
JPEGs (jpeg_loader_throughput.make_jpeg).

    python benchmarks/speed/device_decode_profile.py [--batch 256] [--device cuda]
"""
from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from pathlib import Path

import torch
from jpeg_loader_throughput import make_jpeg
from PIL import Image


def timed(fn, device, repeat=3):
    best_wall, cpu = float("inf"), 0.0
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - w
        if wall < best_wall:
            best_wall, cpu = wall, time.process_time() - c
    return best_wall, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from tinymim.data.pretrain import crop_resize_flip
    from tinymim.data.view_dataset import random_resized_crop_params

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{i}.jpg" for i in range(args.batch)]
        for i, p in enumerate(paths):
            make_jpeg((p, i))
        files = [p.read_bytes() for p in paths]
    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    sizes = [Image.open(io.BytesIO(f)).size for f in files]
    rng = random.Random(0)
    boxes = [(*random_resized_crop_params(rng, w, h, (0.2, 1.0)), rng.random() < 0.5) for w, h in sizes]
    b = args.batch
    rows = {}
    decode_jpeg(tensors[:8], mode=ImageReadMode.RGB, device=device)  # warm-up (nvJPEG handles)
    rows["decode batched"] = timed(lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device), device)
    rows["decode one by one"] = timed(lambda: [decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
                                              for t in tensors], device)
    images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    out = torch.empty(b, 3, 224, 224, device=device)

    def crops():
        for i, (img, box) in enumerate(zip(images, boxes)):
            out[i] = crop_resize_flip(img, box, 224)
    crops()
    rows["crop+resize+flip, per image"] = timed(crops, device)

    def pillow():
        for f, (top, left, h, w, flip) in zip(files, boxes):
            img = Image.open(io.BytesIO(f)).convert("RGB")
            img = TF.resized_crop(img, top, left, h, w, [224, 224], InterpolationMode.BICUBIC)
            TF.pil_to_tensor(TF.hflip(img) if flip else img)
    torch.set_num_threads(1)
    rows["pillow decode+crop, one core"] = timed(pillow, torch.device("cpu"), repeat=1)
    rows["torchvision decode on CPU, one core"] = timed(lambda: [decode_jpeg(t, mode=ImageReadMode.RGB)
                                                               for t in tensors], torch.device("cpu"), repeat=1)
    print(f"batch {b} of ~500x375 JPEGs, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})")
    print("| stage | ms per batch | images/s | CPU ms of this process |")
    print("|---|---|---|---|")
    for k, (wall, cpu) in rows.items():
        print(f"| {k} | {1000 * wall:.1f} | {b / wall:.0f} | {1000 * cpu:.0f} |")


if __name__ == "__main__":
    main()
