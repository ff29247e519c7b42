"""Wall time of the commands a user meets first, each in a fresh process (the median of --repeat runs),
against its threshold: `tinymim --help`, `--version` and a config error under 1 s, a hub teacher that
cannot be fetched under 5 s. Also `import torch` and `import timm`, what every command paid before the
task modules were imported lazily. Nothing is written but a scratch folder, removed at the end.

    python benchmarks/speed/startup.py [--repeat 5] [--before SRC]

--before SRC also times another source tree (its `src` folder, e.g. an older commit's from
`git archive COMMIT src | tar -x -C /tmp/old`), run alternately with this one under the same load.

The hub case points HF_ENDPOINT at a local port nothing listens on (refused at once) and HF_HUB_CACHE at
an empty folder; --real-hub leaves both alone (offline, DNS fails as it does).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYMIM = [sys.executable, "-m", "tinymim"]
HUB_TEACHER = "teacher.checkpoint=hf-hub:timm/vit_small_patch16_224.augreg_in21k"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases(out: str) -> list[tuple[str, list[str], float]]:
    """(label, command, threshold in seconds)."""
    return [
        ("tinymim --help", [*TINYMIM, "--help"], 1.0),
        ("tinymim --version", [*TINYMIM, "--version"], 1.0),
        ("a recipe that does not exist", [*TINYMIM, "distill", "--config", "nosuch", "--output", out], 1.0),
        ("an unknown key", [*TINYMIM, "distill", "--output", out, "nosuch.key=1"], 1.0),
        ("a value of the wrong type", [*TINYMIM, "distill", "--config", "cifar10/distill_micro", "--output", out,
                                       "train.epochs=abc"], 1.0),
        ("a hub teacher, offline", [*TINYMIM, "distill", "--config", "cifar10/distill_micro", "--output", out,
                                    HUB_TEACHER], 5.0),
        ("(reference) import torch", [sys.executable, "-c", "import torch"], float("nan")),
        ("(reference) import timm", [sys.executable, "-c", "import timm"], float("nan")),
    ]


def wall(cmd: list[str], env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    first = (r.stderr or r.stdout).strip().splitlines()
    return time.perf_counter() - start, r.returncode, first[0][:70] if first else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--real-hub", action="store_true", help="leave HF_ENDPOINT and HF_HUB_CACHE as they are")
    ap.add_argument("--before", metavar="SRC", help="also time the package in this src folder (PYTHONPATH)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tinymim-startup-"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not args.real_hub:
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HUB_CACHE=str(scratch / "hub-cache"))
    before_env = dict(env, PYTHONPATH=str(Path(args.before).resolve())) if args.before else None
    failed = []
    try:
        print(f"{'command':<30} {'median s':>8} {'max s':>6} {'limit s':>7}  rc  first line"
              + ("  | before: median s, max s" if before_env else ""))
        for label, cmd, limit in cases(str(scratch / "run")):
            runs, before = [], []
            for _ in range(args.repeat):  # alternately, so that both see the same load
                runs.append(wall(cmd, env))
                if before_env is not None and not label.startswith("(reference)"):
                    before.append(wall(cmd, before_env)[0])
            times = [t for t, _, _ in runs]
            median = statistics.median(times)
            verdict = "" if limit != limit else ("ok" if median < limit else "SLOW")
            if verdict == "SLOW":
                failed.append(label)
            then = f"  | {statistics.median(before):6.2f} {max(before):6.2f}" if before else ""
            print(f"{label:<30} {median:8.2f} {max(times):6.2f} {limit:7.1f}  {runs[0][1]:>2}  {runs[0][2]:<70}"
                  f"  {verdict}{then}")
        written = sorted(p.name for p in scratch.iterdir() if p.name != "hub-cache")
        print(f"written by the failing commands: {written or 'nothing'}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if failed:
        print(f"over the limit: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
