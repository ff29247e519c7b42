"""Why `data.decode=device` batches travel as one flat tensor: what loader workers deliver per second
when each batch carries the JPEG files as one tensor (tinymim's collate) or as one tensor per file.
Nothing is decoded: this is the worker -> main process transfer alone (every tensor crossing costs a
shared-memory segment; on a GPU machine this transfer, not nvJPEG, capped the device path).

    python benchmarks/speed/loader_transfer.py [--images 2048] [--workers 2] [--batch 256] [--rounds 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.data as tud
from jpeg_loader_throughput import generate

from tinymim.data.loader import GlobalBatchSampler
from tinymim.data.pretrain import DataConfig
from tinymim.data.sources import build_source
from tinymim.data.view_dataset import PairedViewDataset, collate


def per_file_collate(samples):
    batch = collate(samples)
    batch["jpeg"] = [t.clone() for t in torch.split(batch["jpeg"], batch["jpeg_sizes"].tolist())]
    return batch


def delivered_per_second(root: Path, collate_fn, workers: int, batch: int) -> float:
    cfg = DataConfig(name="folder", root=str(root), img_size=224, num_workers=workers, decode="device")
    dataset = PairedViewDataset(build_source(cfg), cfg)
    loader = tud.DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(dataset), batch), num_workers=workers,
                            collate_fn=collate_fn, prefetch_factor=4)
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i == 1:  # after the workers started
            t0 = time.perf_counter()
        elif i > 1:
            n += len(b["label"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        generate(root, args.images, args.workers)
        rates = {"one flat tensor": [], "one tensor per file": []}
        for _ in range(args.rounds):  # interleaved, so drifting machine load hits both alike
            rates["one flat tensor"].append(delivered_per_second(root, collate, args.workers, args.batch))
            rates["one tensor per file"].append(delivered_per_second(root, per_file_collate, args.workers, args.batch))
    print(f"{args.images} JPEGs (~500x375), {args.workers} workers, batch {args.batch}")
    for name, r in rates.items():
        print(f"{name}: median {sorted(r)[len(r) // 2]:.0f} samples/s delivered ({', '.join(f'{x:.0f}' for x in r)})")


if __name__ == "__main__":
    main()
