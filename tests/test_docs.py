"""The README and docs/ as a new user meets them: every link and every repository path they name exists,
the README stays a first page, and every ```bash block runs, shrunk where it must be.

How a block is run is said by an HTML comment on the line above it (no comment: `run`):

    <!-- test: run -->                 run as written
    <!-- test: shrink K=V T:K=V ... --> run, with K=V appended to every training command (tinymim distill,
                                       mae, finetune, linprobe, segment, pipeline) and T:K=V to task T's
                                       only; `tinymim demo` runs shrunk_demo() below (a few steps, few images);
                                       `tinymim eval` gets a --limit, `tinymim knn` a --bank-size
    <!-- test: config -->              not run (ImageNet, GPUs): torchrun's arguments are parsed by torchrun's
                                       own parser, tinymim's by its CLI parser, and the task's config (every
                                       stage's, for a pipeline) is resolved as a run would resolve it
    <!-- test: install -->             `pip install -e ".[EXTRAS]"`: the extras exist and tinymim is installed
    <!-- test: skip REASON -->         not run, for the reason given (shown by pytest -rs)

The blocks run in reading order (README, then docs/ pages in DOC_ORDER) in one workspace that looks like a
checkout: the repository's files linked in, `../shared` beside it, `runs/` and `data/` written inside it
(a temp dir), so a page may build on the runs of the pages before it, as a reader following them would.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
CIFAR = SHARED / "cifar10" / "train.tar"
CAMVID = SHARED / "camvid" / "camvid.tar"
# reading order: the README, then the pages a newcomer opens from it
DOC_ORDER = ["configuration.md", "data.md", "method.md", "evaluation.md", "export.md", "segmentation.md",
             "code.md", "reliability.md"]
TRAINING = ("distill", "mae", "finetune", "linprobe", "segment", "pipeline")
# what every shrunk command also gets, so no evaluation reads a whole test split
EVAL_LIMIT = {"finetune": "eval_limit=64", "linprobe": "eval_limit=64", "segment": "eval_limit=2"}
EVAL_FLAG = ["--limit", "16"]  # tinymim eval's
# tinymim paths named in the pages: `src/...`, `recipes/...`, ... (placeholders such as <layer> aside)
REPO_PATH = re.compile(r"`((?:src|recipes|docs|benchmarks|tests|examples)/[^`\s<>{}*]*)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BLOCK = re.compile(r"(?:<!-- test: (?P<directive>[^\n]*?) -->\n)?[ \t]*```bash\n(?P<body>.*?)```", re.S)


def pages() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    ordered = [ROOT / "docs" / name for name in DOC_ORDER if (ROOT / "docs" / name).is_file()]
    return [ROOT / "README.md", *ordered, *[p for p in docs if p not in ordered], ROOT / "benchmarks" / "README.md"]


def blocks() -> list[tuple[Path, int, str, str]]:
    """(page, line, directive, body) of every ```bash block, in reading order."""
    found = []
    for page in pages():
        text = page.read_text()
        for m in BLOCK.finditer(text):
            found.append((page, text.count("\n", 0, m.start("body")), (m.group("directive") or "run").strip(),
                          m.group("body")))
    return found


def logical_lines(body: str) -> list[str]:
    """A block's commands: continued lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(line.split(" #")[0].rstrip() if " #" in line else line.rstrip())
    return lines


# --- links and paths ---------------------------------------------------------------------------------

def test_readme_is_a_first_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/"
    headings = [line for line in lines if line.startswith("## ")]
    for topic in ("Install", "demo", "own images", "Tests", "torchrun", "Documentation"):
        assert any(topic in h for h in headings), f"the README has no section on {topic}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_resolve(page):
    text = page.read_text()
    dead = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            dead.append(f"link {target}")
    for named in REPO_PATH.findall(text):
        if not (ROOT / named).exists():
            dead.append(f"path `{named}`")
    assert dead == [], f"{page.relative_to(ROOT)} names what the repository does not hold: {dead}"


def test_the_dead_link_check_can_fail(tmp_path):
    """The two checks above, on a page with one good and one dead link and path (they are not vacuous)."""
    text = "[ok](README.md) [gone](docs/nowhere.md) `src/tinymim/cli.py` `src/tinymim/nowhere.py`"
    links = [t for t in LINK.findall(text) if not (ROOT / t).exists()]
    paths = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    assert links == ["docs/nowhere.md"] and paths == ["src/tinymim/nowhere.py"]


def test_no_reference_outside_the_repository():
    """The method reference the code cites is docs/method.md, not a file beside the repository."""
    cites = [f"{p.relative_to(ROOT)}" for folder in ("src", "tests", "benchmarks", "docs", "examples")
             for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh")
             and p != Path(__file__) and "TINYMIM.md" in p.read_text(errors="replace")]
    assert cites == []
    assert "## 2. Relation distillation" in (ROOT / "docs" / "method.md").read_text()


def test_every_bash_block_says_how_it_is_tested():
    known = ("run", "shrink", "config", "install", "skip")
    for page, line, directive, _ in blocks():
        assert directive.split()[0] in known, f"{page.name}:{line}: unknown test directive {directive!r}"
        if directive.startswith("skip"):
            assert len(directive.split()) > 2, f"{page.name}:{line}: a skipped block says why"
    assert all(d.split()[0] != "run" or "torchrun" not in b for _, _, d, b in blocks())


def test_pipeline_report_names_no_local_folder(tmp_path):
    """report.md and report.json name no local folder: a path inside the report's folder is written relative
    to it, any other by its last part only; URLs stay."""
    from tinymim.pipeline.planning import load
    from tinymim.pipeline.report import write_report

    cfg = load("pipelines/demo")
    shared = (tmp_path / "shared" / "train.tar").resolve()
    cfg.command_line = [f"data.root={shared}", "distill:teacher.checkpoint=/ckpt/mae_pretrain_vit_base.pth",
                        "data.val_root=https://host/data/val"]
    out = tmp_path / "runs" / "demo"
    cfg.notes = [f"made from {shared.parent}", f"student in {out / 'student'}"]
    out.mkdir(parents=True)
    report = write_report(cfg, out).read_text() + (out / "report.json").read_text()
    assert str(tmp_path) not in report and "/ckpt" not in report and "../" not in report
    assert "data.root=train.tar" in report and "teacher.checkpoint=mae_pretrain_vit_base.pth" in report
    assert "student in student" in report and "https://host/data/val" in report


# --- running the blocks ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder that looks like a checkout to the commands (the repository's files linked in, ../shared
    beside it), written to instead of the repository."""
    base = tmp_path_factory.mktemp("newcomer")
    repo = base / "repo"
    repo.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in ("src", "recipes", "tests", "benchmarks", "docs", "examples", "pyproject.toml",
                          "README.md"):
            (repo / entry.name).symlink_to(entry)
    (base / "shared").symlink_to((ROOT / ".." / "shared").resolve())
    return repo


@functools.cache
def eval_flag_known() -> bool:
    from tinymim.cli import build_parser

    return not build_parser().parse_known_args(["eval", "RUN", "--data", "DIR", *EVAL_FLAG])[1]


@functools.cache
def eval_limits() -> dict[str, str]:
    """EVAL_LIMIT's overrides for the tasks whose config has the key (a speed-up only: no block's result
    depends on it; shrunk `tinymim eval` lines get EVAL_FLAG the same way)."""
    from tinymim.core.config import ConfigError
    from tinymim.tasks import load_config

    known = {}
    for task, item in EVAL_LIMIT.items():
        try:
            load_config(task, None, [item])
        except ConfigError:
            continue
        known[task] = item
    return known


def shrunk(line: str, overrides: list[str]) -> str:
    """A training command with the shrink overrides (and the evaluation limit) appended."""
    words = shlex.split(line)
    if words[:2] == ["tinymim", "demo"]:
        return f"{shlex.quote(sys.executable)} tests/test_docs.py shrunk-demo {shlex.join(words[2:])}"
    if words[:2] == ["tinymim", "eval"] and eval_flag_known():
        return f"{line} {shlex.join(EVAL_FLAG)}"
    if words[:2] == ["tinymim", "knn"] and "--bank-size" not in words:
        return f"{line} --bank-size 256"  # a sample of the bank: the same command, a fraction of the features
    if words[0] != "tinymim" or len(words) < 2 or words[1] not in TRAINING:
        return line
    task = words[1]
    extra = []
    for item in overrides:
        prefix, _, rest = item.partition(":")
        if rest and "=" not in prefix:
            if prefix == task or task == "pipeline":
                extra.append(item if task == "pipeline" else rest)
        else:
            extra.append(item)
    limits = eval_limits()
    if task == "pipeline":
        extra += [f"{t}:{kv}" for t, kv in limits.items()]
    elif task in limits:
        extra.append(limits[task])
    return f"{line} {shlex.join(extra)}"


def check_config(line: str, workspace: Path) -> None:
    """A command that needs ImageNet or GPUs, checked without running: torchrun's and tinymim's arguments
    parsed by their own parsers, the config resolved (a pipeline: every stage's)."""
    from tinymim.cli import build_parser
    from tinymim.tasks import load_config

    words = shlex.split(line)
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(words[1:])
        assert launch.module and launch.training_script == "tinymim", line
        words = ["tinymim", *launch.training_script_args]
    assert words[0] == "tinymim", f"not a tinymim command: {line}"
    args = build_parser().parse_args(words[1:])
    if args.command == "pipeline":
        from tinymim.pipeline.planning import load, plan

        cfg = load(args.config)
        cfg.command_line = list(args.overrides)
        assert plan(cfg, workspace / args.output), line
    else:
        load_config(args.command, args.config, args.overrides)


def check_install(line: str) -> None:
    import tomllib  # Python 3.11+: the install check only
    from importlib.metadata import version

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    m = re.fullmatch(r'pip install -e "\.\[([a-z,]+)\]"', line.strip())
    assert m, f"not the install line the test knows: {line}"
    assert set(m.group(1).split(",")) <= set(extras), line
    assert version("tinymim")


def block_ids():
    return [f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in blocks()]


@pytest.mark.slow  # every command a newcomer reads, in order, shrunk: a few minutes on 2 cores
@pytest.mark.parametrize("page,line,directive,body", blocks(), ids=block_ids())
def test_command_block_runs(page, line, directive, body, workspace):
    kind, _, rest = directive.partition(" ")
    if kind == "skip":
        pytest.skip(rest)
    commands = logical_lines(body)
    if kind == "install":
        for command in commands:
            check_install(command)
        return
    if kind == "config":
        for command in commands:
            check_config(command, workspace)
        return
    if not CIFAR.is_file():
        pytest.skip(f"CIFAR-10 tars not found at {SHARED / 'cifar10'}: the pages' commands read them")
    if "camvid" in body and not CAMVID.is_file():
        pytest.skip(f"CamVid not found at {CAMVID}")
    overrides = rest.split() if kind == "shrink" else []
    script = "\n".join(shrunk(c, overrides) if kind == "shrink" else c for c in commands)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TINYMIM_CACHE": str(workspace.parent / "cache"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (f"{page.relative_to(ROOT)}:{line} failed (exit {done.returncode}):\n{script}\n"
                                  f"--- output ---\n{(done.stdout + done.stderr)[-4000:]}")


def shrunk_demo(argv: list[str]) -> None:
    """`tinymim demo ARGS` cut to a few steps on a few images (the full demo takes 10 minutes)."""
    import argparse

    from tinymim.pipeline import demo

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--output", default="runs/demo")
    args = parser.parse_args(argv)
    demo.PRETRAIN_IMAGES, demo.FINETUNE_IMAGES = 96, 64
    limit = eval_limits().get("finetune")
    if limit:  # the fine-tuning stages score a sample of the test split, not all of it
        load = demo.load

        def load_with_limit(name):
            cfg = load(name)
            cfg.task_overrides["finetune"] = [*cfg.task_overrides.get("finetune", []), limit]
            return cfg
        demo.load = load_with_limit
    report = demo.run_demo(args.output, data=args.data, progress=False,
                           overrides=["train.max_steps=2", "train.batch_size=16"])
    print(report.read_text())


if __name__ == "__main__" and sys.argv[1:2] == ["shrunk-demo"]:
    shrunk_demo(sys.argv[2:])
