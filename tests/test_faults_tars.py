"""Faults of issue 32 in tars other tools wrote (`tinymim shards --index`): labels are read one way
(indices or names, never a silent mix; empty, non-ASCII-digit, negative and out-of-bound labels refused
in one line before anything is built from their value); member names compare on the tar's exact bytes
(GNU, pax and ustar tars with UTF-8, NFD, long and non-UTF-8 names index and read back); the key/class
check is for tinymim's own shards only; a malformed index.json is one line; `--output` takes the index
out of a (read-only) tar folder. Each CLI case runs as `tinymim ...` would (tests/cli_driver.py's
run_case, in this process): its exit status, the one line it prints, no traceback, what it left on disk."""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from cli_driver import run_case
from conftest import MICRO_DISTILL, with_overrides
from PIL import Image

from tinymim.core.errors import DataError
from tinymim.data.shard_index import MAX_CLASSES, index_webdataset
from tinymim.data.shards import ShardImages


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT, encoding="utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _labelled(folder: Path, labels: list, ext: str = "cls", keys: list[str] | None = None) -> list[bytes]:
    """One tar of len(labels) PNG samples, each followed by its label member (`ext`: cls/txt hold the
    text given, json a {"label": value} object); returns the images."""
    images, members = [], []
    for i, label in enumerate(labels):
        key = keys[i] if keys else f"s{i:05d}"
        images.append(_png(i))
        text = json.dumps({"label": label}).encode() if ext == "json" else str(label).encode()
        members += [(f"{key}.png", images[-1]), (f"{key}.{ext}", text)]
    _tar(folder / "part-000000.tar", members)
    return images


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], root: Path) -> str:
    """Runs the command; asserts it printed one `error:` line and no traceback, and changed nothing
    under root; returns the line."""
    before = _tree(root)
    result = run_case(argv)
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] == 1 and "Traceback" not in result["stderr"], result["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert _tree(root) == before  # nothing written: no index.json, nothing else
    return lines[0]


# ---------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize("labels, ext, expected", [
    (["", "0", "1"], "cls", "the cls label of s00000.cls in {tar} is empty"),
    (["0", "²", "1"], "cls", "the cls label of s00001.cls in {tar} is '²': neither a class index"),
    (["0", "99999999999"], "cls", "is class 99999999999, past the bound of 100,000 classes"),
    (["0", "1" + "0" * 1000], "cls", "is class 100000000000..., past the bound"),
    (["0", "-3"], "cls", "is the negative class -3"),
    (["0", "3.5"], "txt", "is '3.5': neither a class index"),
    (["3", "cat", "1"], "cls", "mix class indices and class names: sample 's00000' in {tar} is 3, sample 's00001' "
                               "in {tar} is 'cat'"),
    ([0, 1.5], "json", "is 1.5, not a whole number"),
    ([0, True], "json", "is true: neither a class index nor a class name"),
    ([0, 100000.0], "json", "is class 100000.0, outside 0..99999"),
    ([2, "dog"], "json", "mix class indices and class names"),
])
def test_bad_labels_are_one_line_naming_the_sample_and_write_nothing(tmp_path, labels, ext, expected):
    _labelled(tmp_path / "wds", labels, ext)
    label = "json:label" if ext == "json" else ext
    line = _refused(["shards", "--index", str(tmp_path / "wds"), "--label", label], tmp_path)
    assert expected.format(tar=tmp_path / "wds" / "part-000000.tar") in line


def test_a_label_member_too_big_to_be_a_class_is_refused_unread(tmp_path):
    _labelled(tmp_path / "wds", ["0", "x" * 5000], "txt")
    line = _refused(["shards", "--index", str(tmp_path / "wds"), "--label", "txt"], tmp_path)
    assert "s00001.txt in" in line and "is 5,000 bytes, not a class label (at most 1024 bytes)" in line


def test_integer_labels_parse_one_way_and_keep_their_values(tmp_path):
    """' 3 ', '3' and a newline, '03' are all class 3; classes run 0..max (the same index, the same class,
    in every set), and nothing is built from a value before it is bounded."""
    images = _labelled(tmp_path / "cls", [" 3 ", "3\n", "03", "5", "0"], "cls")
    index = index_webdataset(tmp_path / "cls", "cls")
    assert index["classes"] == ["0", "1", "2", "3", "4", "5"]
    data = ShardImages(tmp_path / "cls")
    assert [data.read_bytes(i) for i in range(5)] == list(zip(images, [3, 3, 3, 5, 0]))
    _labelled(tmp_path / "json", [1.0, 2, 0.0], "json")  # an integral JSON number is that integer
    index = index_webdataset(tmp_path / "json", "json:label")
    assert index["classes"] == ["0", "1", "2"] and index["shards"][0]["labels"] == [1, 2, 0]
    _labelled(tmp_path / "top", ["0", str(MAX_CLASSES - 1)], "cls")  # the largest index allowed
    assert len(index_webdataset(tmp_path / "top", "cls")["classes"]) == MAX_CLASSES


