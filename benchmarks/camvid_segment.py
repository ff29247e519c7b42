"""CamVid semantic segmentation, TinyMIM backbone vs random init, the same recipe and budget for both:
`tinymim segment --config camvid/segment_micro` for each arm, then the test split through `tinymim eval`.

    python benchmarks/camvid_segment.py --camvid PATH/camvid --init RUN_DIR --out runs/camvid [--steps 1200]

Prints a markdown table (mIoU, mAcc, aAcc, per-class IoU, minutes) for docs/results/camvid_segmentation.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--camvid", required=True, help="the extracted camvid/ folder (images/, annotations/)")
    ap.add_argument("--init", required=True, help="the TinyMIM-distilled backbone (a distill run directory)")
    ap.add_argument("--out", default="runs/camvid")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--train-only", action="store_true", help="only train (the arms run in parallel elsewhere)")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = {}
    for arm, init in (("tinymim", args.init), ("random", "null")):
        run = Path(args.out) / arm
        start = time.time()
        subprocess.run([sys.executable, "-m", "tinymim", "segment", "--config", "camvid/segment_micro",
                        f"data.root={args.camvid}", f"init={init}", f"train.max_steps={args.steps}",
                        "data.num_workers=1", "train.progress=false", "--output", str(run)], check=True, env=env)
        minutes = (time.time() - start) / 60
        if args.train_only:
            continue
        subprocess.run([sys.executable, "-m", "tinymim", "eval", str(run), "--data", args.camvid, "--split", "test",
                        "--workers", "1", "--json", str(run / "test.json")], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        rows[arm] = (json.loads((run / "test.json").read_text()), minutes)
    if not rows:
        return
    classes = list(next(iter(rows.values()))[0]["per_class_iou"])
    print("| backbone | mIoU | mAcc | aAcc | " + " | ".join(classes) + " |")
    print("|---|---|---|---|" + "---|" * len(classes))
    for arm, (r, _) in rows.items():
        print(f"| {arm} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} | "
              + " | ".join(f"{r['per_class_iou'][c]:.1f}" for c in classes) + " |")


if __name__ == "__main__":
    main()
