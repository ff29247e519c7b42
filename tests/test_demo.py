"""`tinymim demo`: the built-in pipeline end to end (shrunk to a few steps here), and its --data forms."""
import tarfile

import pytest

from tinymim.core.config import ConfigError
from tinymim.pipeline.demo import data_overrides


def _shrunk_demo(out, data, monkeypatch):
    """The demo's stages, each cut to 3 steps on a few images (the full demo: README)."""
    from tinymim.pipeline import demo
    monkeypatch.setattr(demo, "PRETRAIN_IMAGES", 96)
    monkeypatch.setattr(demo, "FINETUNE_IMAGES", 64)
    return demo.run_demo(out, data=data, progress=False, overrides=["train.max_steps=3", "train.batch_size=32"])


@pytest.mark.slow  # the demo's four stages
def test_demo_offline_says_so_and_runs_on_synthetic_images(tmp_path, monkeypatch, capsys):
    import json

    from tinymim.pipeline import demo
    monkeypatch.setattr(demo, "cifar10_ready", lambda: "cifar10 is not in /nowhere and could not be downloaded")
    out = tmp_path / "demo"
    text = _shrunk_demo(out, "cifar10", monkeypatch).read_text()
    err = capsys.readouterr().err.strip().splitlines()
    notice = [line for line in err if line.startswith("tinymim demo:")]
    assert len(notice) == 1 and "synthetic" in notice[0] and "--data" in notice[0]
    # the report says, at its top, that synthetic images cannot show the effect
    assert text.index("synthetic images") < text.index("| stage |") and "cannot show" in text
    for stage in ("TinyMIM student", "fine-tuned TinyMIM student", "fine-tuned from scratch at its best",
                  "fine-tuned from scratch, the student's recipe"):
        assert stage in text
    assert (out / "plots" / "losses.png").is_file() and (out / "plots" / "accuracy.png").is_file()
    assert (out / "student_tinymim" / "student.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] and [s["stage"] for s in report["stages"]] == [
        "student_tinymim", "finetune_tinymim", "finetune_baseline", "finetune_scratch"]
    tuned = report["stages"][1]
    assert tuned["task"] == "finetune" and 0 <= tuned["final"]["top1"] <= 100 and "top1" in tuned["best"]
    assert tuned["minutes"] > 0 and report["stages"][0]["final"]["final_loss"] > 0


def test_demo_teacher_ships_with_the_package():
    from tinymim.models.checkpoint import load_weights
    from tinymim.pipeline.planning import load, plan

    state = load_weights("builtin:cifar10_mae_vit128x6")
    assert state["pos_embed"].shape == (1, 65, 128)
    assert len({k.split(".")[1] for k in state if k.startswith("blocks.")}) == 6
    distill = [c for s, _, c in plan(load("pipelines/demo"), "/tmp/unused") if s.task == "distill"][0]
    assert distill["teacher"]["checkpoint"] == "builtin:cifar10_mae_vit128x6"
    assert (distill["teacher"]["target_block"], distill["teacher"]["relation_heads"]) == (6, 4)


def test_demo_baseline_is_the_grid_s_choice_and_the_twin_the_student_s_recipe(tmp_path, benchmark_module):
    """The best from-scratch baseline trains the setup baseline_grid chose (and says which in its
    label); the twin differs from the student's fine-tuning in its init only."""
    from tinymim.pipeline.planning import load, plan

    grid = benchmark_module("baseline_grid")
    planned = {s.name: (s, c) for s, _, c in plan(load("pipelines/demo"), tmp_path)}
    stage, baseline = planned["finetune_baseline"]
    chosen = dict(o.split("=", 1) for o in grid.setup_overrides(grid.CHOSEN))
    assert (baseline["model"]["init"], baseline["model"]["pos_embed"]) == (chosen["model.init"],
                                                                           chosen["model.pos_embed"])
    assert baseline["layer_decay"] == float(chosen["layer_decay"])
    assert baseline["train"]["blr"] == float(chosen["train.blr"])
    assert baseline["init"] is None and grid.setup_name(grid.CHOSEN) in stage.label
    _, twin = planned["finetune_scratch"]
    _, student = planned["finetune_tinymim"]
    assert twin["init"] is None and student["init"] is not None
    assert {k: v for k, v in twin.items() if k != "init"} == {k: v for k, v in student.items() if k != "init"}
    assert (twin["model"]["init"], twin["model"]["pos_embed"]) == ("timm", "learned")


def test_demo_data_forms(tmp_path):
    assert data_overrides("synthetic", tmp_path)[0][0] == "data.name=synthetic"
    assert data_overrides("cifar10", tmp_path)[0][0] == "data.name=cifar10"
    # a folder with train.tar / test.tar (the layout of ../shared/data/cifar10) is extracted once
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "cat").mkdir(parents=True)
        (src / split / "cat" / "0.jpg").write_bytes(b"x")
    packed = tmp_path / "packed"
    packed.mkdir()
    for split in ("train", "test"):
        with tarfile.open(packed / f"{split}.tar", "w") as t:
            t.add(src / split, arcname=split)
    common, finetune = data_overrides(str(packed), tmp_path / "out")
    assert f"data.root={(tmp_path / 'out' / 'data' / 'train').resolve()}" in common
    assert f"data.val_root={(tmp_path / 'out' / 'data' / 'test').resolve()}" in finetune
    # a plain train/ + val/ folder is used in place
    common, finetune = data_overrides(str(src), tmp_path / "out2")
    assert f"data.root={(src / 'train').resolve()}" in common
    with pytest.raises(ConfigError, match="train/ and val/"):
        data_overrides(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="val"):
        data_overrides(str(tmp_path / "only_train"), tmp_path)
