"""Every command over a list of bad inputs: exit status 1, one line on stderr (no traceback, no log
noise before it), and nothing written anywhere in the workspace.

All cases run in one process (tests/cli_driver.py, each as a fresh `tinymim ...` would), against a
workspace with good data, finished runs of two kinds, and the bad files the cases name.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO_DISTILL, MICRO_FINETUNE, with_overrides
from conftest import subprocess_env as env
from PIL import Image

pytestmark = pytest.mark.slow  # every case runs in a subprocess, against runs made by subprocesses

HERE = Path(__file__).resolve().parent
ROOT = os.geteuid() == 0  # root ignores file modes: the unreadable-file cases need another user

DISTILL = with_overrides(MICRO_DISTILL, "data.synthetic_size=64")
FINETUNE = MICRO_FINETUNE


def cases(ws: Path) -> dict[str, list[str]]:
    w = str(ws)
    data = ["data.name=folder", f"data.root={w}/data/train", f"data.val_root={w}/data/val"]

    def shards(name: str) -> list[str]:
        return ["data.name=shards", f"data.root={w}/{name}"]
    out = ["--output", f"{w}/new_run"]
    c = {
        # recipes and overrides
        "distill: recipe with a YAML syntax error": ["distill", "--config", f"{w}/bad.yaml", *out],
        "distill: recipe that is not a mapping": ["distill", "--config", f"{w}/list.yaml", *out],
        "distill: missing recipe": ["distill", "--config", f"{w}/nope.yaml", *out],
        "distill: recipe path through a file": ["distill", "--config", f"{w}/afile/r.yaml", *out],
        "distill: override with a YAML syntax error": ["distill", *DISTILL, "train.epochs=[3", *out],
        "distill: unknown key": ["distill", *DISTILL, "train.epoch=3", *out],
        "distill: value of the wrong type": ["distill", *DISTILL, "train.epochs=three", *out],
        # values
        "distill: epochs=0": ["distill", *DISTILL, "train.epochs=0", *out],
        "distill: max_steps=0": ["distill", *DISTILL, "train.max_steps=0", *out],
        "distill: negative lr": ["distill", *DISTILL, "train.lr=-1", *out],
        "distill: log_every=0": ["distill", *DISTILL, "train.log_every=0", *out],
        "distill: mean of the wrong length": ["distill", *DISTILL, "data.mean=[0.5,0.5]", *out],
        "distill: a GPU that is not there": ["distill", *DISTILL, "train.device=cuda:99", *out],
        "distill: image size against the model": ["distill", *DISTILL, "data.img_size=40", *out],
        "distill: image size not in whole patches": ["distill", *DISTILL, "student.img_size=null",
                                                      "teacher.model.img_size=null", "data.img_size=36", *out],
        "distill: mask ratio of 1": ["distill", *DISTILL, "mask_ratio=1.0", *out],
        "distill: unknown model name": ["distill", *DISTILL, "student.name=vit_enormous_patch3", *out],
        "distill: a batch larger than the data": ["distill", *DISTILL, "train.batch_size=128", *out],
        "distill: target block out of range": ["distill", *DISTILL, "teacher.target_block=7", *out],
        # teachers beyond MAE's plain ViT (issue 23)
        "distill: a teacher block without q/k/v": ["distill", *DISTILL, "teacher.model.name=vit_base_patch16_xp_224",
                                                    *out],
        "distill: a teacher size whose patch grid cannot match": ["distill", *DISTILL, "teacher.model.img_size=48",
                                                                   *out],
        "distill: a teacher by hub name, offline": ["distill", *DISTILL, "teacher.checkpoint=hf-hub:timm/not_cached",
                                                     *out],
        # paths and run types
        "distill: --output is a file": ["distill", *DISTILL, "--output", f"{w}/afile"],
        "distill: missing data folder": ["distill", *DISTILL, "data.name=folder", f"data.root={w}/nope", *out],
        "distill: missing data folder, output in new folders": ["distill", *DISTILL, "data.name=folder",
                                                                 f"data.root={w}/nope", "--output", f"{w}/new/a/run"],
        "distill: data folder without class folders": ["distill", *DISTILL, "data.name=folder",
                                                        f"data.root={w}/empty_dir", *out],
        "distill: missing teacher checkpoint": ["distill", *DISTILL, f"teacher.checkpoint={w}/nope.pt", *out],
        "distill: teacher is a folder without weights": ["distill", *DISTILL, f"teacher.checkpoint={w}/empty_dir",
                                                          *out],
        "distill: teacher of another architecture": ["distill", *DISTILL, "teacher.model.embed_dim=64",
                                                      "teacher.model.num_heads=4", f"teacher.checkpoint={w}/ft_run",
                                                      *out],
        "distill: teacher file that is not a checkpoint": ["distill", *DISTILL, f"teacher.checkpoint={w}/afile", *out],
        "distill: a finished run of another task": ["distill", *DISTILL, "--output", f"{w}/ft_run"],
        "distill: a damaged checkpoint": ["distill", *DISTILL, "--output", f"{w}/damaged_run"],
        "distill: 300 random bytes as last.pt": ["distill", *DISTILL, "--output", f"{w}/random_run"],
        # untrusted input: shard indexes, folder trees, images, exports
        "distill: a shard index naming ../x.tar": ["distill", *DISTILL, *shards("shards_up"), *out],
        "distill: a shard index naming an absolute path": ["distill", *DISTILL, *shards("shards_abs"), *out],
        "distill: a remote shard index naming sub/../../../x.tar": [
            "distill", *DISTILL, "data.name=shards", f"data.root=file://{w}/shards_remote_up",
            f"data.shard_cache={w}/cache", *out],
        "distill: shard labels rotated by one class": ["distill", *DISTILL, *shards("shards_rotated"), *out],
        "distill: two shards swapped by name": ["distill", *DISTILL, *shards("shards_swapped"), *out],
        "distill: offsets that miss the tar headers": ["distill", *DISTILL, *shards("shards_offsets"), *out],
        "distill: a folder with a symlink loop": ["distill", *DISTILL, "data.name=folder", f"data.root={w}/loop",
                                                  *out],
        "shards: a folder with a symlink loop": ["shards", f"{w}/loop", "--output", f"{w}/loop_shards"],
        "export: into a non-empty folder": ["export", f"{w}/distill_run", "--format", "timm", "--output",
                                            f"{w}/earlier_export"],
        "visualize: a decompression bomb": ["visualize", f"{w}/distill_run", "--image", f"{w}/bomb.png",
                                            "--output", f"{w}/bomb_relations.png"],
        "distill: an MLflow server that does not answer": ["distill", *DISTILL, "train.loggers=[mlflow]",
                                                          "train.mlflow_uri=http://127.0.0.1:9", *out],
        "mae: recipe with a YAML syntax error": ["mae", "--config", f"{w}/bad.yaml", *out],
        "mae: model image size against the data": ["mae", "model.name=vit_custom", "model.patch_size=8",
                                                   "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                                                   "model.img_size=64", "data.img_size=32", *out],
        "mae: batch size not divisible by accumulation": ["mae", "train.batch_size=10", "train.accum_steps=3", *out],
        "finetune: missing init weights": ["finetune", *FINETUNE, *data, f"init={w}/nope", *out],
        "finetune: init folder without weights": ["finetune", *FINETUNE, *data, f"init={w}/empty_dir", *out],
        "finetune: missing validation folder": ["finetune", *FINETUNE, "data.name=folder",
                                                f"data.root={w}/data/train", f"data.val_root={w}/nope", *out],
        "finetune: validation folder missing a class": ["finetune", *FINETUNE, "data.name=folder",
                                                        f"data.root={w}/data/train", f"data.val_root={w}/partial",
                                                        *out],
        "finetune: num_classes=0": ["finetune", *FINETUNE, *data, "num_classes=0", *out],
        "finetune: fewer classes than the data": ["finetune", *FINETUNE, *data, "num_classes=1", *out],
        "finetune: holdout larger than the data": ["finetune", *FINETUNE, *data, "data.holdout=100", *out],
        "linprobe: unknown optimizer": ["linprobe", *FINETUNE, *data, "train.optimizer=adam", *out],
        "linprobe: a finished run of another task": ["linprobe", *FINETUNE, *data, "--output", f"{w}/distill_run"],
        "segment: missing data folder": ["segment", "model.name=vit_custom", "model.patch_size=8", "model.embed_dim=32",
                                         "model.depth=4", "model.num_heads=2", "blocks=[1,2,3,4]", "data.crop_size=32",
                                         f"data.root={w}/nope", *out],
        "segment: crop not in whole patches": ["segment", "data.crop_size=500", *out],
        "segment: repeated pyramid blocks": ["segment", "model.name=vit_custom", "model.patch_size=8",
                                             "model.embed_dim=32", "model.depth=4", "model.num_heads=2",
                                             "blocks=[1,1,3,4]", "data.crop_size=32", f"data.root={w}", *out],
        "pipeline: YAML syntax error": ["pipeline", "--config", f"{w}/bad.yaml", "--output", f"{w}/new_pipe"],
        "pipeline: stage teacher that is not an earlier stage": ["pipeline", "--config", f"{w}/bad_pipeline.yaml",
                                                                 "--output", f"{w}/new_pipe"],
        "pipeline: bad value for one task": ["pipeline", "--config", "pipelines/demo", "finetune:train.epochs=0",
                                             "--output", f"{w}/new_pipe"],
        "pipeline: unknown task prefix": ["pipeline", "--config", "pipelines/demo", "nosuch:train.epochs=1",
                                          "--output", f"{w}/new_pipe"],
        "pipeline: --output is a file": ["pipeline", "--config", "pipelines/demo", "--output", f"{w}/afile"],
        "pipeline: a corrupt stage record": ["pipeline", "--config", "pipelines/demo", "--output", f"{w}/pipe_out"],
        "demo: missing data folder": ["demo", "--data", f"{w}/nope", "--output", f"{w}/new_demo"],
        "demo: --output is a file": ["demo", "--data", "synthetic", "--output", f"{w}/afile"],
        "export: missing source": ["export", f"{w}/nope", "--output", f"{w}/new_export"],
        "export: folder that is not a run": ["export", f"{w}/empty_dir", "--output", f"{w}/new_export"],
        "export: bare file without --model": ["export", f"{w}/afile", "--output", f"{w}/new_export"],
        "export: file that is not a checkpoint": ["export", f"{w}/afile", "--model", "vit_tiny_patch16_224",
                                                  "--output", f"{w}/new_export"],
        "eval: a run of another task": ["eval", f"{w}/distill_run", "--data", f"{w}/data/val", "--json", f"{w}/r.json"],
        "eval: missing run": ["eval", f"{w}/nope", "--data", f"{w}/data/val"],
        "eval: missing data": ["eval", f"{w}/ft_run", "--data", f"{w}/nope", "--json", f"{w}/r.json"],
        "eval: data that is a file": ["eval", f"{w}/ft_run", "--data", f"{w}/afile"],
        "eval: data missing a class": ["eval", f"{w}/ft_run", "--data", f"{w}/partial", "--workers", "0"],
        "knn: missing source": ["knn", f"{w}/nope", "--data", f"{w}/data/train", "--val", f"{w}/data/val"],
        "knn: missing bank": ["knn", f"{w}/distill_run", "--data", f"{w}/nope", "--val", f"{w}/data/val"],
        "knn: k=0": ["knn", f"{w}/distill_run", "--data", f"{w}/data/train", "--val", f"{w}/data/val", "--k", "0"],
        "knn: bank size 0": ["knn", f"{w}/distill_run", "--data", f"{w}/data/train", "--val", f"{w}/data/val",
                             "--bank-size", "0"],
        "knn: block out of range": ["knn", f"{w}/distill_run", "--data", f"{w}/data/train", "--val",
                                    f"{w}/data/val", "--block", "9"],
        "visualize: a run of another task": ["visualize", f"{w}/ft_run", "--image", f"{w}/img.png",
                                             "--output", f"{w}/new.png"],
        "visualize: missing image": ["visualize", f"{w}/distill_run", "--image", f"{w}/nope.png",
                                     "--output", f"{w}/new.png"],
        "visualize: image that is not an image": ["visualize", f"{w}/distill_run", "--image", f"{w}/afile",
                                                  "--output", f"{w}/new.png"],
        "visualize: head out of range": ["visualize", f"{w}/distill_run", "--image", f"{w}/img.png", "--heads", "9",
                                         "--output", f"{w}/new.png"],
        "visualize: unknown relation": ["visualize", f"{w}/distill_run", "--image", f"{w}/img.png",
                                        "--relations", "xy", "--output", f"{w}/new.png"],
        "corrupt: missing source": ["corrupt", f"{w}/nope", "--output", f"{w}/new_c"],
        "corrupt: severity 9": ["corrupt", f"{w}/data/val", "--severities", "9", "--output", f"{w}/new_c"],
        "corrupt: unknown corruption": ["corrupt", f"{w}/data/val", "--corruptions", "rain", "--output", f"{w}/new_c"],
        "shards: missing source": ["shards", f"{w}/nope", "--output", f"{w}/new_shards"],
        "shards: source without images": ["shards", f"{w}/empty_dir", "--output", f"{w}/new_shards"],
        "shards: shard size 0": ["shards", f"{w}/data/train", "--output", f"{w}/new_shards", "--shard-size", "0"],
        "shards: output already holds shards": ["shards", f"{w}/data/train", "--output", f"{w}/shards"],
        "distill: shard folder without an index": ["distill", *DISTILL, "data.name=shards", f"data.root={w}/empty_dir",
                                                   *out],
        "distill: shard URL without an index": ["distill", *DISTILL, "data.name=shards", f"data.root=file://{w}/nope",
                                                f"data.shard_cache={w}/cache", *out],
    }
    if not ROOT:
        c["distill: unreadable recipe"] = ["distill", "--config", f"{w}/unreadable.yaml", *out]
        c["distill: read-only output folder"] = ["distill", *DISTILL, "--output", f"{w}/readonly/run"]
        c["eval: unreadable run"] = ["eval", f"{w}/unreadable_run", "--data", f"{w}/data/val"]
    return c


def _folder(root: Path, classes: dict[str, int]) -> None:
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (60 * c + 9 * i, 90, 200 - 60 * c)).save(root / name / f"{i}.png")


def _untrusted(ws: Path) -> None:
    """Shard indexes that lie, a folder tree that loops, a bomb, an earlier export."""
    from test_bad_input import bomb_png
    from test_shards import with_index

    def rename(to):
        return lambda index: index["shards"][0].update(name=to)

    def rotate(index):
        for shard in index["shards"]:
            shard["labels"] = [(label + 1) % len(index["classes"]) for label in shard["labels"]]

    def swap(index):
        a, b = index["shards"][0], index["shards"][1]
        a["name"], b["name"] = b["name"], a["name"]

    with_index(ws / "shards", ws / "shards_up", rename("../x.tar"))
    with_index(ws / "shards", ws / "shards_abs", rename(str(ws / "shards" / "shard-000000.tar")))
    with_index(ws / "shards", ws / "shards_remote_up", rename("sub/../../../x.tar"))
    with_index(ws / "shards", ws / "shards_rotated", rotate)
    with_index(ws / "shards", ws / "shards_swapped", swap)
    with_index(ws / "shards", ws / "shards_offsets", lambda index: index["shards"][0]["offsets"].__setitem__(0, 1024))
    _folder(ws / "loop", {"a": 3, "b": 3})
    (ws / "loop" / "a" / "again").symlink_to(ws / "loop", target_is_directory=True)
    (ws / "earlier_export").mkdir()
    (ws / "earlier_export" / "README.md").write_text("an earlier export\n")
    bomb_png(ws / "bomb.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("scan")
    (ws / "bad.yaml").write_text("train:\n  epochs: [3\n  lr: 1\n")
    (ws / "list.yaml").write_text("- a\n- b\n")
    (ws / "afile").write_text("not a checkpoint, not an image, not a folder\n")
    (ws / "bad_pipeline.yaml").write_text(
        "stages:\n  - {name: s, task: distill, teacher: t}\n  - {name: t, task: mae}\n")
    (ws / "empty_dir").mkdir()
    (ws / "pipe_out" / "student_tinymim").mkdir(parents=True)
    (ws / "pipe_out" / ".lock").write_text("pid 1 on host since 2026-01-01 00:00:00\n")  # left by its pipeline
    # cut short
    (ws / "pipe_out" / "student_tinymim" / "pipeline.json").write_text('{"stage": "student_tinymim", "upstr')
    _folder(ws / "data" / "train", {"a": 6, "b": 6})
    _folder(ws / "data" / "val", {"a": 2, "b": 2})
    _folder(ws / "partial", {"a": 2})
    from tinymim.data.shard_writer import write_shards
    from tinymim.data.sources import FolderImages

    write_shards(FolderImages(ws / "data" / "train"), ws / "shards", shard_size=4)
    Image.new("RGB", (40, 40), (10, 200, 30)).save(ws / "img.png")
    for run_dir, args in (("distill_run", ["distill", *DISTILL]),
                          ("ft_run", ["finetune", *FINETUNE, "data.name=folder", f"data.root={ws}/data/train",
                                      f"data.val_root={ws}/data/val"])):
        r = subprocess.run([sys.executable, "-m", "tinymim", *args, "--output", str(ws / run_dir)], env=env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(ws / "distill_run", ws / "damaged_run")
    last = ws / "damaged_run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])  # cut short by a failed copy
    _untrusted(ws)
    shutil.copytree(ws / "distill_run", ws / "random_run")
    (ws / "random_run" / "checkpoints" / "last.pt").write_bytes(os.urandom(300))  # not a checkpoint at all
    if not ROOT:
        (ws / "unreadable.yaml").write_text("train: {epochs: 1}\n")
        (ws / "unreadable.yaml").chmod(0)
        (ws / "readonly").mkdir()
        (ws / "readonly").chmod(0o555)
        (ws / "unreadable_run").mkdir()
        (ws / "unreadable_run" / "config.yaml").write_text("model: {}\n")
        (ws / "unreadable_run").chmod(0)
    return ws


@pytest.fixture(scope="module")
def results(workspace, tmp_path_factory) -> dict:
    scan = cases(workspace)
    work = tmp_path_factory.mktemp("driver")
    (work / "cases.json").write_text(json.dumps(list(scan.values())))
    r = subprocess.run([sys.executable, str(HERE / "cli_driver.py"), str(work / "cases.json"), str(work / "out.json"),
                        str(workspace)], env=env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(work / "hf_cache")),
                       capture_output=True, text=True, timeout=900, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(zip(scan, json.loads((work / "out.json").read_text())))


@pytest.mark.parametrize("case", list(cases(Path("/ws"))))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(results, case):
    r = results[case]
    assert r["rc"] == 1, f"{case}: exit {r['rc']}\n{r['stderr'][-3000:]}"
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}:\n{r['stderr'][-3000:]}"
    assert len(lines[0]) < 600, f"{case}: a wall of text\n{lines[0]}"
    # a run directory's .lock holds the note of whichever process last took the lock: not run data
    written = [p for p in r["written"] if not (p.endswith("/.lock") and p.count("/") == 1)]
    assert written == [], f"{case} changed {written}"


def test_teachers_that_cannot_be_read_name_the_fix(results):
    line = results["distill: a teacher block without q/k/v"]["stderr"]
    assert "teacher block 2 (ParallelScalingBlock) has no attention with q/k/v projections" in line
    assert "use a timm ViT or EVA teacher" in line
    line = results["distill: a teacher size whose patch grid cannot match"]["stderr"]
    assert "teacher.model.img_size=48 gives a 6-patch grid" in line and "set it to 32" in line
    line = results["distill: a teacher by hub name, offline"]["stderr"]
    assert "cannot download 'hf-hub:timm/not_cached'" in line and "teacher.checkpoint=model.safetensors" in line


def test_a_checkpoint_of_random_bytes_is_called_damaged_not_unsafe(results):
    line = results["distill: 300 random bytes as last.pt"]["stderr"]
    assert "not a PyTorch checkpoint" in line and "move it away" in line
    assert "could run code" not in line and "weights_only" not in line, line


def test_an_mlflow_server_that_does_not_answer_is_named(results):
    line = results["distill: an MLflow server that does not answer"]["stderr"]
    assert "http://127.0.0.1:9" in line and "does not answer" in line, line


WORDS = {  # what each untrusted-input case must name
    "distill: a shard index naming ../x.tar": "names shard '../x.tar', not a plain file name",
    "distill: a shard index naming an absolute path": "not a plain file name",
    "distill: a remote shard index naming sub/../../../x.tar": "names shard 'sub/../../../x.tar', not a plain file",
    "distill: shard labels rotated by one class": "its labels do not match its class list",
    "distill: two shards swapped by name": "does not match index.json",
    "distill: offsets that miss the tar headers": "does not match index.json",
    "distill: a folder with a symlink loop": "is a symlink into the data folder",
    "shards: a folder with a symlink loop": "is a symlink into the data folder",
    "export: into a non-empty folder": "is not empty",
    "visualize: a decompression bomb": "decompression bomb",
}


@pytest.mark.parametrize("case", list(WORDS))
def test_untrusted_input_names_the_problem(results, case):
    assert WORDS[case] in results[case]["stderr"], results[case]["stderr"]
