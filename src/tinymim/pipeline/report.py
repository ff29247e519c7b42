"""The end of a pipeline: DIR/report.md (a table of every stage's results beside the paper's numbers),
DIR/report.json (the same per stage, machine-readable: task, final and best metrics, minutes) and plots
under DIR/plots/: pre-training loss curves, fine-tuning accuracy curves and final top-1 bars."""
from __future__ import annotations

import json
import math
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
    """`text` with every absolute local path made portable: a report is read on other machines (and may
    be published), so it names no local folders. A path inside the report's folder (a stage's run) becomes
    relative to it; any other (a teacher checkpoint, the data) is named by its last part only."""
    home = Path(out).resolve()

    def local(m) -> str:
        path = Path(m.group(0))
        return os.path.relpath(path, home) if path.is_relative_to(home) else path.name

    return ABSOLUTE_PATH.sub(local, text)


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def _pyplot():
    import matplotlib  # lazy: start-up time (about 0.5 s) for plots only; Agg is chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _span(values, pad: float, least: float) -> tuple[float, float]:
    """(low, high) around the values: their range widened by `pad` of it (at least `least`) on each side,
    so that an axis starts where the data does instead of at 0."""
    low, high = min(values), max(values)
    margin = max((high - low) * pad, least)
    return low - margin, high + margin


def _legend_below(fig, ax, count: int) -> None:
    """The axes' legend under the figure's plots, never over the curves (the constrained layout makes room)."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=1 if count > 3 else count,
               fontsize=8, frameon=False)


def loss_figure(series: dict[str, list[dict]]):
    """Training loss per logged step against epoch, one line per stage (points marked when few); x from the
    first logged epoch to the last, y over the losses' range, on a log scale only when it spans more than
    a factor 20."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    epochs = [r["epoch"] for steps in series.values() for r in steps]
    losses = [r["loss"] for steps in series.values() for r in steps]
    for name, steps in series.items():
        ax.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], label=name,
                marker="o" if len(steps) <= 30 else None, markersize=3)
    log = min(losses) > 0 and max(losses) / min(losses) > 20
    if log:
        ax.set_yscale("log")
        low, high = min(losses), max(losses)
        ax.set_ylim(low / (high / low) ** 0.04, high * (high / low) ** 0.04)
        # plain numbers; between the powers of ten, 2 and 5 (and 3 within one decade): no crowded labels
        digits = {2, 3, 5} if high / low < 10 else {2, 5} if high / low <= 100 else set()
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in digits else ""))
    else:
        ax.set_ylim(*_span(losses, 0.05, 1e-3 * max(abs(v) for v in losses) or 1e-3))
    ax.set_xlim(*_span(epochs, 0.02, 0.5 if max(epochs) == min(epochs) else 0))
    ax.set(xlabel="epoch", ylabel="training loss" + (" (log scale)" if log else ""), title="pre-training losses")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, len(series))
    return fig


def accuracy_figure(curves: dict[str, list[dict]], finals: dict[str, float]):
    """Validation top-1 against epoch per run (when a run was evaluated more than once) beside each run's
    final top-1 as a dot on an axis around the values (bars from 0 would hide a point's difference)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    colours = {name: f"C{i % 10}" for i, name in enumerate([*finals, *(n for n in curves if n not in finals)])}
    if any(len(evals) > 1 for evals in curves.values()):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
        tops = [e["val_top1"] for evals in curves.values() for e in evals]
        epochs = [e["epoch"] for evals in curves.values() for e in evals]
        for name, evals in curves.items():
            left.plot([e["epoch"] for e in evals], [e["val_top1"] for e in evals], marker="o", markersize=4,
                      label=name, color=colours[name])
        left.set_xlim(*_span(epochs, 0.03, 0.5 if max(epochs) == min(epochs) else 0))
        left.set_ylim(*_span(tops, 0.08, 0.5))
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation top-1 while fine-tuning")
        left.grid(alpha=0.3)
        _legend_below(fig, left, len(curves))
    else:  # each run evaluated once (eval_every): no curve to draw, the dots say it all
        fig, right = plt.subplots(figsize=(7, 0.6 + 0.55 * len(finals) + 0.6), layout="constrained")
    names = list(finals)  # long stage labels wrapped, so that the axis keeps its width
    values = [finals[n] for n in names]
    rows = range(len(names))
    right.hlines(rows, *_span(values, 0.25, 0.5)[:1], values, color="0.8", linewidth=1)
    right.scatter(values, rows, s=50, c=[colours[n] for n in names], zorder=3)  # each run's colour, as on the left
    for row, value in zip(rows, values):
        right.annotate(f"{value:.2f}", (value, row), xytext=(7, 0), textcoords="offset points", va="center",
                       fontsize=9)
    right.set_yticks(list(rows), [textwrap.fill(n, 30) for n in names], fontsize=9)
    right.set_ylim(len(names) - 0.5, -0.5)
    right.set_xlim(*_span(values, 0.25, 0.5))
    right.set(xlabel="final top-1 (%)", title="fine-tuned top-1 (last evaluation)")
    right.grid(axis="x", alpha=0.3)
    return fig


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_losses(series: dict[str, list[dict]], path: Path) -> None:
    _save(loss_figure(series), path)


def plot_accuracy(curves: dict[str, list[dict]], finals: dict[str, float], path: Path) -> None:
    _save(accuracy_figure(curves, finals), path)


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
