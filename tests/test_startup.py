"""Start-up: `tinymim --help`, `--version` and a config error never import torch or timm (seconds on a small
CPU: what made every command slow to start), the config check read from source agrees with the imported
classes, and a hub name that cannot be fetched is refused at once, in one line, without huggingface_hub's
retries. benchmarks/speed/startup.py measures the times."""
import importlib
import json
import logging
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env

from tinymim.core import hub
from tinymim.core.config import RECIPES, ConfigError, _field_types, _is_dataclass_type
from tinymim.core.schema import static_schema
from tinymim.models.checkpoint import CheckpointError, load_weights
from tinymim.tasks import CATALOG, TASKS, check_config

HEAVY = ("torch", "timm", "huggingface_hub.file_download")
# a fresh interpreter runs the command line in-process, then reports which heavy modules it imported
PROBE = """
import json, sys
from tinymim.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _config_class(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_catalog_describes_the_task_modules():
    assert list(CATALOG) == list(TASKS)
    for name, entry in CATALOG.items():
        spec = TASKS[name]
        assert importlib.import_module(entry.module).SPEC is spec
        assert _config_class(entry.config) is spec.config
        assert entry.help == spec.help


def _schema_rows(cls, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, type) of every field, sections expanded: the same shape for a real class and for one
    read from source, so the two compare."""
    rows = []
    for key, tp in _field_types(cls).items():
        args = typing.get_args(tp)
        inner = [a for a in args if _is_dataclass_type(a)]
        if _is_dataclass_type(tp) or inner:  # a section (or an optional one)
            rows.append((prefix + key, "section" if _is_dataclass_type(tp) else "optional section"))
            rows += _schema_rows(tp if _is_dataclass_type(tp) else inner[0], f"{prefix}{key}.")
        else:
            rows.append((prefix + key, tp))
    return rows


@pytest.mark.parametrize("task", list(CATALOG))
def test_the_source_reading_of_each_config_is_the_imported_class(task):
    path = CATALOG[task].config
    read = static_schema(path)
    assert read is not None, f"{path} could not be read from source: core/schema.py follows plain dataclasses"
    assert _schema_rows(read) == _schema_rows(_config_class(path))


def _full_load_error(task, recipe, overrides) -> str:
    """The message of the full load (the imported config classes), checks from source bypassed."""
    with pytest.raises(ConfigError) as e:
        TASKS[task].load_config(recipe, overrides)
    return str(e.value)


@pytest.mark.parametrize("task, recipe, overrides", [
    ("distill", "cifar10/nosuch", []),
    ("distill", None, ["nosuch.key=1"]),
    ("distill", "cifar10/distill_micro", ["train.epochs=abc"]),
    ("finetune", None, ["data.hflip=maybe"]),
    ("mae", None, ["model.embeddim=64"]),
    ("segment", None, ["data.crop_size=[a,b]"]),
    ("linprobe", None, ["train.lr=fast"]),
    ("distill", None, ["loss.relation.relations=qk", "teacher.model.nosuch=1"]),
    ("distill", None, ["train=3"]),
])
def test_a_config_error_before_the_full_load_reads_as_the_full_load_would(task, recipe, overrides):
    with pytest.raises(ConfigError) as e:
        check_config(task, recipe, overrides)
    assert str(e.value) == _full_load_error(task, recipe, overrides)


SHIPPED = sorted(p for p in RECIPES.glob("*/*.yaml") if p.parent.name != "pipelines" and not p.name.startswith("_"))


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_passes_the_check_from_source(recipe):
    check_config(recipe.stem.split("_")[0], recipe)  # the task is the file name's prefix (tests/test_recipes.py)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The hub's endpoint a local port nothing listens on, and an empty hub cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    hub._probe.cache_clear()
    yield constants
    hub._probe.cache_clear()


