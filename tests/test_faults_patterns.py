"""Shard brace patterns counted before they are expanded, selection by pattern, and a full or read-only
shard cache (issue 32): each fault is one line, and nothing a run saved before changes."""
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import subprocess_env as env
from PIL import Image

from tinymim.core.errors import DataError
from tinymim.data.shard_format import MAX_PATTERN_NAMES, count_braces, expand_braces
from tinymim.data.shard_writer import write_shards
from tinymim.data.shards import ShardImages
from tinymim.data.sources import FolderImages

HERE = Path(__file__).resolve().parent

# a 12-step run on 48 images in 6 shards of 8, read through a file:// URL (so every shard is downloaded
# into data.shard_cache) by one loader worker; checkpoints at steps 4 and 8
TINY = ["student.name=vit_custom", "student.img_size=32", "student.patch_size=8", "student.embed_dim=32",
        "student.depth=2", "student.num_heads=2", "teacher.model.name=vit_custom", "teacher.model.img_size=32",
        "teacher.model.patch_size=8", "teacher.model.embed_dim=32", "teacher.model.depth=2",
        "teacher.model.num_heads=2", "teacher.target_block=2", "data.name=shards", "data.img_size=32",
        "data.num_workers=1", "train.batch_size=8", "train.epochs=2", "train.precision=fp32",
        "train.progress=false", "train.warmup_epochs=0.5", "train.checkpoint_every=4"]

# `python -c WRAPPER MODE CACHE tinymim-arguments...`: the real CLI, with the storage of the folder CACHE
# made read-only or full (the tests run as root, which ignores file modes, and there is no small disk to
# fill), or with the address space capped 1.5 GB above what the process already holds. Loader workers
# are forked, so they inherit the fault.
WRAPPER = r"""
import builtins, errno, os, resource, sys
from tinymim.cli import main

mode, cache = sys.argv[1], os.path.realpath(sys.argv[2])

def under(path):
    try:
        return os.path.realpath(os.fspath(path)).startswith(cache)
    except TypeError:
        return False

def refused(code, path):
    return OSError(code, os.strerror(code), os.fspath(path))

if mode == "readonly":
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def ro_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            raise refused(errno.EROFS, file)
        return real_open(file, mode, *a, **k)

    def ro_os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refused(errno.EROFS, path)
        return real_os_open(path, flags, *a, **k)

    def ro_mkdir(path, *a, **k):
        if under(path):
            raise refused(errno.EEXIST if os.path.exists(path) else errno.EROFS, path)
        return real_mkdir(path, *a, **k)

    builtins.open, os.open, os.mkdir = ro_open, ro_os_open, ro_mkdir
elif mode == "full":
    import tinymim.core.files as files
    real_open_tmp = files._open_tmp

    class Full:  # a file on a disk with 1 KiB left
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 1024:
                raise refused(errno.ENOSPC, "")
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open_tmp(path):
        tmp, f = real_open_tmp(path)
        return (tmp, Full(f)) if under(path) else (tmp, f)

    files._open_tmp = full_open_tmp
elif mode == "cap":  # torch and the task loaded first: the cap is on what the run then allocates
    import torch, torchvision, tinymim.tasks.distill
    with open("/proc/self/status") as f:
        held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (held + (3 << 29), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[3:]))
"""


def wrapped(mode: str, cache: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, mode, str(cache), *args], env=env(), capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    return errors[0]


