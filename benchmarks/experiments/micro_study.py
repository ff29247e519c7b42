"""The TinyMIM study in miniature on CIFAR-10: which pre-training helps a small ViT most?

One strong MAE teacher (by default ../shared/teachers/cifar10_mae_vit192x6: 192 wide, 6 blocks, 6 heads,
2.7M parameters, 12 MAE epochs) and one student 4x smaller (96 wide, 6 blocks, 3 heads, 0.7M). Every
pre-training runs `--pretrain-epochs` over the 50,000 training images without labels; every
fine-tuning runs `--finetune-epochs` over a fixed random `--finetune-subset` of them with labels
(cifar10/finetune_short, a recipe made for short schedules) and is scored on the 10,000 test images.
Compared, for every seed:
  scratch      fine-tuned from random init with the students' recipe (timm init, learned position embedding)
  scratch_best fine-tuned from random init with its own best recipe (--scratch-best: chosen on held-out images
               by benchmarks/experiments/baseline_grid.py)
  setup        the students' setup without pre-training: MAE init + fixed sin-cos table, the students' recipe
  MAE          the student MAE-pre-trained itself (same epochs)
  class token  distilled from the teacher's class token (smooth-L1, projected)
  feature      distilled from the teacher's block output (smooth-L1 beta 2, projected, whitened)
  relation     TinyMIM: the teacher's Q-K and V-V relations (KL)
Each pre-trained student is also scored frozen: weighted k-NN (k=20, T=0.07) of the average patch token
entering its last block, with a fixed random sample of --knn-bank training images as the bank (about the
same count per class; 0 = all 50,000) and the 10,000 test images as queries.
Everything runs as one `tinymim pipeline`, so an interrupted study resumes where it stopped and a
finished one only rewrites the table:

    python benchmarks/experiments/micro_study.py --out runs/micro_study --table docs/results/micro_study.md
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from baseline_grid import CHOSEN, setup_overrides
from cifar_study import SHARED, cached_knn, extract, mean_std, shape, teacher_model, teacher_pairing

from tinymim.pipeline.planning import PipelineConfig, StageConfig
from tinymim.pipeline.report import stage_result
from tinymim.pipeline.stages import run_pipeline

# the from-scratch recipe benchmarks/experiments/baseline_grid.py chose on held-out images
# (docs/results/baseline_grid.md)
SCRATCH_BEST = setup_overrides(CHOSEN)
LABELS = {"scratch": "from scratch, the students' recipe (timm init, learned position embedding)",
          "scratch_best": "from scratch at its best (recipe chosen on held-out images)",
          "setup": "same setup as the students (MAE init, sin-cos table), no pre-training",
          "mae": "MAE on the student itself", "class_token": "class-token distillation",
          "feature": "feature distillation (block output)", "relation": "relation distillation (TinyMIM)"}


def student_args(args, section: str) -> list[str]:
    return shape(section, args.student_width, args.student_depth, args.student_heads)


def study(args, train: Path, test: Path) -> PipelineConfig:
    common = ["train.progress=false", "data.name=folder", f"data.root={train}", f"data.num_workers={args.workers}"]
    stages = []
    pairing = teacher_pairing(args.teacher)
    distill = dict(task="distill", config="cifar10/distill_micro")
    no_pretraining = {"scratch": [], "scratch_best": list(args.scratch_best),
                      "setup": ["model.init=mae", "model.pos_embed=sincos"]}
    methods = {
        "scratch": None, "scratch_best": None, "setup": None,
        "mae": dict(task="mae", config="cifar10/mae_micro", overrides=student_args(args, "model")),
        "class_token": dict(**distill, overrides=[*student_args(args, "student"), *pairing,
                                                  "loss.relation.weight=0", "loss.class_token.weight=1"]),
        "feature": dict(**distill, overrides=[*student_args(args, "student"), *pairing, "loss.relation.weight=0",
                                              "loss.feature.weight=1", "loss.feature.site=block"]),
        "relation": dict(**distill, overrides=[*student_args(args, "student"), *pairing]),
    }
    for seed in args.seeds:  # pre-training first: it can run while the fine-tuning recipe is settled
        for method, pre in methods.items():
            if pre is not None:
                stages.append(StageConfig(name=f"{method}_s{seed}", **{**pre, "overrides": [
                    *pre["overrides"], f"train.epochs={args.pretrain_epochs}", "train.warmup_epochs=0.2",
                    f"train.seed={seed}"]}))
    if args.pretrain_only:
        return PipelineConfig(overrides=common, stages=stages)
    finetunes = []
    for seed in args.seeds:
        for method, pre in methods.items():
            init = None if pre is None else f"{method}_s{seed}"
            finetunes.append(StageConfig(
                name=f"finetune_{method}_s{seed}", task="finetune", config="cifar10/finetune_short", init=init,
                label=f"{LABELS[method]}, seed {seed}",
                overrides=[*student_args(args, "model"), f"data.val_root={test}", f"data.subset={args.finetune_subset}",
                           f"train.epochs={args.finetune_epochs}", f"train.seed={seed}",
                           *no_pretraining.get(method, [])]))
    return PipelineConfig(overrides=common, stages=stages + finetunes)


def knn_scores(args, out: Path, train: Path, test: Path) -> dict[str, float]:
    """k-NN top-1 of every pre-trained student (cached in its run directory as knn.json)."""
    scores = {}
    index, count = args.shard
    for i, run in enumerate(sorted(r for r in out.glob("*_s[0-9]*") if not r.name.startswith("finetune_"))):
        if not (run / "config.yaml").is_file() or (i % count != index and not (run / "knn.json").is_file()):
            continue
        scores[run.name] = cached_knn(run, train, test, args.student_depth, args.workers, args.knn_bank)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10", help="folder with train.tar and test.tar")
    ap.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "cifar10_mae_vit192x6",
                    help="an MAE teacher's run directory (config.yaml + encoder.safetensors)")
    ap.add_argument("--out", type=Path, default=Path("runs/micro_study"))
    ap.add_argument("--table", type=Path, default=Path("docs/results/micro_study.md"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student-width", type=int, default=96)
    ap.add_argument("--student-depth", type=int, default=6)
    ap.add_argument("--student-heads", type=int, default=3)
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--finetune-subset", type=int, default=50000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--knn-bank", type=int, default=10000,
                    help="k-NN bank: a fixed random sample of this many training images (0: all 50,000)")
    ap.add_argument("--scratch-best", nargs="*", default=SCRATCH_BEST, metavar="KEY=VALUE",
                    help="the from-scratch baseline's own recipe, as overrides of cifar10/finetune_short (default: "
                         "the choice of benchmarks/experiments/baseline_grid.py at the demo's scale)")
    ap.add_argument("--pretrain-only", action="store_true", help="run the pre-training stages only (no table)")
    ap.add_argument("--shard", type=lambda v: tuple(map(int, v.split("/"))), default=(0, 1), metavar="I/N",
                    help="run only every N-th stage (and k-NN scoring) from the I-th, so that N processes "
                         "on the same --out share the work (tinymim pipeline --shard) "
                         "(small models use one core better than two); "
                         "then run once without --shard for the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    train, test = extract(args.data, args.out / "data")
    cfg = study(args, train, test)
    start = time.perf_counter()
    summaries = run_pipeline(cfg, args.out, report=not args.pretrain_only and args.shard[1] == 1,
                             shard=args.shard)
    if args.pretrain_only:
        return
    knn = knn_scores(args, args.out, train, test)
    if args.shard[1] > 1:
        return
    wall = (time.perf_counter() - start) / 60
    total = sum(s["record"].get("seconds", 0) for s in summaries) / 60

    rows, tops, knns = [], {}, {}
    for method, label in LABELS.items():
        tops[method] = [stage_result("finetune", args.out / f"finetune_{method}_s{s}")["top1"] for s in args.seeds]
        knns[method] = [knn[f"{method}_s{s}"] for s in args.seeds if f"{method}_s{s}" in knn]
        rows.append(f"| {label} | " + " | ".join(f"{t:.2f}" for t in tops[method])
                    + f" | **{mean_std(tops[method])}** | "
                    + (mean_std(knns[method]) if knns[method] else "–") + " |")
    ranked = sorted(LABELS, key=lambda m: statistics.mean(tops[m]), reverse=True)

    def versus(a: str, b: str) -> str:
        gap = statistics.mean(tops[a]) - statistics.mean(tops[b])
        spread = max(statistics.stdev(tops[a]), statistics.stdev(tops[b])) if len(args.seeds) > 1 else 0.0
        verdict = ("beats " if gap > 0 else "is below ") + LABELS[b] + (" by more than" if abs(gap) > spread else
                                                                          " by no more than")
        return f"{LABELS[a]} {verdict} the seeds' spread: {gap:+.2f} points (largest std {spread:.2f})"

    command = "python benchmarks/experiments/micro_study.py " + " ".join([
        f"--seeds {' '.join(map(str, args.seeds))}", f"--pretrain-epochs {args.pretrain_epochs}",
        f"--finetune-epochs {args.finetune_epochs}", f"--finetune-subset {args.finetune_subset}",
        f"--student-width {args.student_width} --student-depth {args.student_depth} "
        f"--student-heads {args.student_heads}"])
    teacher = teacher_model(args.teacher)
    bank = ("all 50,000 training images" if not args.knn_bank else
            f"a fixed random sample of {args.knn_bank} training images (the same for every row, "
            f"about {args.knn_bank // 10} per class)")
    teacher_desc = (f"MAE ViT {teacher['embed_dim']} wide, {teacher['depth']} blocks, {teacher['num_heads']} heads, "
                    "patch 4 at 32 px")
    text = f"""# Micro study: the TinyMIM comparison on CIFAR-10

