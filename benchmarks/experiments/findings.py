"""The article's six findings, measured on CIFAR-10: each as arms that differ only in its setting.

TinyMIM (CVPR 2023) states six findings about distilling an MAE teacher into a small ViT
(docs/method.md section 5). This study measures each one at micro scale with a shared MAE teacher
(by default ../shared/teachers/cifar10_mae_vit192x6: 192 wide, 6 blocks, 6 heads), `--seeds` seeds per
arm, frozen k-NN for every arm and fine-tuned top-1 where the finding is about the end result:

  (1) target     relations (Q-K + V-V KL)  vs  block-output features  vs  class token   k-NN + fine-tune
  (2) block      teacher block 6 (the last)  vs  5  vs  4                                k-NN
  (3) input      full image  vs  75% of the patches masked                               k-NN
  (4) drop path  student 0.1 / teacher 0  vs  student 0 / teacher 0  vs  0.1 / 0.1       k-NN
  (5) MAE loss   masked input  vs  masked input + MAE reconstruction loss (weight 1)      k-NN
  (6) sequence   teacher -> small  vs  teacher -> medium (TinyMIM) -> small              k-NN + fine-tune

The default arm ("relation": Q-K + V-V of the teacher's last block, full images, student drop path 0.1,
teacher none) is shared by findings 1-4 and 6. Every pre-training runs `--pretrain-epochs` over a fixed
random `--pretrain-images` training images without labels (cifar10/distill_micro); fine-tuning runs
`--finetune-epochs` over `--finetune-images` labelled ones (cifar10/finetune_short) and is scored on the
10,000 test images; k-NN (k=20, T=0.07) reads the average patch token entering the student's last block
with --knn-bank training images as the bank and the test images as queries.

Everything is one `tinymim pipeline`: an interrupted study resumes stage by stage. `--shard I/N` runs
every N-th stage from the I-th (pre-training stages first, then fine-tuning), so N processes on the same
--out share the work; then the plain command writes the table:

    python benchmarks/experiments/findings.py --out runs/findings --shard 0/2 &   # and 1/2, each OMP_NUM_THREADS=1
    python benchmarks/experiments/findings.py --out runs/findings                  # the table
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path

from cifar_study import SHARED, cached_knn, extract, mean_std, shape, teacher_model, teacher_pairing

from tinymim.pipeline.planning import PipelineConfig, StageConfig
from tinymim.pipeline.report import read_metrics, stage_result
from tinymim.pipeline.stages import run_pipeline

# arm -> (label, overrides of the distill stage on top of the default arm)
ARMS = {
    "relation": ("relations Q-K + V-V, last block, full image, drop path student 0.1 / teacher 0", []),
    "feature": ("block-output features (smooth-L1, projected, whitened)",
                ["loss.relation.weight=0", "loss.feature.weight=1", "loss.feature.site=block"]),
    "class_token": ("class token (smooth-L1, projected)", ["loss.relation.weight=0", "loss.class_token.weight=1"]),
    "block5": ("teacher block 5", ["teacher.target_block=5"]),
    "block4": ("teacher block 4", ["teacher.target_block=4"]),
    "masked": ("75% of the patches masked", ["mask_ratio=0.75"]),
    "masked_mae": ("75% masked + MAE reconstruction loss", ["mask_ratio=0.75", "loss.mae.weight=1"]),
    "student_dp0": ("drop path student 0 / teacher 0", ["student.drop_path_rate=0"]),
    "teacher_dp01": ("drop path student 0.1 / teacher 0.1", ["teacher.drop_path_rate=0.1"]),
    "sequential": ("teacher -> medium TinyMIM student -> small", []),
}
FINETUNED = ["relation", "feature", "class_token", "sequential"]

SHORT = {"relation": "relation", "feature": "feature", "class_token": "class token", "block5": "block 5",
         "block4": "block 4", "masked": "masked", "masked_mae": "masked + MAE loss", "student_dp0": "dp 0/0",
         "teacher_dp01": "dp 0.1/0.1", "sequential": "sequential"}

# (title, the paper's numbers, metrics, comparisons (the arm the paper finds better, the other arm),
#  kind: "better" = the first arm should lead; "no gain" = the first arm should not lead (finding 5),
#  names of arms in this finding's words)
FINDINGS = [
    ("(1) relations beat feature and class-token distillation",
     "ViT-B, 100-ep distillation: relation 84.6, feature 83.7, class token 80.6; ViT-T, 300 ep: 75.8 / 73.4 / 70.6",
     ["finetune", "knn"], [("relation", "feature"), ("relation", "class_token")], "better", {}),
    ("(2) an intermediate teacher block beats the last one",
     "ViT-L teacher (24 blocks): block 18 84.6, 21 84.8, 24 (last) 84.4, 15 84.1",
     ["knn"], [("block5", "relation"), ("block4", "relation")], "better", {"relation": "block 6 (last)"}),
    ("(3) full images beat masked inputs", "full 84.6, 75% masked 83.9",
     ["knn"], [("relation", "masked")], "better", {"relation": "full image"}),
    ("(4) the student needs a little drop path, the teacher none",
     "teacher/student drop path 0/0.1 84.6, 0/0 84.3, 0.1/0.1 83.9",
     ["knn"], [("relation", "student_dp0"), ("relation", "teacher_dp01")], "better", {"relation": "dp 0/0.1"}),
    ("(5) an MAE auxiliary loss adds nothing", "75% masked 83.9, masked + MAE loss 84.0",
     ["knn"], [("masked_mae", "masked")], "no gain", {}),
    ("(6) sequential distillation beats distilling the small student directly",
     "ViT-T from MAE-B 74.4, via TinyMIM-S 75.0; ViT-S from MAE-L 82.1, via TinyMIM-B 82.6",
     ["finetune", "knn"], [("sequential", "relation")], "better", {"relation": "direct"}),
]


def study(args, train: Path) -> list[StageConfig]:
    pairing = teacher_pairing(args.teacher)
    small = shape("student", *args.small)
    budget = [f"data.subset={args.pretrain_images}", f"train.epochs={args.pretrain_epochs}", "train.warmup_epochs=0.2"]
    pre, fine = [], []
    for seed in args.seeds:
        for arm, (label, extra) in ARMS.items():
            common = dict(task="distill", config="cifar10/distill_micro", label=f"{label}, seed {seed}")
            if arm == "sequential":  # the medium student first, from the same teacher; then the small from it
                pre.append(StageConfig(name=f"medium_s{seed}", **{**common, "label": f"medium student, seed {seed}"},
                                       overrides=[*shape("student", *args.medium), *pairing, *budget,
                                                  f"train.seed={seed}"]))
                pre.append(StageConfig(name=f"{arm}_s{seed}", teacher=f"medium_s{seed}", **common, overrides=[
                    *small, f"teacher.target_block={args.medium[1]}", f"teacher.relation_heads={args.medium[2]}",
                    *budget, f"train.seed={seed}"]))
            else:
                pre.append(StageConfig(name=f"{arm}_s{seed}", **common,
                                       overrides=[*small, *pairing, *extra, *budget, f"train.seed={seed}"]))
        for arm in FINETUNED:
            fine.append(StageConfig(
                name=f"finetune_{arm}_s{seed}", task="finetune", config="cifar10/finetune_short", init=f"{arm}_s{seed}",
                label=f"fine-tuned: {ARMS[arm][0]}, seed {seed}",
                overrides=[*shape("model", *args.small), f"data.val_root={args.test}",
                           f"data.subset={args.finetune_images}", f"train.epochs={args.finetune_epochs}",
                           f"train.seed={seed}"]))
    return pre + fine


def knn_scores(args, train: Path, test: Path, names: list[str]) -> dict[str, float]:
    """k-NN top-1 of the named pre-trained students (cached in each run directory as knn.json); with
    --shard, this process scores its share of those not cached yet."""
    scores = {}
    index, count = args.shard
    for i, name in enumerate(names):
        run = args.out / name
        if not (run / "knn.json").is_file() and (i % count != index or not (run / "student.safetensors").is_file()):
            continue
        block = args.medium[1] if name.startswith("medium_") else args.small[1]
        scores[name] = cached_knn(run, train, test, block, args.workers, args.knn_bank)
    return scores


def verdict(better: list[float], other: list[float]) -> tuple[str, float, float]:
    """yes / no / within noise: the paper's better arm leads (trails) by more than twice the standard
    error of the difference of the means (seeds independent); else within noise."""
    gap = statistics.mean(better) - statistics.mean(other)
    se = math.sqrt(statistics.variance(better) / len(better) + statistics.variance(other) / len(other)) \
        if min(len(better), len(other)) > 1 else 0.0
    return ("yes" if gap > 2 * se else "no" if gap < -2 * se else "within noise"), gap, se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10", help="folder with train.tar and test.tar")
    ap.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "cifar10_mae_vit192x6",
                    help="an MAE teacher's run directory (config.yaml + encoder.safetensors)")
    ap.add_argument("--out", type=Path, default=Path("runs/findings"))
    ap.add_argument("--table", type=Path, default=Path("docs/results/findings.md"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--small", type=int, nargs=3, default=[48, 4, 2], metavar=("WIDTH", "DEPTH", "HEADS"),
                    help="the student of every arm (its width must divide by the teacher's heads)")
    ap.add_argument("--medium", type=int, nargs=3, default=[96, 6, 3], metavar=("WIDTH", "DEPTH", "HEADS"),
                    help="finding 6's intermediate student (its width must divide by the teacher's heads, "
                         "the small student's by its own)")
    ap.add_argument("--pretrain-images", type=int, default=10000)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--finetune-images", type=int, default=10000)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--knn-bank", type=int, default=5000, help="k-NN bank: a fixed random sample (0: all 50,000)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shard", type=lambda v: tuple(map(int, v.split("/"))), default=(0, 1), metavar="I/N")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    train, test = extract(args.data, args.out / "data")
    args.test = test
    stages = study(args, train)
    common = ["train.progress=false", "data.name=folder", f"data.root={train}", f"data.num_workers={args.workers}"]
    start = time.perf_counter()
    summaries = run_pipeline(PipelineConfig(overrides=common, stages=stages), args.out, report=False, shard=args.shard)
    # every pre-trained student, the medium ones too (finding 6)
    knn = knn_scores(args, train, test, [s.name for s in stages if s.task == "distill"])
    if args.shard[1] > 1:
        return
    wall = (time.perf_counter() - start) / 60
    total = sum(s["record"].get("seconds", 0) for s in summaries) / 60  # the plain run: every stage's record

    def scores(arm: str, metric: str) -> list[float]:
        if metric == "knn":
            return [knn[f"{arm}_s{s}"] for s in args.seeds if f"{arm}_s{s}" in knn]
        return [stage_result("finetune", args.out / f"finetune_{arm}_s{s}")["top1"] for s in args.seeds]

    rows = []
    for title, paper, metrics, pairs, kind, names in FINDINGS:
        short = {**SHORT, **names}
        cells, calls, overall = [], [], []
        for metric in metrics:
            name = "fine-tuned" if metric == "finetune" else "k-NN"
            arms = dict.fromkeys(a for pair in pairs for a in pair)
            cells.append(f"{name}: " + ", ".join(f"{short[a]} {mean_std(scores(a, metric))}" for a in arms))
            for better, other in pairs:
                v, gap, se = verdict(scores(better, metric), scores(other, metric))
                if kind == "no gain":  # holds unless the extra loss leads by more than the noise
                    v = "no" if v == "yes" else "yes"
                overall.append(v)
                calls.append(f"{name}, {short[better]} - {short[other]}: {gap:+.2f} (2 s.e. {2 * se:.2f}) → {v}")
        holds = "no" if "no" in overall else "yes" if set(overall) == {"yes"} else "within noise"
        if kind == "no gain":
            holds = "no" if "no" in overall else "yes"
        rows.append(f"| {title} | {paper} | {'<br>'.join(cells)} | **{holds}**<br>{'<br>'.join(calls)} |")
    def final_loss(arm: str) -> str:
        losses = []
        for seed in args.seeds:
            steps = read_metrics(args.out / f"{arm}_s{seed}")[0]
            if steps:
                losses.append(steps[-1]["loss"])
        return f"{statistics.mean(losses):.4f}" if losses else "–"

    per_seed = []
    labels = {**{a: label for a, (label, _) in ARMS.items()},
              "medium": f"finding 6's medium student ({args.medium[0]} wide, {args.medium[1]} blocks), "
                        "from the teacher"}
    for arm, label in labels.items():
        k = scores(arm, "knn")
        f = scores(arm, "finetune") if arm in FINETUNED else []
        per_seed.append(f"| {arm} | {label} | {final_loss(arm)} | " + " / ".join(f"{v:.2f}" for v in k)
                        + f" | {mean_std(k)} | "
                        + (" / ".join(f"{v:.2f}" for v in f) + f" | {mean_std(f)} |" if f else "– | – |"))
    per_seed_header = ("| arm | setting | final distillation loss (mean) | k-NN top-1 per seed | k-NN mean ± std "
                       "| fine-tuned top-1 per seed | fine-tuned mean ± std |")
    teacher = teacher_model(args.teacher)
    command = "python benchmarks/experiments/findings.py " + " ".join([
        f"--seeds {' '.join(map(str, args.seeds))}", f"--small {' '.join(map(str, args.small))}",
        f"--medium {' '.join(map(str, args.medium))}", f"--pretrain-images {args.pretrain_images}",
        f"--pretrain-epochs {args.pretrain_epochs}", f"--finetune-images {args.finetune_images}",
        f"--finetune-epochs {args.finetune_epochs}", f"--knn-bank {args.knn_bank}"])
    text = f"""# The article's six findings, measured on CIFAR-10 (micro scale)

