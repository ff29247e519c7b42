"""Does the data loader keep up with training at 32px? Both measured here, each on its own.

- loader: images/s delivered by tinymim's loader (JPEG decode, shared RandomResizedCrop + flip,
  jitter factors, collation) over CIFAR-10 JPEGs, with --workers worker processes;
- training: images/s consumed by full distillation steps of the CIFAR-10 micro recipe
  (views + jitter on the device, teacher, student forward/backward, AdamW), on the same machine.

    python benchmarks/speed/loader_throughput.py [--data ../shared/data/cifar10/train.tar] [--workers 2]
"""
from __future__ import annotations

import argparse
import tarfile
import time
from pathlib import Path

import torch

from tinymim.core.config import load_config
from tinymim.data.loader import build_loader
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import DistillConfig
from tinymim.train.distributed import seed_everything
from tinymim.train.engine import _autocast

ROOT = Path(__file__).resolve().parents[2]  # the project


def extract(tar: Path, cache: Path) -> Path:
    out = cache / tar.stem
    if not (out / ".done").exists():
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(out, filter="data")
        (out / ".done").touch()
    return next(p for p in out.iterdir() if p.is_dir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train.tar"),
                    help="an ImageFolder directory or a .tar of one")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tinymim" / "bench"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar10" / "distill_micro.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()

    data = Path(args.data)
    root = extract(data, Path(args.cache)) if data.suffix == ".tar" else data
    cfg = load_config(DistillConfig, args.recipe, [f"data.root={root}", "data.name=folder", "teacher.checkpoint=null",
                                                   f"data.num_workers={args.workers}"])
    batch = cfg.train.batch_size
    print(f"recipe {Path(args.recipe).name}: batch {batch}, {cfg.data.img_size}px, precision {cfg.train.precision}, "
          f"{args.workers} loader workers, {torch.get_num_threads()} compute threads")

    loader, _ = build_loader(cfg.data, batch, seed=0)
    it = iter(loader)
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
    loader_ips = args.batches * batch / (time.perf_counter() - t)
    del it

    seed_everything(0)
    task = build_distill_task(cfg)
    opt = torch.optim.AdamW([p for p in task.get_trainable_module().parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")

    def step():
        with _autocast(device, cfg.train.precision):
            loss = task(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_ips = args.steps * batch / (time.perf_counter() - t)

    print("\n| stage | images/s |")
    print("|---|---|")
    print(f"| loader ({args.workers} workers) | {loader_ips:.0f} |")
    print(f"| training step | {train_ips:.0f} |")
    print(f"\nloader / training = {loader_ips / train_ips:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
