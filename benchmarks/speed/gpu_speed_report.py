"""gpu_speed.sh's report: its parts' outputs in OUT assembled into one JSON (OUT/gpu_speed.json, every
number) and one markdown page (OUT/gpu_speed.md, the tables for docs/results/gpu_speed.md).

Reads, each when present (a part that timed out or failed is reported as missing):
- OUT/step.json:   gpu_throughput.py (step arms beside the release-equivalent step, MFU, peak memory);
- OUT/loader.json: jpeg_loader_throughput.py (views/s per path and per loader core, the draft study);
- OUT/train/:      the `tinymim distill` run (config.yaml and metrics.jsonl): images/s and the time the
                   step waited for the loader (loader_wait_s) as a fraction of the wall time;
- OUT/env.txt:     the machine (GPU, cores, versions).

    python benchmarks/speed/gpu_speed_report.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

STEP_TARGET, MFU_TARGET, WAIT_TARGET = 2.5, 0.50, 0.05  # the bars: x release, MFU, loader wait


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training(run: Path) -> dict | None:
    """The distill run's windows: images/s, loader wait and its fraction of each window's wall time
    (window seconds = its images / images_per_s). The first window (step 1: compilation, start-up)
    is reported apart; `steady` is the rest."""
    try:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, ValueError):
        return None
    batch = config["train"]["batch_size"]
    windows, previous = [], 0
    for m in metrics:
        if "loss" not in m or "loader_wait_s" not in m:
            continue
        images = (m["step"] - previous) * batch
        wall = images / m["images_per_s"]
        windows.append({"step": m["step"], "steps": m["step"] - previous, "images_per_s": m["images_per_s"],
                        "wall_s": wall, "loader_wait_s": m["loader_wait_s"],
                        "wait_fraction": m["loader_wait_s"] / wall})
        previous = m["step"]
    if not windows:
        return None
    steady = windows[1:] or windows
    wall = sum(w["wall_s"] for w in steady)
    wait = sum(w["loader_wait_s"] for w in steady)
    steps = sum(w["steps"] for w in steady)
    return {"batch": batch, "steps": windows[-1]["step"], "decode": config["data"]["decode"],
            "prefetch": config["data"].get("prefetch"), "compile": config["train"]["compile"],
            "compile_mode": config["train"].get("compile_mode"), "workers": config["data"]["num_workers"],
            "first_window": windows[0], "steady_images_per_s": steps * batch / wall, "steady_wall_s": wall,
            "steady_loader_wait_s": wait, "steady_wait_fraction": wait / wall,
            "worst_window_wait_fraction": max(w["wait_fraction"] for w in steady), "windows": windows}


def assemble(out: Path) -> dict:
    env = (out / "env.txt").read_text().strip() if (out / "env.txt").is_file() else None
    return {"env": env, "step": read_json(out / "step.json"), "loader": read_json(out / "loader.json"),
            "train": training(out / "train")}


def fmt(x, spec=",.0f", missing="-"):
    return missing if x is None else format(x, spec)


def markdown(report: dict) -> str:
    lines = ["# gpu_speed.sh", ""]
    if report["env"]:
        lines += ["```", report["env"], "```", ""]
    step = report["step"]
    lines += ["## Step arms (gpu_throughput.py)", ""]
    if not step or "summary" not in step:
        lines += ["missing: the step measurement did not finish (see gpu_throughput.log)", ""]
    else:
        from gpu_throughput import markdown as step_table

        lines += [f"bf16 matmul peak {step['peak_bf16_flops'] / 1e12:.0f} TFLOP/s, "
                  f"{step['flops_per_image'] / 1e9:.2f} GFLOP per image (tinymim's step; the release's "
                  f"{step['release_flops_per_image'] / 1e9:.2f})", "", step_table(step), ""]
        best = max((r for r in step["summary"] if r["batch"] and r["arm"] != "release"),
                   key=lambda r: r["images_per_s"], default=None)
        if best and best["vs_release_best"]:
            ok = best["vs_release_best"] >= STEP_TARGET and best["mfu"] >= MFU_TARGET
            lines += [f"Fastest arm: {best['arm']} at batch {best['batch']}, {best['vs_release_best']:.2f}x the "
                      f"release-equivalent step, {100 * best['mfu']:.1f}% MFU: {'meets' if ok else 'misses'} the "
                      f"bar ({STEP_TARGET}x and {100 * MFU_TARGET:.0f}%).", ""]
    loader = report["loader"]
    lines += ["## Loader (jpeg_loader_throughput.py)", ""]
    if not loader:
        lines += ["missing: the loader measurement did not finish", ""]
    else:
        rate = loader.get("step_rate")
        lines += [f"{loader['images']} generated JPEGs ({fmt(loader.get('mean_kib'))} KiB mean), {loader['workers']} "
                  f"workers, batch {loader['batch']}, {loader['img_size']}px paired views ready on "
                  f"{loader['device']}, each path alone; the step to feed: {fmt(rate)} images/s", "",
                  "| path | views/s | views/s per loader core | sustains the step? |", "|---|---|---|---|"]
        for path, r in loader["paths"].items():
            if not isinstance(r, dict):
                lines.append(f"| {path} | {r} | | |")
                continue
            keeps = "-" if rate is None else ("yes" if r["views_per_s"] >= rate else
                                              f"no ({100 * r['views_per_s'] / rate:.0f}%)")
            lines.append(f"| {path} | {r['views_per_s']:,.0f} | {r['views_per_s_per_worker']:,.0f} | {keeps} |")
        lines.append("")
        study = loader.get("draft_study")
        if study:
            lines += ["Pillow on one core, exact vs `data.jpeg_draft=true` (CPU time per view):", "",
                      "| images | exact views/s | drafted views/s | speed-up | views drafted | mean abs diff (levels) "
                      "| worst view | PSNR |", "|---|---|---|---|---|---|---|---|"]
            for name, r in study.items():
                lines.append(f"| {name} | {r['exact_views_per_s_per_core']:,.0f} | "
                             f"{r['draft_views_per_s_per_core']:,.0f} | {r['speedup']:.2f}x | "
                             f"{100 * r['drafted_fraction']:.0f}% | "
                             f"{r['mean_abs_diff_levels']:.2f} | {r['max_view_mean_abs_diff_levels']:.2f} | "
                             f"{r['psnr_db']:.1f} dB |")
            lines.append("")
    train = report["train"]
    lines += ["## Training from the JPEGs (`tinymim distill`)", ""]
    if not train:
        lines += ["missing: the training run did not finish", ""]
    else:
        ok = train["steady_wait_fraction"] < WAIT_TARGET
        first = train["first_window"]
        compiled = f"compiled ({train['compile_mode'] or 'default'} mode)" if train["compile"] else "eager"
        lines += [f"{train['steps']} steps of batch {train['batch']}, decode={train['decode']}, prefetch="
                  f"{train['prefetch']}, {compiled}, {train['workers']} loader workers.", "",
                  "| windows | images/s | wall s | loader_wait_s | waited |", "|---|---|---|---|---|",
                  f"| step 1 (start-up, compilation) | {first['images_per_s']:,.1f} | {first['wall_s']:.1f} | "
                  f"{first['loader_wait_s']:.2f} | {100 * first['wait_fraction']:.1f}% |",
                  f"| steps 2-{train['steps']} | {train['steady_images_per_s']:,.0f} | {train['steady_wall_s']:.1f} | "
                  f"{train['steady_loader_wait_s']:.2f} | {100 * train['steady_wait_fraction']:.1f}% (worst window "
                  f"{100 * train['worst_window_wait_fraction']:.1f}%) |", "",
                  f"The step waited for the loader {100 * train['steady_wait_fraction']:.1f}% of the wall time after "
                  f"start-up: {'under' if ok else 'over'} the {100 * WAIT_TARGET:.0f}% bar.", ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    report = assemble(out)
    (out / "gpu_speed.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_speed.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
