"""CamVid semantic segmentation, the same recipe and budget for every arm: `tinymim segment --config
camvid/segment_micro` for each arm, then the test split through `tinymim eval`. Two comparisons:

  --compare init      TinyMIM backbone (--init) vs random init
  --compare options   the release's backbone options (relative position bias, layer scale 1.0) on vs
                      off, both from the same distilled backbone (--init)

    python benchmarks/experiments/camvid_segment.py --camvid PATH/camvid --init RUN_DIR --out runs/camvid \
        [--compare init] [--steps 1200] [--seeds 0 1]

Each arm runs alone (both cores), one after the other; each run's test metrics and wall time are kept in
OUT/results.jsonl, so an interrupted benchmark keeps what finished. Prints a markdown table (mIoU, mAcc,
aAcc, per-class IoU, minutes) per run and the mean over seeds, for docs/results/camvid_segmentation.md.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = {  # arm name -> the overrides that make it
    "init": lambda init: [("tinymim", [f"init={init}"]), ("random", ["init=null"])],
    "options": lambda init: [("options_on", [f"init={init}", "rel_pos_bias=true", "layer_scale=1.0"]),
                             ("options_off", [f"init={init}", "rel_pos_bias=false", "layer_scale=null"])],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--camvid", required=True, help="the extracted camvid/ folder (images/, annotations/)")
    ap.add_argument("--init", required=True, help="the TinyMIM-distilled backbone (a distill run directory)")
    ap.add_argument("--out", default="runs/camvid")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--compare", choices=["init", "options"], default="init")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["arm"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.exists() else set()
    for seed in args.seeds:
        arms = ARMS[args.compare](args.init)
        for arm, overrides in arms:
            if (arm, seed) in done:
                continue
            run = out / f"{arm}_s{seed}"
            start = time.time()
            subprocess.run([sys.executable, "-m", "tinymim", "segment", "--config", "camvid/segment_micro",
                            f"data.root={args.camvid}", *overrides, f"train.max_steps={args.steps}",
                            f"train.seed={seed}", "train.progress=false", "--output", str(run)], check=True)
            minutes = (time.time() - start) / 60
            subprocess.run([sys.executable, "-m", "tinymim", "eval", str(run), "--data", args.camvid,
                            "--split", "test", "--json", str(run / "test.json")], check=True,
                           stdout=subprocess.DEVNULL)
            row = dict(arm=arm, seed=seed, minutes=round(minutes, 1), **json.loads((run / "test.json").read_text()))
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    classes = list(rows[0]["per_class_iou"])
    print("| backbone | seed | mIoU | mAcc | aAcc | " + " | ".join(classes) + " | train minutes |")
    print("|---|---|---|---|---|" + "---|" * len(classes) + "---|")
    for r in rows:
        print(f"| {r['arm']} | {r['seed']} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} | "
              + " | ".join(f"{r['per_class_iou'][c]:.1f}" for c in classes) + f" | {r['minutes']} |")
    for arm, _ in ARMS[args.compare](args.init):
        m = [r["mIoU"] for r in rows if r["arm"] == arm]
        if m:
            mean = sum(m) / len(m)
            spread = (sum((x - mean) ** 2 for x in m) / max(len(m) - 1, 1)) ** 0.5
            print(f"{arm}: mIoU {mean:.2f} +- {spread:.2f} over {len(m)} seed(s)")


if __name__ == "__main__":
    main()
