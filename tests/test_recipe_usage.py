"""Every recipe's usage comment runs as written: the `#   tinymim ...` / `#   torchrun ... -m tinymim ...`
commands at the top of each shipped recipe (backslash-continued lines joined).

- CIFAR-10 and CamVid commands, and the demo's pipeline, run shrunk (a few steps on a few images, a small
  evaluation), in the order their runs need each other, on the real tars: PATH is ../shared/data, the folder
  holding cifar10/ and camvid/. The tars are extracted into the user's cache (~/.cache/tinymim/tars, or
  $TINYMIM_CACHE/tars) as a user's commands extract them: once, then reused;
- ImageNet and ADE20K commands, and the CIFAR-10 pipelines of many stages (every ablation row: 41; the
  sequential chains: 6), are parsed by torchrun's and tinymim's parsers and their configs resolved as a run
  would (every stage's, for a pipeline), without data or GPUs.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from test_docs import check_config

from tinymim.core.config import RECIPES

RECIPE_FILES = sorted(p for p in RECIPES.glob("*/*.yaml") if not p.name.startswith("_"))  # _base: fragments
USAGE = re.compile(r"^#\s{2,}((?:tinymim|torchrun) .*)$")
# run for real, shrunk; the others are resolved only (ImageNet, ADE20K: data and GPUs this machine lacks)
RUN = ("cifar10/", "camvid/", "pipelines/demo")
TRAINING = ("distill", "mae", "finetune", "linprobe", "segment", "pipeline")
# appended to every command run (the last word wins): two steps of small batches on a few images; fine-tuning
# evaluates on 16 held-out training images unless the config has a key that limits the evaluation split
SHRINK = ["train.max_steps=2", "train.progress=false", "data.num_workers=0"]
SHRINK_TASK = {"mae": ["data.subset=64", "train.batch_size=16"], "distill": ["data.subset=64", "train.batch_size=16"],
               "finetune": ["data.subset=64", "train.batch_size=16"], "segment": ["train.batch_size=2"]}
EVAL_LIMIT = {"finetune": (["eval_limit=16", "data.val_limit=16"], "data.holdout=16"),
              "segment": (["eval_limit=2", "data.val_limit=2"], None)}


def usages(recipe: Path) -> list[str]:
    """The usage commands in a recipe's comments, continued lines joined."""
    lines, out = recipe.read_text().splitlines(), []
    for i, line in enumerate(lines):
        m = USAGE.match(line)
        if not m or (i and lines[i - 1].rstrip().endswith("\\")):
            continue
        command, j = m.group(1).rstrip(), i
        while command.endswith("\\"):
            j += 1
            command = command[:-1].rstrip() + " " + lines[j].lstrip("#").strip()
        out.append(command)
    return out


def tinymim_words(command: str) -> list[str]:
    """The tinymim arguments of a command (torchrun's launch prefix left out)."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = words[words.index("tinymim") + 1:]
        return words
    return words[1:]


def test_every_recipe_says_how_to_run_it():
    """Each recipe has a usage command naming itself (a built-in name: it runs from any folder), with
    nothing after it on its lines but the command."""
    from tinymim.cli import build_parser

    for recipe in RECIPE_FILES:
        name = str(recipe.relative_to(RECIPES).with_suffix(""))
        commands = usages(recipe)
        configs = [build_parser().parse_args(tinymim_words(c)).config for c in commands]
        assert name in configs, f"{name}: no usage command runs it ({commands})"
        for command in commands:
            assert "(" not in command, f"{name}: prose inside a command: {command}"
            assert "PATH" not in command or re.search(r"PATH/(cifar10|camvid)/", command), command


def _ordered(commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(recipe, command) in an order where every run a command reads (runs/... in its words or its
    recipe) was written by an earlier command."""
    def reads(recipe: str, command: str) -> set[str]:
        words = shlex.split(command)
        config = words[words.index("--config") + 1]
        text = " ".join(words) + " " + "\n".join(line for line in (RECIPES / f"{config}.yaml").read_text().splitlines()
                                                  if not line.startswith("#"))
        return set(re.findall(r"runs/[\w./-]+", text))

    def writes(command: str) -> str:
        words = shlex.split(command)
        return words[words.index("--output") + 1]

    outputs = {writes(c) for _, c in commands}
    done: set[str] = set()
    ordered, todo = [], list(commands)
    while todo:
        ready = [(r, c) for r, c in todo if not (reads(r, c) & outputs) - done - {writes(c)}]
        assert ready, f"usage commands that wait for each other: {todo}"
        for item in ready:
            ordered.append(item)
            done.add(writes(item[1]))
            todo.remove(item)
    return ordered


def eval_limit(task: str) -> str | None:
    """The override that shrinks `task`'s evaluation: its config's limit key where it has one."""
    from tinymim.core.config import ConfigError
    from tinymim.tasks import load_config

    limits, fallback = EVAL_LIMIT.get(task, ([], None))
    for limit in limits:
        try:
            load_config(task, None, [limit])
        except ConfigError:
            continue
        return limit
    return fallback


def shrunk(command: str) -> list[str]:
    """A run command's tinymim arguments with PATH filled in and the shrink overrides appended."""
    words = [w.replace("PATH/", f"{SHARED_DATA.resolve()}/") for w in tinymim_words(command)]
    task, extra = words[0], list(SHRINK)
    if task == "pipeline":  # every stage's task
        extra += ["data.subset=64", "train.batch_size=16"]
        extra += [f"{t}:{eval_limit(t)}" for t in EVAL_LIMIT if eval_limit(t)]
    else:
        extra += SHRINK_TASK.get(task, []) + [e for e in [eval_limit(task)] if e]
    return [*words, *extra]


@pytest.mark.slow  # 9 short runs and a 4-stage pipeline on the real CIFAR-10 and CamVid tars
def test_recipe_usage_commands_run_as_written(tmp_path, monkeypatch, capsys):
    for tar in ("cifar10/train.tar", "cifar10/test.tar", "camvid/camvid.tar"):
        if not (SHARED_DATA / tar).is_file():
            pytest.skip(f"real data not present: {SHARED_DATA / tar} (the shared data folder beside the project)")
    from tinymim.cli import main

    monkeypatch.chdir(tmp_path)  # runs/ is written here, as a user's working folder
    commands, seen = [], set()
    for recipe in RECIPE_FILES:
        name = str(recipe.relative_to(RECIPES).with_suffix(""))
        for command in usages(recipe):
            if command not in seen:
                seen.add(command)
                commands.append((name, command))
    for name, command in _ordered(commands):
        words = tinymim_words(command)
        if not name.startswith(RUN) or words[0] not in TRAINING:
            check_config(command, tmp_path)
            continue
        args = shrunk(command)
        code = main(args)
        err = capsys.readouterr().err
        assert code == 0, f"{name}: {command}\n{err[-2000:]}"
        output = Path(args[args.index("--output") + 1])
        assert (output / "report.md").is_file() if words[0] == "pipeline" else any(output.glob("*.safetensors")), \
            f"{name}: {command} left no weights in {output}"
