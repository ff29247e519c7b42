"""The GPU speed check runs on a CPU in its smoke mode (benchmarks/speed/gpu_speed.sh with SMOKE=1: tiny
models and data), so the one call a GPU gets is known to run; its report is assembled from whatever parts
finished; the scaling projection counts FLOPs as the GPU run counted them."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

SPEED = ROOT / "benchmarks" / "speed"


def test_step_arms_run_in_smoke_mode_beside_the_release_step(tmp_path):
    out = tmp_path / "step.json"
    arms = ["release", "tinymim", "tinymim+inference-teacher", "tinymim+ckpt"]
    r = subprocess.run([sys.executable, "gpu_throughput.py", "--smoke", "--device", "cpu", "--json", str(out),
                        "--arms", *arms], cwd=SPEED, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["arm"]: row for row in result["summary"]}
    assert list(rows) == arms and all(row["batch"] for row in rows.values())
    assert rows["release"]["vs_release_best"] == 1.0 and result["release_best"]["arm"] == "release"
    assert rows["tinymim+ckpt"]["largest_batch_that_fit"] == 32  # the search went through its batches
    # the teacher under inference mode, its outputs cloned: the same step as the plain one
    assert rows["tinymim+inference-teacher"]["batch"] == rows["tinymim"]["batch"] == 8
    plain, inference = (result["arms"][a]["8"]["loss"] for a in ("tinymim", "tinymim+inference-teacher"))
    assert inference == pytest.approx(plain, rel=1e-5)
    assert "| tinymim+inference-teacher | 8 |" in r.stdout


def test_the_report_says_which_parts_are_missing(tmp_path, benchmark_module):
    report = benchmark_module("gpu_speed_report")
    (tmp_path / "env.txt").write_text("no GPU\n2 CPU cores\n")
    run = tmp_path / "train"
    run.mkdir()
    (run / "config.yaml").write_text("data: {decode: device, prefetch: 1, num_workers: 4}\n"
                                     "train: {batch_size: 8, compile: false, compile_mode: null}\n")
    lines = [{"step": 1, "loss": 1.0, "images_per_s": 4.0, "loader_wait_s": 1.0},   # 2 s, start-up
             {"step": 5, "loss": 0.9, "images_per_s": 32.0, "loader_wait_s": 0.05},  # 1 s
             {"step": 9, "loss": 0.8, "images_per_s": 16.0, "loader_wait_s": 0.1}]   # 2 s
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    result = report.assemble(tmp_path)
    assert result["step"] is None and result["loader"] is None
    train = result["train"]
    assert train["first_window"]["wall_s"] == pytest.approx(2.0) and train["steady_wall_s"] == pytest.approx(3.0)
    assert train["steady_wait_fraction"] == pytest.approx(0.15 / 3.0)
    assert train["steady_images_per_s"] == pytest.approx(64 / 3.0)
    text = report.markdown(result)
    assert "missing: the step measurement did not finish" in text and "missing: the loader" in text
    assert "waited for the loader 5.0% of the wall time after start-up: over the 5% bar" in text


@pytest.mark.slow
def test_gpu_speed_script_runs_end_to_end_in_smoke_mode(tmp_path):
    out = tmp_path / "out"
    # the one-line benchmarks/gpu_speed.sh hands over to benchmarks/speed/gpu_speed.sh
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_speed.sh"), str(out)], cwd=tmp_path,
                       env=subprocess_env(SMOKE="1", PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((out / "gpu_speed.json").read_text())
    assert {row["arm"] for row in report["step"]["summary"]} == {"release", "tinymim", "tinymim+inference-teacher",
                                                                 "tinymim+ckpt"}
    paths = report["loader"]["paths"]
    assert set(paths) == {"pillow", "pillow+draft", "device", "device+prefetch"}
    assert all(isinstance(v, dict) and v["views_per_s"] > 0 for v in paths.values()), paths
    assert set(report["loader"]["draft_study"]) == {"imagenet_like", "large"}
    train = report["train"]
    assert train["steps"] == 12 and train["decode"] == "device" and train["prefetch"] == 1
    assert 0 <= train["steady_wait_fraction"]
    text = (out / "gpu_speed.md").read_text()
    for heading in ("## Step arms", "## Loader", "## Training from the JPEGs"):
        assert heading in text
    assert "missing" not in text


def test_scaling_projection_counts_the_measured_step_as_the_gpu_did(tmp_path):
    out = tmp_path / "scaling.json"
    r = subprocess.run([sys.executable, "scaling_projection.py", "--smoke", "--json", str(out)], cwd=SPEED,
                       env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    # the reference step (MAE ViT-B -> ViT-S) counted on this CPU as on the H200 (59.27 GFLOP per image)
    assert result["reference_flops_per_image"] / 1e9 == pytest.approx(59.27, abs=0.01)
    for row in result["recipes"]:
        hours = {int(n): h for n, h in row["gpu_hours"].items() if h is not None}
        assert hours[1]["gpu_hours"] < hours[8]["gpu_hours"] < hours[32]["gpu_hours"]  # efficiency below 1
        assert hours[32]["wall_hours"] < hours[8]["wall_hours"] < hours[1]["wall_hours"]
        assert row["loader_cores_per_gpu"] == pytest.approx(row["compiled_images_per_s"] / (2685 / 16))