def hashes(root: Path) -> dict:
    """Every file under root by its bytes' hash; the run's .lock (it names the last process to take it) left out."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 random 32px JPEGs of 4 classes in 6 shards of 8."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(4):
        (folder / f"class_{c}").mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"class_{c}" / f"{i}.jpg")
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(FolderImages(folder), out, shard_size=8, seed=0)
    return out


# ---------------------------------------------------------------------------------------------
# patterns


def test_patterns_expand_as_webdataset_does():
    assert expand_braces("t-{000008..000010}.tar") == ["t-000008.tar", "t-000009.tar", "t-000010.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]  # no leading zero: no padding
    assert expand_braces("s-{7..7}.tar") == ["s-7.tar"] and expand_braces("plain.tar") == ["plain.tar"]
    names = expand_braces("shard-{000000..999999}.tar")  # exactly the bound: expanded
    assert len(names) == MAX_PATTERN_NAMES and names[-1] == "shard-999999.tar"


@pytest.mark.parametrize("pattern, count", [("shard-{0..99999999}.tar", 100_000_000),
                                            ("{0..9}" * 7, 10_000_000),
                                            ("x" + "{0,1}" * 40, 2 ** 40),
                                            ("s-{000000..999999}-{a,b}.tar", 2_000_000)])
def test_a_pattern_past_the_bound_is_counted_not_expanded(pattern, count):
    assert count_braces(pattern)[0] == count  # from the bounds, without a name made
    started = time.perf_counter()
    with pytest.raises(DataError) as e:
        expand_braces(pattern)
    message = str(e.value)
    assert "\n" not in message and pattern in message
    assert f"{count:,}" in message and f"{MAX_PATTERN_NAMES:,}" in message
    print(f"{pattern[:40]}: refused in {time.perf_counter() - started:.6f} s")


@pytest.mark.parametrize("pattern, words", [("s-{5..1}.tar", "reversed range {5..1}"),
                                            ("s-{}.tar", "empty {}"),
                                            ("s-{1..}.tar", "range {1..}"),
                                            ("s-{..}.tar", "range {..}"),
                                            ("s-{a..z}.tar", "range {a..z}"),
                                            ("s-{-1..3}.tar", "range {-1..3}"),
                                            ("s-{1..5..2}.tar", "range {1..5..2}"),
                                            ("s-{" + "9" * 5000 + "..1}.tar", "up to 18 digits"),
                                            ("s-{1..3.tar", "unmatched or nested brace at character 3"),
                                            ("s-1..3}.tar", "unmatched or nested brace at character 7"),
                                            ("s-{a,{b,c}}.tar", "unmatched or nested brace at character 3")])
def test_a_malformed_pattern_is_one_line(pattern, words):
    with pytest.raises(DataError) as e:
        expand_braces(pattern)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.slow
def test_a_huge_pattern_as_data_root_is_one_line_under_a_memory_cap(shards, tmp_path):
    """10^8 names would take gigabytes: with the address space capped 1.5 GB above what the CLI holds
    before it starts, the run is still refused in one line, and writes nothing."""
    out = tmp_path / "run"
    r = wrapped("cap", tmp_path / "unused", ["distill", *TINY, f"data.root={shards}/shard-{{0..99999999}}.tar",
                                             "--output", str(out)])
    assert r.returncode == 1, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "shard-{0..99999999}.tar names 100,000,000 shards, more than the 1,000,000" in line, line
    assert "MemoryError" not in r.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# selecting shards by pattern


def test_a_pattern_selects_its_shards_in_the_index_order(shards):
    picked = ShardImages(f"{shards}/shard-{{000001..000003}}.tar")
    assert [s.name for s in picked.shards] == ["shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    whole = ShardImages(shards)
    first = whole.shards[1].start
    assert len(picked) == 24 and all(picked.read_bytes(i) == whole.read_bytes(first + i) for i in range(24))
    listed = ShardImages(f"{shards}/shard-{{000004,000000}}.tar")  # listed out of order: read in the index's
    assert [s.name for s in listed.shards] == ["shard-000000.tar", "shard-000004.tar"]
    with pytest.raises(DataError) as e:
        ShardImages(f"{shards}/shard-{{000004..000009}}.tar")
    message = str(e.value)
    assert "\n" not in message and "names shard-000006.tar and 3 more, which" in message
    assert "index.json does not list (it has 6 shards, e.g. shard-000000.tar)" in message


def test_selecting_20000_shards_by_a_20000_name_pattern_takes_each_once():
    """The index restricted to a pattern's shards by set lookups: 20,000 of 20,000 (a list's `in` made
    this 31 s); the time is printed, not asserted."""
    n = 20_000
    index = {"shards": [{"name": f"shard-{i:06d}.tar", "samples": i % 3 + 1} for i in range(n)], "total": 0}
    pattern = f"shard-{{000000..{n - 1:06d}}}.tar"
    reader = SimpleNamespace(pattern=pattern, selected=expand_braces(pattern), _where="DIR/index.json")
    started = time.perf_counter()
    chosen = ShardImages._select(reader, index)
    print(f"selected {n} shards of {n} in {time.perf_counter() - started:.3f} s")
    assert [s["name"] for s in chosen["shards"]] == [s["name"] for s in index["shards"]]
    assert chosen["total"] == sum(i % 3 + 1 for i in range(n))
    reader.selected = expand_braces("shard-{010000..020001}.tar")  # the last two are not in the index
    with pytest.raises(DataError, match=r"names shard-020000\.tar and 1 more, which DIR/index\.json does not list "
                                        r"\(it has 20000 shards"):
        ShardImages._select(reader, index)


# ---------------------------------------------------------------------------------------------
# a full or read-only shard cache


@pytest.mark.slow
@pytest.mark.parametrize("mode, state", [("readonly", "is read-only (Read-only file system)"),
                                         ("full", "is full (no space left)")])
def test_a_full_or_read_only_shard_cache_is_one_line_and_the_checkpoint_stays(shards, tmp_path, mode, state):
    """A run killed while writing its second checkpoint (last.pt holds step 4) resumes with a shard cache
    that cannot take its shards: one line naming the cache as read-only or full, from inside the loader's
    worker, not 16 images skipped as unreadable; the checkpoint is as the kill left it."""
    out = tmp_path / "run"
    args = ["distill", *TINY, f"data.root={shards.as_uri()}", "--output", str(out)]
    r = subprocess.run([sys.executable, str(HERE / "faulty_run.py"), "kill", "2", "--", *args,
                        f"data.shard_cache={tmp_path / 'good'}"], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    saved = hashes(out)
    assert "checkpoints/last.pt" in saved
    bad = tmp_path / "bad"
    if mode == "readonly":
        bad.mkdir()  # an existing folder on read-only storage
    r = wrapped(mode, bad, [*args, f"data.shard_cache={bad}"])
    assert r.returncode == 1, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert line.startswith(f"error: the shard cache {bad}/") and state in line, line
    assert "set data.shard_cache to a writable folder with room" in line, line
    assert "consecutive images" not in r.stderr and "skipping unreadable" not in r.stderr
    assert f"resuming {out} from step 4" in r.stderr
    # the resumption records its new data.shard_cache in config.yaml and clears the kill's temporary
    # file, as any resumption does; the checkpoint and everything else is byte for byte as it was
    kept = {k: v for k, v in saved.items() if k != "config.yaml" and not k.endswith(".tmp")}
    assert {k: v for k, v in hashes(out).items() if k != "config.yaml"} == kept
    assert not list(bad.rglob("*.tar"))
