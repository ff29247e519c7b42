"""Faults of issue 32 outside training: `tinymim corrupt` over unreadable source images (a decompression
bomb, a truncated JPEG) and a failure while it writes; a teacher given as a path that does not exist.
Each CLI case runs as `tinymim ...` would (tests/cli_driver.py's run_case, in this process): its exit
status, the one line it prints, no traceback, and what it left on disk."""
import errno
import hashlib
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_driver import run_case
from conftest import MICRO_FINETUNE
from PIL import Image

from tinymim.evaluate import corruptions
from tinymim.models.checkpoint import looks_like_path


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) -> its content's hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A 74-byte PNG whose header claims side x side pixels (10^10 for 100k: over Pillow's limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def source(tmp_path) -> Path:
    """An ImageFolder of two classes, two readable 32px JPEGs each, plus a bomb in a/ and a truncated JPEG in b/."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for cls in "ab":
        (src / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / cls / f"{i}.jpg")
    _bomb_png(src / "a" / "bomb.png")
    whole = (src / "b" / "0.jpg").read_bytes()
    (src / "b" / "trunc.jpg").write_bytes(whole[: len(whole) // 2])
    return src


def _corrupt(src: Path, out: Path, *corruption: str) -> dict:
    return run_case(["corrupt", str(src), "--output", str(out), "--corruptions", *(corruption or ("contrast",)),
                     "--severities", "1", "2"])


def test_corrupt_skips_a_bomb_and_a_truncated_jpeg_names_them_and_keeps_the_earlier_tree(source, tmp_path):
    out = tmp_path / "out"
    first = _corrupt(source, out, "gaussian_noise")
    assert first["rc"] == 0 and "Traceback" not in first["stderr"], first["stderr"]
    before = _tree(out)
    assert len(before) == 2 * 2 * 2  # 4 readable images x 2 severities; the two unreadable ones left out
    out.chmod(0o775)  # a folder shared by a group
    r = _corrupt(source, out, "contrast")
    assert r["rc"] == 0 and "Traceback" not in r["stderr"], r["stderr"]
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 2 unreadable source images skipped"), lines
    assert "a/bomb.png (a possible decompression bomb" in lines[0] and "b/trunc.jpg (" in lines[0]
    after = _tree(out)
    assert {k: v for k, v in after.items() if k.startswith("gaussian_noise/")} == before  # kept, unchanged
    assert sorted(k for k in after if k.startswith("contrast/")) == sorted(
        f"contrast/{s}/{c}/{i}.png" for s in (1, 2) for c in "ab" for i in range(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging folder left beside it
    assert out.stat().st_mode & 0o777 == 0o775  # the new tree took the old one's place, and its mode


def test_corrupt_of_nothing_readable_refuses_in_one_line_and_writes_nothing(source, tmp_path):
    only_bad = tmp_path / "bad"
    (only_bad / "x").mkdir(parents=True)
    for name in ("a/bomb.png", "b/trunc.jpg"):
        (only_bad / "x" / Path(name).name).write_bytes((source / name).read_bytes())
    r = _corrupt(only_bad, tmp_path / "new" / "out")
    lines = r["stderr"].splitlines()
    assert r["rc"] == 1 and len(lines) == 1 and lines[0].startswith("error: none of the 2 source images"), r
    assert "x/bomb.png: a possible decompression bomb" in lines[0] and "nothing was written" in lines[0]
    assert not (tmp_path / "new").exists()  # not even the parent it would have made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "src"]


def test_a_full_disk_or_a_refused_image_mid_tree_leaves_the_earlier_tree_whole(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _corrupt(source, out, "contrast")["rc"] == 0
    before = _tree(out)
    real_save, saved = Image.Image.save, []

    def save_then_fill_the_disk(img, fp, *args, **kwargs):
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        saved.append(fp)
        return real_save(img, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fill_the_disk)
    r = _corrupt(source, out, "gaussian_noise", "contrast")  # contrast's files would be written anew
    lines = r["stderr"].splitlines()
    assert r["rc"] == 1 and len(lines) == 1 and "Traceback" not in r["stderr"], r
    assert lines[0].startswith(f"error: cannot write the corruption tree beside {out}: no space left"), lines
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    if corruptions.reference() is not None:  # its definitions refuse images under 32 px: after the first class
        Image.new("RGB", (16, 16), (9, 9, 9)).save(source / "b" / "small.png")
        r = _corrupt(source, out, "gaussian_noise")
        assert r["rc"] == 1 and r["stderr"].count("\n") == 1 and "too small" in r["stderr"], r
        assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_what_a_killed_corrupt_left_is_cleared_by_the_next(source, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has exited
    out = tmp_path / "out"
    (tmp_path / f".out.partial-{pid}" / "contrast").mkdir(parents=True)  # killed while writing
    assert _corrupt(source, out)["rc"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    tree = _tree(out)
    os.rename(out, tmp_path / f".out.old-{pid}")  # killed between the two renames of a swap: out is missing
    assert _corrupt(source, tmp_path / "other")["rc"] == 0  # another output: not its business
    assert not out.exists()
    assert _corrupt(source, out, "gaussian_noise")["rc"] == 0
    assert {k: v for k, v in _tree(out).items() if k.startswith("contrast/")} == tree  # put back, then added to


def test_path_like_specs_are_paths_and_names_are_names():
    for spec in ("/no/such/teacher.safetensors", "./runs/missing", "runs/cifar10/finetune_teacher", "~/t",
                 "teacher.pt", "w.PTH", "model.bin", "vit.npz", "..\\t"):
        assert looks_like_path(spec), spec
    for spec in ("vit_base_patch16_224.mae", "regnety_160.deit_in1k", "hf-hub:timm/vit_tiny_patch16_224",
                 "builtin:cifar10_mae_vit128x6", "no_such_net"):
        assert not looks_like_path(spec), spec


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if anything would reach for the hub or timm's pretrained weights."""
    import timm

    import tinymim.core.hub as hub

    calls = []
    real_create = timm.create_model

    def create(name, *args, pretrained=False, **kwargs):
        if pretrained:
            calls.append(name)
            raise AssertionError(f"timm asked to fetch {name}")
        return real_create(name, *args, **kwargs)

    def probe(*args, **kwargs):
        calls.append("hub probe")
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(hub, "hub_unreachable", probe)
    monkeypatch.setattr(hub, "_probe", probe)
    return calls


@pytest.mark.parametrize("teacher", ["/no/such/path/teacher.safetensors", "./runs/missing", "teacher.pth"])
def test_a_missing_teacher_path_is_a_missing_file_not_a_timm_name(teacher, tmp_path, no_network, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./runs/missing and teacher.pth are relative
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(images / f"{i}.png")
    finetune = run_case(["finetune", "--output", str(tmp_path / "ft"), *MICRO_FINETUNE, "data.name=synthetic",
                         "model.dist_token=true", f"distillation.teacher={teacher}"])
    one_call = run_case(["distill", "--data", str(images), "--teacher", teacher, "--student",
                         "dim32,depth2,heads2,patch8", "--output", str(tmp_path / "oc")])
    for r, what in ((finetune, "distillation.teacher"), (one_call, "teacher")):
        assert r["rc"] == 1 and "Traceback" not in r["stderr"], r
        lines = r["stderr"].splitlines()
        assert lines == [f"error: {what} {teacher} does not exist: give a run folder, a weights file, "
                         "builtin:NAME or a timm name"], r["stderr"]
    assert no_network == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
