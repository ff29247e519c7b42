"""The end of a pipeline: DIR/report.md (a table of every stage's results beside the paper's numbers),
DIR/report.json (the same per stage, machine-readable: task, final and best metrics, minutes) and plots
under DIR/plots/: pre-training loss curves, fine-tuning accuracy curves and final top-1 bars."""
from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

from tinymim.core.files import write_text
from tinymim.core.rundir import RunDir
from tinymim.tasks import TASKS

CLASSIFY = tuple(name for name, spec in TASKS.items() if spec.kind == "classify")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, evaluation records) of a run's metrics.jsonl."""
    rows = RunDir(run_dir).read_metrics()
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("val_") for k in r)]
    return steps, evals


def stage_result(task: str, run_dir: Path) -> dict:
    """The numbers a report shows for one stage."""
    return summarize(task, *read_metrics(run_dir))


def summarize(task: str, steps: list[dict], evals: list[dict]) -> dict:
    """stage_result from a run's already read (training records, evaluation records)."""
    out: dict = {}
    if steps:
        out["final_loss"] = steps[-1]["loss"]
        out["first_loss"] = steps[0]["loss"]
    if task in CLASSIFY and evals:
        out["top1"] = evals[-1].get("val_top1")
        out["top5"] = evals[-1].get("val_top5")
        out["best_top1"] = evals[-1].get("val_best", out["top1"])
    knn = [e["val_knn_top1"] for e in evals if "val_knn_top1" in e]
    if knn:
        out["knn_top1"] = knn[-1]
    return out


# an absolute local path inside a line of text (not a URL's "//host/..." or a relative "a/b")
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s`'\",;|)\]]+")


def portable(text: str, out: Path) -> str:
    """`text` with every absolute local path made relative to the report's folder: a report is read on
    other machines (and may be published), so it names no local folders."""
    return ABSOLUTE_PATH.sub(lambda m: os.path.relpath(m.group(0), Path(out).resolve()), text)


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def plot_losses(series: dict[str, list[dict]], path: Path) -> None:
    import matplotlib  # lazy: start-up time (about 0.5 s) for plots only; Agg is chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, steps in series.items():
        ax.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], label=name)
    ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="pre-training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(curves: dict[str, list[dict]], finals: dict[str, float], path: Path) -> None:
    import matplotlib  # lazy: start-up time (about 0.5 s) for plots only; Agg is chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(len(evals) > 1 for evals in curves.values()):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name, evals in curves.items():
            left.plot([e["epoch"] for e in evals], [e["val_top1"] for e in evals], marker="o", label=name)
        left.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1 while fine-tuning")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
    else:  # each run evaluated once (eval_every): no curve to draw, the bars say it all
        fig, right = plt.subplots(figsize=(6, 4))
    names = list(finals)  # long stage labels wrapped, so that the bars keep their width
    bars = right.barh([textwrap.fill(n, 30) for n in names], [finals[n] for n in names], color="tab:blue")
    right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.invert_yaxis()
    right.set(xlabel="final top-1 (%)", title="fine-tuned top-1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg, out: str | Path) -> Path:
    """Write DIR/report.md and DIR/plots/*.png for a pipeline config whose stages ran under `out`."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    rows, losses, curves, finals, records = [], {}, {}, {}, []
    for s in cfg.stages:
        run_dir = out / s.name
        record = RunDir(run_dir).read_record() or {}
        steps, evals = read_metrics(run_dir)
        r = summarize(s.task, steps, evals)
        label = s.label or s.name
        teacher_file = ((record.get("config") or {}).get("teacher") or {}).get("checkpoint")
        source = (f"teacher {s.teacher}" if s.teacher else f"teacher {portable(teacher_file, out)}" if teacher_file else
                  f"init {s.init}" if s.init else "random init" if s.task in CLASSIFY else "–")
        if s.task in CLASSIFY:
            result = f"top-1 {_fmt(r.get('top1'))} (best {_fmt(r.get('best_top1'))})"
            if r.get("top1") is not None:
                finals[label] = r["top1"]
                curves[label] = [e for e in evals if "val_top1" in e]
        else:
            result = f"loss {_fmt(r.get('first_loss'), '.4g')} → {_fmt(r.get('final_loss'), '.4g')}"
            if "knn_top1" in r:
                result += f", k-NN {r['knn_top1']:.2f}"
            if steps:
                losses[f"{label} ({s.task})"] = steps
        paper = "; ".join(f"{k} {v}" for k, v in s.paper.items()) if s.paper else ""
        minutes = record.get("seconds", 0) / 60
        rows.append(f"| {label} | {s.task} | {source} | {result} | {paper} | {minutes:.1f} |")
        final = {k: r[k] for k in ("top1", "top5", "final_loss", "knn_top1") if r.get(k) is not None}
        best = {"top1": r["best_top1"]} if r.get("best_top1") is not None else {}
        records.append({"stage": s.name, "label": label, "task": s.task, "from": source, "status": record.get("status"),
                        "final": final, "best": best, "first_loss": r.get("first_loss"), "paper": s.paper,
                        "minutes": round(minutes, 2)})

    pictures = []
    if losses:
        plot_losses(losses, plots / "losses.png")
        pictures.append("![pre-training losses](plots/losses.png)")
    if finals:
        plot_accuracy(curves, finals, plots / "accuracy.png")
        pictures.append("![fine-tuning accuracy](plots/accuracy.png)")

    notes_given = [portable(note, out) for note in getattr(cfg, "notes", [])]
    command_line = [portable(item, out) for item in getattr(cfg, "command_line", None) or []]
    notes = [line for note in notes_given for line in (f"> {note}", ">")][:-1]
    text = [
        "# tinymim pipeline report", "", *notes, *([""] if notes else []),
        f"Written {time.strftime('%Y-%m-%d %H:%M')}; each stage's run directory is `{out.name}/<stage>`.",
        *([f"Command-line overrides, applied last to every stage they name: `{' '.join(command_line)}`."]
          if command_line else []),
        "Top-1 is the last evaluation of the run (best in brackets). Paper numbers are the TinyMIM paper's",
        "ImageNet-1K results for the setting a stage mirrors: comparable only at that scale.", "",
        "| stage | task | from | result | paper | minutes |", "|---|---|---|---|---|---|", *rows, "", *pictures, "",
    ]
    write_text(out / "report.json", json.dumps({"notes": notes_given, "command_line": command_line,
                                                "stages": records}, indent=1))
    path = out / "report.md"
    write_text(path, "\n".join(text))
    return path