Made by `{command}` with the teacher `{args.teacher.name}` on a 2-core CPU ({total:.0f} minutes of
training in all, k-NN scoring not counted; this invocation took {wall:.0f} minutes, reusing finished stages).

- Teacher: MAE ViT {teacher['embed_dim']} wide, {teacher['depth']} blocks, {teacher['num_heads']} heads, patch 4 at
  32 px (its run directory's README gives the `tinymim mae` command). Relations split into its
  {teacher['num_heads']} heads.
- Student of every arm: ViT {args.small[0]} wide, {args.small[1]} blocks, {args.small[2]} heads, MAE init, fixed
  sin-cos position embedding. Finding 6's medium student: {args.medium[0]} wide, {args.medium[1]} blocks,
  {args.medium[2]} heads, distilled from the teacher with the default arm's settings; the small student then
  takes the medium's last-block relations ({args.medium[2]} heads).
- Pre-training: {args.pretrain_epochs} epochs over a fixed random {args.pretrain_images:,} training images, no
  labels, cifar10/distill_micro (batch 256, blr 1e-3, 0.2 warmup epochs, cosine).
- Fine-tuning (findings 1 and 6): {args.finetune_epochs} epochs on {args.finetune_images:,} labelled training
  images, cifar10/finetune_short, scored on the 10,000 test images after the last epoch.
- k-NN (every arm): the frozen student's average patch token entering its last block, k=20, T=0.07,
  a fixed random bank of {args.knn_bank:,} training images, the 10,000 test images as queries.
- Seeds {', '.join(map(str, args.seeds))} per arm (the seed sets initialization, data order and masks).
- Verdict per comparison: "yes" when the arm the paper finds better leads by more than twice the
  standard error of the difference of the means (seeds independent), "no" when it trails by more than
  that, else "within noise"; finding 5 (no gain) holds unless the MAE loss leads by more than that. A
  finding holds when every comparison says yes.

| finding | the paper (ImageNet-1K) | ours: mean ± std over seeds | holds at this scale? |
|---|---|---|---|
{chr(10).join(rows)}

Per seed (k-NN of the medium students reads their block-{args.medium[1]} input; distillation losses
compare only between arms with the same target and input: the relation arms, full or masked):

{per_seed_header}
|---|---|---|---|---|---|---|
{chr(10).join(per_seed)}
"""
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