def test_name_labels_are_sorted_names(tmp_path):
    _labelled(tmp_path / "txt", ["dog", " cat\n", "Zebra", "cat"], "txt")
    index = index_webdataset(tmp_path / "txt", "txt")
    assert index["classes"] == ["Zebra", "cat", "dog"] and index["shards"][0]["labels"] == [2, 1, 0, 1]
    _labelled(tmp_path / "json", ["n01440764", "3rd class"], "json")  # a JSON string is text: names here
    assert index_webdataset(tmp_path / "json", "json:label")["classes"] == ["3rd class", "n01440764"]


def test_keys_under_a_folder_named_like_a_class_are_only_keys_in_other_tools_tars(tmp_path):
    """`3/s00003.jpg` labelled 7: the key/class check is for tinymim's own shards, whose keys name classes."""
    keys = [f"{c}/s{i:05d}" for i, c in enumerate([3, 3, 0, 9])]
    images = _labelled(tmp_path / "wds", [7, 1, 0, 2], "cls", keys)
    index_webdataset(tmp_path / "wds", "cls")
    data = ShardImages(tmp_path / "wds")
    assert [data.read_bytes(i) for i in range(4)] == list(zip(images, [7, 1, 0, 2]))


# ---------------------------------------------------------------------------------------------
# member names


# the first and last sample of a shard are the ones whose headers are checked when it is opened
NAMES = ["café/0003", unicodedata.normalize("NFD", "café/0004"), "日本/猫", "plain/0005", "x" * 60 + "/" + "é" * 60]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_utf8_nfd_and_long_member_names_index_and_read_back(tmp_path, fmt):
    """The names as the tar holds them (NFD kept NFD, never normalized), read back whole by every format;
    an index of an older tinymim (no header offsets: the header's name field, compared as bytes) too."""
    names = NAMES if fmt != tarfile.USTAR_FORMAT else NAMES[:4] + ["x" * 60 + "/" + "e" * 60]  # ustar: ASCII past 100
    images = [_png(i) for i in range(len(names))]
    _tar(tmp_path / "wds" / "a.tar", [m for n, img, c in zip(names, images, "01201")
                                      for m in ((f"{n}.png", img), (f"{n}.cls", c.encode()))], fmt)
    index = index_webdataset(tmp_path / "wds", "cls")
    assert index["shards"][0]["keys"] == names
    data = ShardImages(tmp_path / "wds")
    assert [data.read_bytes(i) for i in range(len(names))] == list(zip(images, [0, 1, 2, 0, 1]))
    assert ShardImages(tmp_path / "wds").describe(1) == f"a.tar:{names[1]}"
    del index["shards"][0]["header_offsets"]
    (tmp_path / "wds" / "index.json").write_text(json.dumps(index))
    data = ShardImages(tmp_path / "wds")
    assert [data.read_bytes(i)[0] for i in range(len(names))] == images


def test_non_utf8_member_names_are_kept_as_their_bytes(tmp_path):
    images = [_png(0), _png(1)]
    _tar(tmp_path / "wds" / "a.tar", [("caf\xe9/1.png", images[0]), ("caf\xe9/1.cls", b"0"),
                                      ("na\xefve/2.png", images[1]), ("na\xefve/2.cls", b"1")], encoding="latin-1")
    index_webdataset(tmp_path / "wds", "cls")
    data = ShardImages(tmp_path / "wds")
    assert [data.read_bytes(i) for i in range(2)] == [(images[0], 0), (images[1], 1)]
    assert data.describe(0) == "a.tar:caf\\xe9/1"


def test_a_tar_rewritten_with_other_names_is_refused_by_its_full_names(tmp_path):
    """The whole-name check still catches a tar written again: same sizes, a name differing past byte 100."""
    long = "d" * 120
    images = [_png(0), _png(1)]
    _tar(tmp_path / "wds" / "a.tar", [(f"{long}/a.png", images[0]), (f"{long}/a.cls", b"0")])
    index_webdataset(tmp_path / "wds", "cls")
    _tar(tmp_path / "wds" / "a.tar", [(f"{long}/b.png", images[0]), (f"{long}/b.cls", b"0")])
    with pytest.raises(DataError, match="does not match index.json") as e:
        ShardImages(tmp_path / "wds")
    assert f"holds '{long}/b.png'" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# index.json


