"""Every shipped recipe resolves to the values recorded in tests/snapshots/recipes.json: a change of
the package's layout or of its config code must not change what a recipe means.

After a deliberate change of a recipe or of a default, record the new values with
`python tests/test_recipe_snapshot.py --update` and commit the snapshot with the change.
"""
import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from tinymim.cli import main
from tinymim.core.config import RECIPES

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "recipes.json"
RECIPE_FILES = sorted(p for p in RECIPES.glob("*/*.yaml") if not p.name.startswith("_"))  # _base: fragments


def task_of(recipe: Path) -> str:
    return "pipeline" if recipe.parent.name == "pipelines" else recipe.stem.split("_")[0]


def resolved(recipe: Path) -> list[str]:
    """`tinymim config TASK --config RECIPE`, its `key = value` part (the type and meaning comments aside)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", task_of(recipe), "--config", str(recipe)]) == 0
    return [line.split("  # ")[0].rstrip() for line in out.getvalue().splitlines()]


def name(recipe: Path) -> str:
    return str(recipe.relative_to(RECIPES))


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=name)
def test_recipe_resolves_as_recorded(recipe: Path):
    recorded = json.loads(SNAPSHOT.read_text())
    assert name(recipe) in recorded, f"{name(recipe)} is new: record it with python {Path(__file__).name} --update"
    assert resolved(recipe) == recorded[name(recipe)]


def test_every_recorded_recipe_exists():
    assert set(json.loads(SNAPSHOT.read_text())) == {name(r) for r in RECIPE_FILES}


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps({name(r): resolved(r) for r in RECIPE_FILES}, indent=1) + "\n")
    print(f"recorded {len(RECIPE_FILES)} recipes in {SNAPSHOT}")
