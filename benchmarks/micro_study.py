"""The TinyMIM study in miniature on CIFAR-10: which pre-training helps a small ViT most?

Same student (64 wide, 4 blocks, 2 heads, patch 4 at 32 px), same budgets: every pre-training
runs `--pretrain-epochs` over the 50,000 training images, every fine-tuning `--finetune-epochs`
over a fixed random `--finetune-subset` of them with labels, evaluated on the 10,000 test images.
Compared, each for every seed:
  scratch          fine-tuned from random init
  MAE              the student MAE-pre-trained itself
  class token      distilled from the MAE teacher's class token (smooth-L1, projected)
  feature          distilled from the MAE teacher's block output (smooth-L1 beta 2, projected, whitened)
  relation         TinyMIM: the teacher's Q-K and V-V relations (KL)
The teacher (128 wide, 6 blocks, 4 heads) is MAE-pre-trained once for `--teacher-epochs`.
Everything runs as one `tinymim pipeline`, so an interrupted study resumes where it stopped and a
finished one only rewrites the table:

    python benchmarks/micro_study.py --out runs/micro_study --table docs/results/micro_study.md
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tarfile
import time
from pathlib import Path

from tinymim.pipeline import PipelineConfig, StageConfig, run_pipeline
from tinymim.report import stage_result

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
STUDENT = ["model.embed_dim=64", "model.depth=4", "model.num_heads=2"]
METHODS = {  # name -> (pre-training stage kwargs or None, label)
    "scratch": None,
    "mae": dict(task="mae", config="cifar10/mae_micro", overrides=STUDENT),
    "class_token": dict(task="distill", config="cifar10/distill_micro", teacher="teacher",
                        overrides=["loss.relation.weight=0", "loss.class_token.weight=1"]),
    "feature": dict(task="distill", config="cifar10/distill_micro", teacher="teacher",
                    overrides=["loss.relation.weight=0", "loss.feature.weight=1", "loss.feature.site=block"]),
    "relation": dict(task="distill", config="cifar10/distill_micro", teacher="teacher", overrides=[]),
}
LABELS = {"scratch": "from scratch", "mae": "MAE-pre-trained student", "class_token": "class-token distillation",
          "feature": "feature distillation", "relation": "relation distillation (TinyMIM)"}


def extract(data: Path, cache: Path) -> tuple[Path, Path]:
    for split in ("train", "test"):
        if not (cache / split).is_dir():
            tar = data / f"{split}.tar"
            if not tar.is_file():
                sys.exit(f"CIFAR-10 not found: {tar} (pass --data DIR holding train.tar and test.tar)")
            with tarfile.open(tar) as t:
                t.extractall(cache, filter="data")
    return cache / "train", cache / "test"


def study(args, train: Path, test: Path) -> PipelineConfig:
    common = ["train.progress=false", "data.name=folder", f"data.root={train}", "data.num_workers=2"]
    stages = [StageConfig(name="teacher", task="mae", config="cifar10/mae_micro",
                          overrides=[f"train.epochs={args.teacher_epochs}"])]
    for seed in args.seeds:
        for method, pre in METHODS.items():
            init = None
            if pre is not None:
                init = f"{method}_s{seed}"
                stages.append(StageConfig(name=init, **{**pre, "overrides": [
                    *pre["overrides"], f"train.epochs={args.pretrain_epochs}", f"train.seed={seed}"]}))
            stages.append(StageConfig(
                name=f"finetune_{method}_s{seed}", task="finetune", config="cifar10/finetune_micro", init=init,
                label=f"{LABELS[method]}, seed {seed}",
                overrides=["init=null"] * (init is None) + [
                    f"data.val_root={test}", f"data.subset={args.finetune_subset}",
                    f"train.epochs={args.finetune_epochs}", f"train.seed={seed}"]))
    return PipelineConfig(overrides=common, stages=stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder with CIFAR-10's train.tar and test.tar")
    ap.add_argument("--out", type=Path, default=Path("runs/micro_study"))
    ap.add_argument("--table", type=Path, default=Path("docs/results/micro_study.md"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--finetune-subset", type=int, default=20000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    train, test = extract(args.data, args.out / "data")
    cfg = study(args, train, test)
    start = time.perf_counter()
    summaries = run_pipeline(cfg, args.out)
    wall = (time.perf_counter() - start) / 60
    total = sum(s["record"].get("seconds", 0) for s in summaries) / 60

    rows, means = [], {}
    for method in METHODS:
        tops = [stage_result("finetune", args.out / f"finetune_{method}_s{seed}")["top1"] for seed in args.seeds]
        means[LABELS[method]] = statistics.mean(tops)
        spread = f" ± {statistics.stdev(tops):.2f}" if len(tops) > 1 else ""
        rows.append(f"| {LABELS[method]} | " + " | ".join(f"{t:.2f}" for t in tops)
                    + f" | {statistics.mean(tops):.2f}{spread} |")
    command = "python benchmarks/micro_study.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--teacher-epochs {args.teacher_epochs}",
         f"--pretrain-epochs {args.pretrain_epochs}", f"--finetune-epochs {args.finetune_epochs}",
         f"--finetune-subset {args.finetune_subset}"])
    text = f"""# Micro study: the TinyMIM comparison on CIFAR-10

Made by `{command}` ({total:.0f} minutes of training in all on a 2-core CPU; this invocation took
{wall:.0f} minutes, reusing finished stages). Every row fine-tunes the same student (ViT 64 wide, 4 blocks,
2 heads, patch 4, 32 px) for {args.finetune_epochs} epochs on the same fixed random {args.finetune_subset} labelled
training images (cifar10/finetune_micro recipe) and reports top-1 (%) on the 10,000 test images after the
last epoch. Pre-trained rows first spend {args.pretrain_epochs} epochs on the 50,000 training images, without
labels: the student's own MAE, or distillation from one MAE teacher (128 wide, 6 blocks, 4 heads,
{args.teacher_epochs} MAE epochs; target block 6) of its class token, its block-6 output features, or its
Q-K + V-V relations (cifar10/distill_micro recipe).

| pre-training | {' | '.join(f'seed {s}' for s in args.seeds)} | mean{' ± std' if len(args.seeds) > 1 else ''} |
|---|{'---|' * len(args.seeds)}---|
{chr(10).join(rows)}

Measured ordering (mean top-1): {" > ".join(sorted(means, key=means.get, reverse=True))}.
The paper's ordering (ImageNet-1K, 300 epochs, ViT-T/S/B) is relation > feature > class token and MAE.
This is a tiny budget on tiny images: read it as a smoke test of the comparison, not as a replication.
The pipeline report with loss curves and accuracy plots is in the run folder (`report.md`).
"""
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