Made by `{command}` with the teacher `{args.teacher.name}` ({total:.0f} minutes of training in all on a 2-core
CPU, plus k-NN scoring; this invocation took {wall:.0f} minutes, reusing finished stages).

- Teacher: {teacher_desc}
  (its run directory's README gives the `tinymim mae` command); relations of its block {teacher['depth']}, split into
  {teacher['num_heads']} heads.
- Student: ViT {args.student_width} wide, {args.student_depth} blocks, {args.student_heads} heads (its relation block
  takes the teacher's {teacher['num_heads']}), MAE init and fixed sin-cos position embedding while pre-training.
- Pre-training: {args.pretrain_epochs} epoch(s) over the 50,000 training images, no labels, 0.2 warmup epochs then
  cosine (cifar10/distill_micro; cifar10/mae_micro for the student's own MAE, 75% masking).
- Fine-tuning: {args.finetune_epochs} epochs on a fixed random {args.finetune_subset} labelled training images,
  cifar10/finetune_short (crop + flip, label smoothing 0.1, layer decay 0.85, no mixup/cutmix/RandAugment),
  the same recipe and budget for every row, scored once on the 10,000 test images after the last epoch.
- k-NN: the frozen pre-trained student, average patch token entering its last block, k=20, T=0.07; bank:
  {bank}; queries: the 10,000 test images.

| pre-training | {' | '.join(f'seed {s}' for s in args.seeds)} | fine-tuned top-1, mean ± std | k-NN top-1, mean ± std |
|---|{'---|' * len(args.seeds)}---|---|
{chr(10).join(rows)}

Measured ordering by fine-tuned top-1: {" > ".join(LABELS[m] for m in ranked)}.
- {versus("relation", "mae")}.
- {versus("relation", "feature")}.
- {versus("relation", "scratch_best")}.
- {versus("relation", "setup")}.

The paper's ordering (ImageNet-1K, 300 epochs, ViT-T/S/B) is relation > feature > class token and MAE.
This is a tiny budget on tiny images; the pipeline report with loss curves and accuracy plots is in the run
folder (`report.md`).
"""
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
