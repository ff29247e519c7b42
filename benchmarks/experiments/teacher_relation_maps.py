r"""How sharp a teacher's relation maps are per block, and how far the last block's are from earlier ones.

For findings 2 (which block to distil) of benchmarks/experiments/findings.py: the mean row entropy of the softmax
Q-K and V-V maps of every block (a uniform row has entropy ln N), and the KL of the last block's maps
from blocks L-1 and L-2, over --images test images (every k-th, in sorted order).

    python benchmarks/experiments/teacher_relation_maps.py --teacher ../shared/teachers/cifar10_mae_vit192x6 \
        --images cifar10/test
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from cifar_study import ARCHITECTURE, CIFAR_MEAN, CIFAR_STD, SHARED, teacher_model
from PIL import Image

from tinymim.method.attention import block_qkv
from tinymim.method.relations import relation_logits
from tinymim.models.checkpoint import load_vit_weights, load_weights
from tinymim.models.vit import ModelConfig, create_vit, embed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "cifar10_mae_vit192x6")
    ap.add_argument("--images", type=Path, required=True, help="an ImageFolder of 32 px images (the test split)")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--mean", type=float, nargs=3, default=CIFAR_MEAN)
    ap.add_argument("--std", type=float, nargs=3, default=CIFAR_STD)
    args = ap.parse_args()

    arch = teacher_model(args.teacher)
    vit = create_vit(ModelConfig(**{k: arch[k] for k in ARCHITECTURE})).eval()
    load_vit_weights(vit, load_weights(str(args.teacher)), source=str(args.teacher),
                     ignore_prefixes=("decoder_", "mask_token"))
    files = sorted(args.images.glob("*/*"))
    files = files[:: max(1, len(files) // args.count)][: args.count]
    mean, std = torch.tensor(args.mean).view(3, 1, 1), torch.tensor(args.std).view(3, 1, 1)
    x = torch.stack([(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                      - mean) / std for f in files])
    maps = {}
    with torch.no_grad():
        tokens = embed(vit, x)
        for i, block in enumerate(vit.blocks, 1):
            qkv = block_qkv(block, tokens)
            for name in ("qk", "vv"):
                maps[i, name] = relation_logits(qkv, name).softmax(-1)
            tokens = block(tokens)
    depth = len(vit.blocks)
    out = {"images": len(files), "uniform_entropy": round(math.log(tokens.shape[1]), 3)}
    for (i, name), p in maps.items():
        out[f"block{i}_{name}_entropy"] = round(-(p * p.clamp_min(1e-12).log()).sum(-1).mean().item(), 3)
    for name in ("qk", "vv"):
        last = maps[depth, name]
        for i in (depth - 1, depth - 2):
            kl = (last * (last.clamp_min(1e-12).log() - maps[i, name].clamp_min(1e-12).log())).sum(-1).mean()
            out[f"kl_block{depth}_from_block{i}_{name}"] = round(kl.item(), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
