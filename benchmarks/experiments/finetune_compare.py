"""Does TinyMIM pre-training help? Fine-tune the same micro ViT from a distilled student and from
random init, same recipe and budget, several seeds; print top-1 and wall time of each run.

    python benchmarks/experiments/finetune_compare.py --student runs/cifar10/distill_micro \
        --train PATH/cifar10/train --test PATH/cifar10/test --epochs 3 --seeds 0 1 --out runs/compare
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tinymim.tasks as tasks
from tinymim.core.config import load_config
from tinymim.tasks import finetune_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="run directory of tinymim distill (or any weights)")
    ap.add_argument("--train", required=True, help="ImageFolder of the training split")
    ap.add_argument("--test", required=True, help="ImageFolder of the test split")
    ap.add_argument("--recipe", default="cifar10/finetune_micro")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    rows = []
    for init_name, init in (("TinyMIM student", args.student), ("random init", None)):
        for seed in args.seeds:
            out = Path(args.out) / f"{'tinymim' if init else 'scratch'}_seed{seed}"
            cfg = load_config(finetune_config.FinetuneConfig, args.recipe, [
                "data.name=folder", f"data.root={args.train}", f"data.val_root={args.test}",
                f"train.epochs={args.epochs}", f"train.seed={seed}", "train.progress=false",
                f"init={init if init else 'null'}", *args.overrides])
            t = time.perf_counter()
            tasks.run("finetune", cfg, str(out))
            minutes = (time.perf_counter() - t) / 60
            evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in evals if "val_top1" in r]
            rows.append((init_name, seed, evals[-1]["val_top1"], evals[-1]["val_best"], minutes))
            print(f"{init_name} seed {seed}: top-1 {evals[-1]['val_top1']:.2f} (best {evals[-1]['val_best']:.2f}), "
                  f"{minutes:.1f} min", flush=True)

    print("\n| init | seed | final top-1 | best top-1 | minutes |\n|---|---|---|---|---|")
    for name, seed, top1, best, minutes in rows:
        print(f"| {name} | {seed} | {top1:.2f} | {best:.2f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
