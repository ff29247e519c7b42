"""Exports that lose nothing: a full disk at any file of `tinymim export`, a kill between its renames and
two exports into one folder at once leave one export's files whole (or no folder), never a mix, and say
what happened in one line."""
import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO_DISTILL, MICRO_FINETUNE, subprocess_env, with_overrides

import tinymim.core.files as files
import tinymim.tasks as tasks
from tinymim.cli import main
from tinymim.core.config import load_config
from tinymim.evaluate import export
from tinymim.tasks.distill_config import DistillConfig
from tinymim.tasks.finetune_config import FinetuneConfig

EXPORTED = ("config.json", "model.safetensors", "README.md")
# what safetensors raised on a full tmpfs (safetensors 0.8): a SafetensorError, not an OSError
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A distilled encoder (RUN_A) and a 10-class classifier (RUN_B), each with a reference export."""
    root = tmp_path_factory.mktemp("export_runs")
    tasks.run("distill", load_config(DistillConfig, None, MICRO_DISTILL), root / "run_a")
    tasks.run("finetune", load_config(FinetuneConfig, None, with_overrides(
        MICRO_FINETUNE, "data.name=synthetic", "data.synthetic_size=16", "train.max_steps=2")), root / "run_b")
    for name in ("run_a", "run_b"):
        assert main(["export", str(root / name), "--output", str(root / f"ref_{name[-1]}")]) == 0
    return root


def _files(root: Path) -> dict:
    """Every file under root: its bytes and mtime (what a failed export must not change)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _contents(root: Path) -> dict:
    return {name: data for name, (data, _) in _files(root).items()}


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