def test_the_probe_tells_a_listening_endpoint_from_a_closed_one(unreachable_hub, monkeypatch):
    assert "cannot be reached" in hub.hub_unreachable()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(unreachable_hub, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_unreachable() is None


def test_an_unreachable_hub_name_is_refused_by_the_config_check(unreachable_hub):
    with pytest.raises(ConfigError) as e:
        check_config("distill", "cifar10/distill_micro", ["teacher.checkpoint=hf-hub:timm/not_cached"])
    line = str(e.value)
    assert line.startswith("cannot download 'hf-hub:timm/not_cached' from the Hugging Face hub (127.0.0.1:")
    assert "cannot be reached" in line and "the hub cache holds no copy" in line and "\n" not in line
    assert "teacher.checkpoint=model.safetensors" in line  # the fix, as before


def test_a_fetch_while_the_hub_is_unreachable_is_one_try_from_the_cache(unreachable_hub, caplog):
    """A model built from a hub name past the config check (in code): huggingface_hub runs offline for
    the fetch, so it neither retries (its back-off logs 'Retrying in Ns') nor says more than the one line."""
    from tinymim.models.vit import ModelConfig, create_vit

    caplog.set_level(logging.WARNING)
    with pytest.raises(ConfigError, match=r"cannot be reached .*the hub cache holds no copy\); offline"):
        create_vit(ModelConfig(name="hf-hub:timm/not_cached", img_size=None))
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert unreachable_hub.HF_HUB_OFFLINE is False  # offline for the fetch only


@pytest.mark.parametrize("name", ["vit_base_patch16_224.mae", "hf-hub:timm/not_cached"])
def test_weights_that_cannot_be_had_are_refused_before_a_model_is_built(unreachable_hub, monkeypatch, name):
    """A timm name with a tag (its hub repository from timm's pretrained config) or a hub name: no
    ViT-B is built and initialized (seconds) only to learn that its weights cannot be fetched."""
    import timm

    def build(*a, **k):
        raise AssertionError("timm.create_model was called")

    monkeypatch.setattr(timm, "create_model", build)
    with pytest.raises(CheckpointError, match=rf"cannot download '{name}' .*cannot be reached"):
        load_weights(name)


def test_a_cached_hub_name_is_read_while_the_hub_is_unreachable(unreachable_hub):
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **args)
    repo = Path(unreachable_hub.HF_HUB_CACHE) / "models--timm--cached_vit"
    save_for_hf(model, repo / "snapshots" / ("0" * 40), model_args=args, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    check_config("distill", None, ["teacher.checkpoint=hf-hub:timm/cached_vit"])  # cached: not refused
    state = load_weights("hf-hub:timm/cached_vit")
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert all((state[k] == v).all() for k, v in model.state_dict().items())


def _fresh(args: list[str], tmp_path: Path, **env: str) -> tuple[dict, subprocess.CompletedProcess]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=subprocess_env(**env))
    return json.loads(r.stdout.strip().splitlines()[-1]), r


@pytest.mark.slow
@pytest.mark.parametrize("args, rc, first", [
    (["--help"], 0, None),
    (["--version"], 0, None),
    (["distill", "--help"], 0, None),
    (["distill", "--config", "nosuch", "--output", "run"], 1, "error: recipe nosuch not found"),
    (["distill", "--output", "run", "nosuch.key=1"], 1, "error: unknown config key(s) nosuch;"),
    (["distill", "--config", "cifar10/distill_micro", "--output", "run", "train.epochs=abc"], 1,
     "error: train.epochs: expected an integer, got 'abc'"),
    (["finetune", "--output", "run", "train.batch_size"], 1, "error: override 'train.batch_size' must look like"),
    (["config", "segment", "data.num_workers=many"], 1, "error: data.num_workers: expected an integer, got 'many'"),
], ids=["help", "version", "task-help", "no-recipe", "unknown-key", "bad-type", "no-value", "config-bad-type"])
def test_cheap_commands_import_neither_torch_nor_timm(tmp_path, args, rc, first):
    result, r = _fresh(args, tmp_path)
    assert result == {"rc": rc, "heavy": []}, r.stderr[-2000:]
    if first is not None:
        assert r.stderr.startswith(first) and r.stderr.count("\n") == 1, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written
    if args == ["--version"]:
        assert r.stdout.splitlines()[0] == importlib.import_module("tinymim").__version__


@pytest.mark.slow
def test_an_unreachable_hub_teacher_is_refused_before_torch(tmp_path):
    result, r = _fresh(["distill", "--config", "cifar10/distill_micro", "--output", "run",
                        "teacher.checkpoint=hf-hub:timm/not_cached"], tmp_path,
                       HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_CACHE=str(tmp_path / "cache"))
    assert result == {"rc": 1, "heavy": []}, r.stderr[-2000:]
    assert r.stderr.startswith("error: cannot download 'hf-hub:timm/not_cached'") and r.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_valid_command_still_trains_after_the_check(tmp_path):
    """The lazy registry still reaches the task modules: a two-step run from the command line."""
    r = subprocess.run([sys.executable, "-m", "tinymim", "distill", "--config", "cifar10/distill_micro", "--output",
                        str(tmp_path / "run"), "teacher.checkpoint=null", "data.name=synthetic",
                        "data.synthetic_size=8", "data.num_workers=0", "train.max_steps=2", "train.batch_size=4",
                        "knn.every_epochs=0"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"done: {tmp_path / 'run'}/student.safetensors")