@pytest.mark.parametrize("text, expected", [
    ("[" * 200_000, "is corrupt (nested too deep to be an index)"),
    ('{"format": "tinymim-shards", "version": 1, "classes": [], "total": 1e999, "shards": '
     '[{"name": "a.tar", "samples": 1e999}]}', "is not a readable shard index (cannot convert float infinity"),
    ('{"format": "tinymim-shards", "version": 1, "source": "webdataset", "tars": 3, "classes": ["0"], '
     '"total": 0, "shards": []}', "is not a readable shard index (its tars folder 3 is not a path)"),
])
def test_a_malformed_index_is_one_line_naming_it(tmp_path, text, expected):
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "index.json").write_text(text)
    with pytest.raises(DataError) as e:
        ShardImages(tmp_path / "wds")
    assert expected in str(e.value) and f"{tmp_path / 'wds' / 'index.json'}" in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    line = _refused(["distill", *with_overrides(MICRO_DISTILL, "data.name=shards", f"data.root={tmp_path / 'wds'}"),
                     "--output", str(tmp_path / "run")], tmp_path)
    assert expected in line


# ---------------------------------------------------------------------------------------------
# --output


def test_the_index_goes_to_output_and_the_tars_are_read_where_they_are(tmp_path):
    images = _labelled(tmp_path / "tars", ["1", "0", "1"], "cls")
    _tar(tmp_path / "tars" / "part-000001.tar", [("z.png", _png(9)), ("z.cls", b"2")])
    before = _tree(tmp_path / "tars")
    result = run_case(["shards", "--index", str(tmp_path / "tars"), "--output", str(tmp_path / "idx")])
    assert result["rc"] == 0, result["stderr"]
    assert _tree(tmp_path / "tars") == before  # nothing written beside the tars
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["tars"] == "../tars"
    data = ShardImages(tmp_path / "idx")
    assert [data.read_bytes(i) for i in range(4)] == [*zip(images, [1, 0, 1]), (_png(9), 2)]
    part = ShardImages(f"{tmp_path / 'idx'}/part-{{000001..000001}}.tar")  # a brace pattern of the index's shards
    assert [part.read_bytes(0)] == [(_png(9), 2)]
    line = _refused(["shards", "--index", str(tmp_path / "tars"), "--output", str(tmp_path / "idx")], tmp_path)
    assert f"{tmp_path / 'idx' / 'index.json'} exists already" in line
    with pytest.raises(DataError, match="serve the index beside its tars"):  # no URL relative to another folder
        ShardImages((tmp_path / "idx").as_uri(), cache=tmp_path / "cache")


def test_an_index_naming_another_tar_folder_still_reads_plain_shard_names_only(tmp_path):
    _labelled(tmp_path / "tars", ["0"], "cls")
    index = index_webdataset(tmp_path / "tars", "cls", tmp_path / "idx")
    index["shards"][0]["name"] = "../tars/part-000000.tar"
    (tmp_path / "idx" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="not a plain file name"):
        ShardImages(tmp_path / "idx")


@contextlib.contextmanager
def _read_only(folder: Path):
    """folder made read-only: mode 0555, or for root (whom modes do not stop) the immutable attribute."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root ignores mode 0555 and chattr +i is not available here")
    try:
        yield
    finally:
        if os.geteuid() != 0:
            os.chmod(folder, 0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_tars_in_a_read_only_folder_are_indexed_into_output(tmp_path):
    images = _labelled(tmp_path / "ro", ["0", "1"], "cls")
    with _read_only(tmp_path / "ro"):
        line = _refused(["shards", "--index", str(tmp_path / "ro")], tmp_path)
        assert f"cannot write {tmp_path / 'ro' / 'index.json'}: permission denied" in line and "--output" in line
        result = run_case(["shards", "--index", str(tmp_path / "ro"), "--output", str(tmp_path / "idx")])
        assert result["rc"] == 0, result["stderr"]
        data = ShardImages(tmp_path / "idx")
        assert [data.read_bytes(i) for i in range(2)] == [(images[0], 0), (images[1], 1)]


def test_a_run_trains_on_utf8_named_tars_keyed_like_classes_indexed_elsewhere(tmp_path):
    """The issue's two refusals at once, through a real run: `café/` and `3/` keys in GNU tars, indexed into
    another folder, then a 2-step distillation reads them."""
    for t in range(2):
        members = []
        for i in range(16):
            key = f"café/{t}{i:02d}" if i % 2 else f"3/s{t}{i:04d}"
            members += [(f"{key}.png", _png(100 * t + i)), (f"{key}.cls", str(i % 5).encode())]
        _tar(tmp_path / "tars" / f"part-{t:06d}.tar", members)
    assert run_case(["shards", "--index", str(tmp_path / "tars"), "--output", str(tmp_path / "idx")])["rc"] == 0
    result = run_case(["distill", *with_overrides(MICRO_DISTILL, "data.name=shards",
                                                  f"data.root={tmp_path / 'idx'}"), "--output", str(tmp_path / "run")])
    assert result["rc"] == 0, result["stderr"]
    assert (tmp_path / "run" / "checkpoints").is_dir()