class _HalfWritten:
    """A file whose writes stop half way with ENOSPC, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk_at(monkeypatch, name: str) -> None:
    """The disk fills while the export writes `name`, through whichever writer writes it: safetensors
    (its SafetensorError), timm's config writer (io.open) or tinymim's own (the atomic writer)."""
    import safetensors
    import safetensors.torch

    real_save, real_open, real_tmp = safetensors.torch.save_file, io.open, files._open_tmp

    def save_file(tensors, filename, *a, **k):
        if Path(filename).name == name:
            real_save(tensors, filename, *a, **k)
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise safetensors.SafetensorError(SAFETENSORS_FULL)
        return real_save(tensors, filename, *a, **k)

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return _HalfWritten(f) if isinstance(file, (str, Path)) and Path(file).name == name and "w" in mode else f

    def open_tmp(path):
        tmp, f = real_tmp(path)
        return (tmp, _HalfWritten(f)) if path.name == name else (tmp, f)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(files, "_open_tmp", open_tmp)


@pytest.mark.parametrize("name", EXPORTED)
def test_a_full_disk_at_any_file_of_a_first_export_leaves_no_folder(two_runs, tmp_path, monkeypatch, capsys, name):
    out = tmp_path / "x"
    _full_disk_at(monkeypatch, name)
    assert main(["export", str(two_runs / "run_a"), "--output", str(out)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: no space left on the device holding {out}") and "free some space" in line
    assert f"nothing was written to {out}" in line
    assert list(tmp_path.iterdir()) == []  # no folder, no staging folder, no lock file


@pytest.mark.parametrize("name", EXPORTED)
def test_a_full_disk_at_any_file_of_an_overwrite_leaves_the_earlier_export(two_runs, tmp_path, monkeypatch, capsys,
                                                                           name):
    out = tmp_path / "x"
    assert main(["export", str(two_runs / "run_a"), "--output", str(out)]) == 0
    (out / "notes.txt").write_text("the user's own file beside the export")
    before = _files(out)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _full_disk_at(patch, name)
        assert main(["export", str(two_runs / "run_b"), "--output", str(out), "--overwrite"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: no space left on the device holding {out}")
    assert f"the earlier export in {out} is as it was" in line
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    # with room again, the same command replaces the export's files whole and keeps the user's
    assert main(["export", str(two_runs / "run_b"), "--output", str(out), "--overwrite"]) == 0
    assert _contents(out) == {**_contents(two_runs / "ref_b"), "notes.txt": before["notes.txt"][0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


@pytest.mark.slow
def test_an_export_waits_for_one_moving_in_and_then_checks_the_folder_afresh(two_runs, tmp_path):
    """A second export into a folder another is filling does not write into it unasked: it waits for the
    lock, sees the folder the first one left, and refuses (without --overwrite) in one line."""
    out, first = tmp_path / "x", _contents(two_runs / "ref_a")
    with export._lock(out):  # as an export moving its files in holds it
        proc = subprocess.Popen([sys.executable, "-m", "tinymim", "export", str(two_runs / "run_b"),
                                 "--output", str(out)], env=subprocess_env(), stderr=subprocess.PIPE, text=True)
        waiting = ""
        while "waiting for the export into" not in waiting:
            waiting = proc.stderr.readline()
            assert waiting or proc.poll() is None, "the export did not wait for the lock"
        assert not out.exists()
        os.rename(two_runs / "ref_a", out)  # the first export's files move in
    try:
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode == 1
        assert _error_line(err).startswith(f"error: --output {out} is not empty")
        assert _contents(out) == first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # its staging folder is gone
    finally:
        os.rename(out, two_runs / "ref_a")


@pytest.mark.slow
def test_two_exports_into_one_folder_at_once_leave_one_exports_files(two_runs, tmp_path):
    out = tmp_path / "x"
    refs = [_contents(two_runs / "ref_a"), _contents(two_runs / "ref_b")]
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "tinymim", "export", str(two_runs / run), "--output",
                                   str(out), "--overwrite"], env=subprocess_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for run in ("run_a", "run_b")]
        results = [p.communicate(timeout=300) for p in procs]
        # both replace the folder whole, one after the other: each says so, and the folder is one export's
        assert [p.returncode for p in procs] == [0, 0], results
        assert all(stdout.startswith(f"wrote {out}") and "Traceback" not in err for stdout, err in results)
        assert _contents(out) in refs
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


KILL_AFTER_MOVING_ASIDE = """
import os, signal, sys
real = os.rename
def rename(src, dst):
    real(src, dst)
    if ".old-" in os.fspath(dst):  # the earlier export is aside, the new one not yet in: die here
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
from tinymim.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_export_killed_between_its_renames_is_undone_by_the_next(two_runs, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["export", str(two_runs / "run_a"), "--output", str(out)]) == 0
    before = _files(out)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_MOVING_ASIDE, "export", str(two_runs / "run_b"),
                             "--output", str(out), "--overwrite"], env=subprocess_env(), capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and len(list(tmp_path.glob("x.old-*"))) == 1
    capsys.readouterr()
    # the next export into it puts the earlier one back first (here refusing, as the folder is not empty)
    assert main(["export", str(two_runs / "run_b"), "--output", str(out)]) == 1
    assert _error_line(capsys.readouterr().err).startswith(f"error: --output {out} is not empty")
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the dead export's staging folder removed too


@pytest.mark.slow
def test_a_real_full_disk_during_an_overwrite(two_runs, tmp_path, capsys):
    """On a small tmpfs: RUN_A's export fits, RUN_A's plus RUN_B's staged beside it does not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for the test needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    size = sum(len(data) for data in _contents(two_runs / "ref_a").values()) + 3 * 4096 + 8192
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "x"
        assert main(["export", str(two_runs / "run_a"), "--output", str(out)]) == 0
        before = _files(out)
        capsys.readouterr()
        assert main(["export", str(two_runs / "run_b"), "--output", str(out), "--overwrite"]) == 1
        assert _error_line(capsys.readouterr().err).startswith(f"error: no space left on the device holding {out}")
        assert _files(out) == before and [p.name for p in disk.iterdir()] == ["x"]
        with contextlib.suppress(OSError):
            (disk / "fill").write_bytes(b"\0" * size)
        assert main(["export", str(two_runs / "run_a"), "--output", str(disk / "y")]) == 1
        assert "nothing was written" in _error_line(capsys.readouterr().err) and not (disk / "y").exists()
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_failed_export_into_new_folders_leaves_none_of_them(two_runs, tmp_path, monkeypatch, capsys):
    _full_disk_at(monkeypatch, "model.safetensors")
    assert main(["export", str(two_runs / "run_a"), "--output", str(tmp_path / "new" / "deeper" / "x")]) == 1
    assert "nothing was written" in _error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
