"""Sharded data (tinymim.data.shards): an ImageFolder written as WebDataset tar shards holds every file byte
for byte where its index says; ranks read disjoint whole shards that together cover every sample once an
epoch, in one process and under torchrun; training from shards resumes bit-identically after SIGKILL;
shards served from a URL are downloaded once into a cache; bad input is one line naming the file."""
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TORCHRUN, tiny_distill_config
from conftest import subprocess_env as env
from PIL import Image
from safetensors.torch import load_file

import tinymim.tasks as tasks
from tinymim.core.errors import DataError
from tinymim.core.rundir import RunDir
from tinymim.data.loader import ShardBatchSampler
from tinymim.data.pretrain import DataConfig
from tinymim.data.shard_writer import write_shards
from tinymim.data.shards import ShardImages
from tinymim.data.sources import FolderImages, data_fingerprint
from tinymim.data.view_dataset import PairedViewDataset

HERE = Path(__file__).resolve().parent
# webdataset's split of a member name into (key, extension) (webdataset.tariterators.base_plus_ext)
WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
CLASSES, PER_CLASS, SHARD = 4, 12, 6  # 48 images in 8 shards of 6


def one_line(e: Exception) -> str:
    text = str(e)
    assert "\n" not in text and len(text) < 600, text
    return text


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 classes of 12 random 32px images: JPEGs, an upper-case .JPEG, a PNG beside a JPEG of the same
    name, and a name with dots (WebDataset keys may hold none)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir()
        for i in range(PER_CLASS):
            name = {0: "first.v2.jpg", 1: "upper.JPEG", 2: "flat.png", 3: "flat.jpg"}.get(i, f"{i:03d}.jpg")
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class_{c}" / name)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(FolderImages(folder), out, shard_size=SHARD, seed=0)
    return out


@pytest.fixture(scope="module")
def wds_shards(folder, tmp_path_factory) -> Path:
    """The same images as `shards`, written by the webdataset package's own ShardWriter (its member names,
    its tar layout) in a seeded order, then indexed by `tinymim shards --index`."""
    import random

    wds = pytest.importorskip("webdataset")
    from tinymim.data.shard_index import index_webdataset

    out = tmp_path_factory.mktemp("wds") / "train"
    out.mkdir()
    source = FolderImages(folder)
    order = list(range(len(source.samples)))
    random.Random(0).shuffle(order)
    with wds.ShardWriter(str(out / "part-%06d.tar"), maxcount=SHARD, verbose=0) as sink:
        for n, i in enumerate(order):
            path, label = source.samples[i]
            sink.write({"__key__": f"s{n:05d}", Path(path).suffix.lower().lstrip("."): Path(path).read_bytes(),
                        "cls": label})
    index_webdataset(out)
    return out


@pytest.fixture(params=["tinymim", "webdataset"])
def any_shards(request) -> Path:
    """Shards tinymim wrote, and shards webdataset wrote: training reads both the same way."""
    return request.getfixturevalue("shards" if request.param == "tinymim" else "wds_shards")


# ---------------------------------------------------------------------------------------------
# writing


def test_shards_hold_the_folder_byte_for_byte_where_the_index_says(folder, shards):
    source = FolderImages(folder)
    index = json.loads((shards / "index.json").read_text())
    assert (index["format"], index["version"], index["total"]) == ("tinymim-shards", 1, CLASSES * PER_CLASS)
    assert index["classes"] == source.classes and index["class_counts"] == {c: PER_CLASS for c in source.classes}
    assert [s["name"] for s in index["shards"]] == [f"shard-{k:06d}.tar" for k in range(8)]
    assert [s["samples"] for s in index["shards"]] == [SHARD] * 8
    assert sorted(p.name for p in shards.iterdir()) == ["index.json", *(s["name"] for s in index["shards"])]

    read = []
    for s in index["shards"]:
        path = shards / s["name"]
        assert path.stat().st_size == s["bytes"]
        with open(path, "rb") as f:  # straight to each sample by the index's offset
            for key, ext, offset, size, label in zip(s["keys"], s["exts"], s["offsets"], s["sizes"], s["labels"]):
                f.seek(offset)
                data = f.read(size)
                read.append((data, label))
                plain = folder / f"{key}.{ext}"
                if plain.is_file():
                    assert data == plain.read_bytes(), key
        with tarfile.open(path) as tar:  # a valid tar: image then label per sample, WebDataset-style
            members = tar.getmembers()
            assert len(members) == 2 * s["samples"]
            for n, key in enumerate(s["keys"]):
                image, cls = members[2 * n], members[2 * n + 1]
                assert WDS_NAME.match(image.name).groups() == (key, s["exts"][n])
                assert WDS_NAME.match(cls.name).groups() == (key, "cls")
                assert image.offset_data == s["offsets"][n] and image.size == s["sizes"][n]
                assert tar.extractfile(cls).read() == str(s["labels"][n]).encode()
        assert len(set(s["labels"])) > 1, f"{s['name']} holds one class"  # the write order is shuffled
    expected = [(Path(p).read_bytes(), label) for p, label in source.samples]
    assert sorted(read) == sorted(expected)  # every file once, with its label

    keys = {k: e for s in index["shards"] for k, e in zip(s["keys"], s["exts"])}
    assert keys["class_0/first_v2"] == "jpg" and keys["class_0/upper"] == "jpeg"  # no dot in a key; ext lowercased
    assert {keys["class_0/flat"], keys["class_0/flat_2"]} == {"jpg", "png"}  # same name, two files: two keys
    assert len(keys) == CLASSES * PER_CLASS and not list(shards.rglob("*.tmp"))


def test_shard_sizes_are_equal_but_the_last(folder, tmp_path):
    index = write_shards(FolderImages(folder), tmp_path / "s", shard_size=10, seed=1)
    assert [s["samples"] for s in index["shards"]] == [10, 10, 10, 10, 8]


def test_the_reader_gives_the_source_images(folder, shards):
    src, source = ShardImages(shards), FolderImages(folder)
    assert len(src) == len(source) and src.classes == source.classes
    assert [len(r) for r in src.shard_ranges] == [SHARD] * 8 and src.shard_of(13).name == "shard-000002.tar"
    by_bytes = {Path(p).read_bytes(): (p, label) for p, label in source.samples}
    for i in range(len(src)):
        data, label = src.read_bytes(i)
        path, expected = by_bytes[data]
        img, got = src.load(i)
        assert got == label == expected
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))
        assert re.fullmatch(rf"{src.shard_of(i).name}:class_\d/\w+", src.describe(i))
    # the device-decode path gets the shard's encoded JPEG
    dataset = PairedViewDataset(src, DataConfig(name="shards", root=str(shards), img_size=16, decode="device"))
    jpeg = next(i for i in range(len(src)) if src.read_bytes(i)[0][:2] == b"\xff\xd8")
    payload = dataset[(jpeg, 7)][0]
    assert bytes(payload["data"].numpy()) == src.read_bytes(jpeg)[0] and payload["name"] == src.describe(jpeg)


def test_writing_refuses_bad_input_in_one_line_and_writes_nothing(folder, shards, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in shards.iterdir()}
    with pytest.raises(DataError, match="already holds shards") as e:
        write_shards(FolderImages(folder), shards)
    assert str(shards) in one_line(e.value)
    assert {p: p.stat().st_mtime_ns for p in shards.iterdir()} == before
    with pytest.raises(DataError, match="shard size must be 1 or more") as e:
        write_shards(FolderImages(folder), tmp_path / "out", shard_size=0)
    one_line(e.value)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images") as e:
        write_shards(FolderImages(tmp_path / "empty"), tmp_path / "out")
    one_line(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_writes_shards_and_says_what(folder, tmp_path, capsys):
    from tinymim.cli import main

    assert main(["shards", str(folder), "--output", str(tmp_path / "s"), "--shard-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 shards (48 images, 4 classes" in out and f"data.root={tmp_path / 's'}" in out
    assert len(ShardImages(tmp_path / "s")) == 48
    assert main(["shards", str(folder), "--output", str(tmp_path / "s")]) == 1  # the error path: one line
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "already holds shards" in err[0]


# ---------------------------------------------------------------------------------------------
# sampling


def epoch(sampler: ShardBatchSampler, e: int, start: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(e, start)
    return list(sampler)


def test_two_ranks_read_disjoint_whole_shards_covering_every_sample_once(any_shards):
    src = ShardImages(any_shards)
    ranks = [ShardBatchSampler(src.shard_ranges, 8, rank, 2, seed=5) for rank in (0, 1)]
    orders, seeds, assignments = [], [], []
    for e in range(3):
        read = [epoch(s, e) for s in ranks]
        assert [len(r) for r in read] == [s.steps_per_epoch for s in ranks] == [6, 6]
        assert all(len(batch) == 4 for r in read for batch in r)
        mine = [[i for batch in r for i, _ in batch] for r in read]
        names = [{src.shard_of(i).name for i in m} for m in mine]
        assert not names[0] & names[1]  # disjoint shards
        for m, ns in zip(mine, names):  # whole shards: every sample of a rank's shards, once
            assert sorted(m) == sorted(i for s in src.shards if s.name in ns for i in s.range)
        assert collections.Counter(mine[0] + mine[1]) == collections.Counter(range(48))
        orders.append(mine[0])
        assignments.append(ranks[0].assignment(e))
        seeds += [seed for r in read for batch in r for _, seed in batch]
    assert orders[0] != orders[1] != orders[2] and assignments[0] != assignments[1]
    assert len(set(seeds)) == len(seeds)  # one sample seed per (epoch, global position)
    again = ShardBatchSampler(src.shard_ranges, 8, 1, 2, seed=5)
    assert epoch(again, 1) == epoch(ranks[1], 1)  # deterministic from (seed, epoch)
    resumed = epoch(again, 1, start=4)
    assert len(again) == 2 and resumed == epoch(ranks[1], 1)[4:]  # exactly the remaining batches


def test_uneven_shards_wrap_and_every_rank_takes_the_same_steps():
    ranges = [range(0, 10), range(10, 20), range(20, 30), range(30, 33)]
    samplers = [ShardBatchSampler(ranges, 8, rank, 2, seed=0) for rank in (0, 1)]
    read = [[i for batch in s for i, _ in batch] for s in samplers]
    assert [len(s) for s in samplers] == [4, 4] and [len(r) for r in read] == [16, 16]  # 33 // 8 steps each
    assigned = samplers[0].assignment(0)
    assert sorted(sum(assigned, [])) == [0, 1, 2, 3] and sorted(map(len, assigned)) == [2, 2]
    for r, shards_of_rank in zip(read, assigned):
        own = {i for s in shards_of_rank for i in ranges[s]}
        assert set(r) <= own and (len(own) >= 16 or set(r) == own)  # short of samples: it starts over


def test_more_processes_than_shards_is_refused():
    with pytest.raises(DataError, match="3 processes but 2 shards") as e:
        ShardBatchSampler([range(0, 8), range(8, 16)], 6, 0, 3)
    assert "--shard-size" in one_line(e.value)


@pytest.mark.slow
def test_two_processes_under_torchrun_read_disjoint_shards_and_every_sample_once(any_shards, tmp_path):
    r = subprocess.run([*TORCHRUN, str(HERE / "shard_loader_worker.py"), str(any_shards), str(tmp_path / "records")],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("READS "))[6:])
    assert [(x["rank"], x["sampler"], x["steps"], x["steps_per_epoch"]) for x in ranks] == \
        [(0, "ShardBatchSampler", 6, 6), (1, "ShardBatchSampler", 6, 6)]
    names = [{read.split(":")[0] for read in x["reads"]} for x in ranks]
    assert not names[0] & names[1] and len(names[0]) == len(names[1]) == 4
    everything = [read for x in ranks for read in x["reads"]]
    src = ShardImages(any_shards)
    assert collections.Counter(everything) == collections.Counter(src.describe(i) for i in range(len(src)))


# ---------------------------------------------------------------------------------------------
# training


TINY = ["student.name=vit_custom", "student.img_size=32", "student.patch_size=8", "student.embed_dim=32",
        "student.depth=2", "student.num_heads=2", "student.drop_path_rate=0.1", "teacher.model.name=vit_custom",
        "teacher.model.img_size=32", "teacher.model.patch_size=8", "teacher.model.embed_dim=64",
        "teacher.model.depth=2", "teacher.model.num_heads=4", "teacher.target_block=2", "data.name=shards",
        "data.img_size=32", "data.num_workers=1", "train.batch_size=8", "train.epochs=2", "train.precision=fp32",
        "train.progress=false", "train.log_every=1", "train.warmup_epochs=0.5", "train.checkpoint_every=4"]
# 6 steps an epoch, 12 in all; checkpoints at steps 4, 6 and 8


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).read_metrics() if "loss" in r]


@pytest.mark.slow
def test_training_from_shards_resumes_bit_identically_after_sigkill(any_shards, tmp_path):
    args = ["distill", *TINY, f"data.root={any_shards}"]
    straight = tmp_path / "straight"
    r = subprocess.run([sys.executable, "-m", "tinymim", *args, "--output", str(straight)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"  # SIGKILLed while writing its second checkpoint: last.pt holds step 4
    r = subprocess.run([sys.executable, str(HERE / "faulty_run.py"), "kill", "2", "--", *args, "--output", str(killed)],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 4
    r = subprocess.run([sys.executable, "-m", "tinymim", *args, "--output", str(killed)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resuming {killed} from step 4" in r.stderr, r.stderr[-3000:]
    a, b = load_file(straight / "student.safetensors"), load_file(killed / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in losses(killed)] == [s for s, _ in losses(straight)] == list(range(1, 13))
    assert [x for _, x in losses(killed)] == pytest.approx([x for _, x in losses(straight)], abs=1e-6)


def test_classification_trains_and_evaluates_on_shards(shards):
    from tinymim.data.classification import ClassifyDataConfig, build_classify_loaders, build_eval_loader

    cfg = ClassifyDataConfig(name="shards", root=str(shards), val_root=str(shards), img_size=32, num_workers=0,
                             auto_augment=None, reprob=0)
    loader, sampler = build_classify_loaders(cfg, 8, 0, 1, 0)
    assert isinstance(sampler, ShardBatchSampler) and len(sampler) == 6
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["skipped"] == 0
    evaluation = build_eval_loader(cfg, 16)
    assert sum(len(b["label"]) for b in evaluation) == 48


# ---------------------------------------------------------------------------------------------
# served from a URL, and what goes wrong


def test_a_file_url_is_downloaded_once_into_the_cache_and_reads_the_same(folder, shards, tmp_path, monkeypatch):
    local, url = ShardImages(shards), f"{shards.as_uri()}/"
    remote = ShardImages(url, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.tar"))  # nothing fetched before a sample is read
    remote.read_bytes(13)
    assert [p.name for p in remote.cache.glob("*.tar")] == ["shard-000002.tar"]
    assert all(remote.read_bytes(i) == local.read_bytes(i) for i in range(len(local)))
    assert remote.describe(5) == local.describe(5)
    assert data_fingerprint(remote) == data_fingerprint(local)  # a run may move between the two
    for s in local.shards:
        assert (remote.cache / s.name).read_bytes() == (shards / s.name).read_bytes()
    assert remote.cache.parent == tmp_path / "cache"  # a subfolder per URL and index: sets never share files
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ShardImages(url).cache == tmp_path / "home" / ".cache" / "tinymim" / "shards" / remote.cache.name
    other = tmp_path / "other"
    write_shards(FolderImages(folder), other, shard_size=SHARD, seed=1)  # another set, the same shard names
    assert ShardImages(other.as_uri(), cache=tmp_path / "cache").cache != remote.cache


def test_missing_index_or_shard_is_one_line_naming_the_file(shards, tmp_path, capsys):
    with pytest.raises(DataError) as e:
        ShardImages(tmp_path / "nope")
    assert str(tmp_path / "nope" / "index.json") in one_line(e.value) and "tinymim shards" in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match="is missing") as e:
        ShardImages(broken)
    assert str(broken / "shard-000003.tar") in one_line(e.value)
    with pytest.raises(DataError) as e:
        ShardImages(broken.as_uri(), cache=tmp_path / "cache")
    assert f"{broken.as_uri()}/shard-000003.tar" in one_line(e.value)
    (broken / "index.json").write_text((shards / "index.json").read_text()[:300])  # cut short
    with pytest.raises(DataError, match="corrupt") as e:
        ShardImages(broken)
    assert str(broken / "index.json") in one_line(e.value)

    from tinymim.cli import main

    shutil.copy(shards / "index.json", broken)
    rc = main(["distill", *TINY, f"data.root={broken}", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: shard ") and "shard-000003.tar is missing" in err[-1]


# ---------------------------------------------------------------------------------------------
# trust what comes in: what an index names, what the shards hold, what a folder tree holds


def snapshot(root: Path) -> dict:
    """Every file under root (links not followed) and its bytes: to show nothing saved changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def with_index(shards: Path, dest: Path, edit) -> Path:
    """A copy of the shard folder whose index was changed by edit(index)."""
    shutil.copytree(shards, dest)
    index = json.loads((dest / "index.json").read_text())
    edit(index)
    (dest / "index.json").write_text(json.dumps(index))
    return dest


@pytest.fixture(scope="module")
def bmps(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, shards) of 4 classes of 12 64px BMPs: every file, and so every shard, the same size."""
    root = tmp_path_factory.mktemp("bmps") / "src"
    rng = np.random.default_rng(1)
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i:03d}.bmp")
    out = root.parent / "shards"
    write_shards(FolderImages(root), out, shard_size=SHARD, seed=0)
    return root, out


@pytest.mark.slow
def test_an_index_naming_a_shard_outside_its_folder_is_refused_before_anything_is_read(shards, tmp_path):
    outside = tmp_path / "x.tar"
    shutil.copy(shards / "shard-000000.tar", outside)  # what a traversing name would reach
    for n, bad in enumerate(["../x.tar", str(outside), "sub/x.tar", "sub\\x.tar", "..", ""]):
        local = with_index(shards, tmp_path / f"local{n}", lambda ix: ix["shards"][0].update(name=bad))
        before = snapshot(tmp_path)
        with pytest.raises(DataError, match="not a plain file name") as e:
            ShardImages(local)
        assert str(local / "index.json") in one_line(e.value) and repr(bad) in str(e.value)
        assert snapshot(tmp_path) == before
    twice = with_index(shards, tmp_path / "twice", lambda ix: ix["shards"][1].update(name="shard-000000.tar"))
    with pytest.raises(DataError, match="names shard shard-000000.tar twice"):
        ShardImages(twice)

    # from a URL, through the command line: nothing downloaded, nothing written outside the cache
    remote = with_index(shards, tmp_path / "remote", lambda ix: ix["shards"][0].update(name="sub/../../../x.tar"))
    (tmp_path / "remote" / "sub").mkdir()
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "tinymim", "distill", *TINY, f"data.root={remote.as_uri()}",
                        f"data.shard_cache={tmp_path / 'cache'}", "--output", str(tmp_path / "run")],
                       env=env(), capture_output=True, text=True, timeout=300)
    line = last_line(r.stderr)
    assert r.returncode == 1 and line.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{remote.as_uri()}/index.json names shard 'sub/../../../x.tar'" in line
    assert not (tmp_path / "cache").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run/")} == before


def test_labels_that_do_not_match_the_keys_classes_are_refused(shards, tmp_path):
    def rotate(index):
        for s in index["shards"]:
            s["labels"] = [(label + 1) % CLASSES for label in s["labels"]]

    rotated = with_index(shards, tmp_path / "rotated", rotate)
    before = snapshot(rotated)
    with pytest.raises(DataError, match="its labels do not match its class list") as e:
        ShardImages(rotated)
    assert str(rotated / "index.json") in one_line(e.value) and "tinymim shards SRC --output DIR" in str(e.value)
    with pytest.raises(DataError, match="its labels do not match its class list"):  # from a URL: before any download
        ShardImages(rotated.as_uri(), cache=tmp_path / "cache")
    assert snapshot(rotated) == before and not (tmp_path / "cache").exists()


def test_shards_swapped_by_name_are_refused(bmps, tmp_path):
    _, shards = bmps
    swapped = tmp_path / "swapped"
    shutil.copytree(shards, swapped)
    a, b = swapped / "shard-000001.tar", swapped / "shard-000002.tar"
    assert a.stat().st_size == b.stat().st_size  # the size check cannot tell them apart
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    before = snapshot(swapped)
    with pytest.raises(DataError, match="does not match index.json") as e:
        ShardImages(swapped)
    assert f"shard {a} " in one_line(e.value)
    assert "rewrite the shards with `tinymim shards SRC --output DIR`" in str(e.value)
    remote = ShardImages(swapped.as_uri(), cache=tmp_path / "cache")  # from a URL: checked once downloaded
    remote.read_bytes(0)
    with pytest.raises(DataError, match="does not match index.json") as e:
        remote.read_bytes(remote.shards[1].start)
    assert str(remote.cache / "shard-000001.tar") in one_line(e.value)
    assert snapshot(swapped) == before


def test_offsets_that_do_not_match_the_tar_headers_are_refused(shards, tmp_path):
    for n, (shard, sample, shift) in enumerate([(3, -1, 512), (5, 0, -512), (2, -1, 1)]):
        def edit(index):
            index["shards"][shard]["offsets"][sample] += shift

        moved = with_index(shards, tmp_path / f"moved{n}", edit)
        with pytest.raises(DataError, match="does not match index.json") as e:
            ShardImages(moved)
        assert f"shard {moved / f'shard-{shard:06d}.tar'} " in one_line(e.value)
        assert "rewrite the shards with `tinymim shards SRC --output DIR`" in str(e.value)


@pytest.mark.slow
def test_an_interrupted_write_resumes_to_the_same_shards(bmps, tmp_path):
    src, straight = bmps
    out = tmp_path / "out"
    # SIGKILLed half-way through writing its fourth shard (faulty_run: after 64 KiB of shard-000003.tar)
    r = subprocess.run([sys.executable, str(HERE / "faulty_run.py"), "kill", "1", "shard-000003.tar", "--", "shards",
                        str(src), "--output", str(out), "--shard-size", str(SHARD)],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{k:06d}.tar" for k in range(3)]
    assert list(out.glob("shard-000003.tar.*.tmp")) and not (out / "index.json").exists()
    with open(out / "shard-000001.tar", "r+b") as f:  # and one cut short, as by a copy that stopped
        f.truncate(f.seek(0, 2) // 2)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shard-000000.tar", out / "shard-000002.tar")}
    r = subprocess.run([sys.executable, "-m", "tinymim", "shards", str(src), "--output", str(out),
                        "--shard-size", str(SHARD)], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert snapshot(out) == snapshot(straight)  # byte for byte, and no temporary file left
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # the finished ones were kept


def test_resuming_another_write_is_refused_and_writes_nothing(bmps, tmp_path):
    src, _ = bmps
    out = tmp_path / "out"
    write_shards(FolderImages(src), out, shard_size=SHARD, seed=1)
    (out / "index.json").unlink()  # unfinished
    before = snapshot(out)
    for kwargs in ({"shard_size": SHARD, "seed": 0}, {"shard_size": 2 * SHARD, "seed": 1}):
        with pytest.raises(DataError, match="unfinished write of another source, --shard-size or --seed") as e:
            write_shards(FolderImages(src), out, **kwargs)
        assert str(out) in one_line(e.value)
        assert snapshot(out) == before


@pytest.mark.slow
def test_a_symlink_loop_in_a_folder_is_refused_in_one_line(folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    before = snapshot(src)
    (src / "class_1" / "again").symlink_to(src)  # a loop: the tree inside itself
    r = subprocess.run([sys.executable, "-m", "tinymim", "shards", str(src), "--output", str(tmp_path / "out")],
                       env=env(), capture_output=True, text=True, timeout=300)
    line = last_line(r.stderr)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert line.startswith(f"error: {src / 'class_1' / 'again'} is a symlink into the data folder {src}")
    assert not (tmp_path / "out").exists() and snapshot(src) == before
    (src / "class_1" / "again").unlink()

    (src / "class_2" / "other").symlink_to(src / "class_0")  # another class's images under this one
    with pytest.raises(DataError, match="is a symlink into the data folder") as e:
        FolderImages(src)
    assert str(src / "class_2" / "other") in one_line(e.value)
    (src / "class_2" / "other").unlink()

    outside = tmp_path / "outside"  # outside the tree: followed, each file once, but not round a loop
    (outside / "more").mkdir(parents=True)
    shutil.copy(folder / "class_3" / "005.jpg", outside / "more" / "x.jpg")
    (src / "class_3" / "ext").symlink_to(outside)
    (src / "class_3" / "x.jpg").symlink_to(outside / "more" / "x.jpg")  # the same file twice
    source = FolderImages(src)
    assert len(source) == CLASSES * PER_CLASS + 1
    assert [p for p, _ in source.samples if "x.jpg" in p] == [str(src / "class_3" / "x.jpg")]  # the first found
    (outside / "more" / "back").symlink_to(outside)
    with pytest.raises(DataError, match="is a symlink loop") as e:
        FolderImages(src)
    assert str(src / "class_3" / "ext" / "more" / "back") in one_line(e.value)


def test_an_empty_class_folder_is_refused(folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "class_1b" / "nothing").mkdir(parents=True)  # sorts between class_1 and class_2: would shift them
    (src / "class_1b" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="remove the empty folder or add images") as e:
        FolderImages(src)
    assert f"class folder {src / 'class_1b'} holds no images" in one_line(e.value)
    with pytest.raises(DataError, match="holds no images"):
        write_shards(FolderImages(src), tmp_path / "out")  # never reached: the listing refuses
    assert not (tmp_path / "out").exists()


def _webdataset_shards(folder: Path, n: int = 25, per_shard: int = 10, label_as: str = "cls") -> list:
    """n PNG samples written by the webdataset package's own ShardWriter; returns (image bytes, label)."""
    import io

    wds = pytest.importorskip("webdataset")
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = []
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            label = i % 3
            sample = {"__key__": f"sample{i:04d}", "png": buf.getvalue()}
            sample.update({"cls": label} if label_as == "cls" else {"json": {"label": f"class_{label}"}})
            sink.write(sample)
            written.append((buf.getvalue(), label))
    return written


def test_webdataset_shards_from_its_own_writer_are_indexed_and_read_back(tmp_path, capsys):
    from tinymim.cli import main
    from tinymim.data.shards import ShardImages

    written = _webdataset_shards(tmp_path / "wds")
    assert main(["shards", "--index", str(tmp_path / "wds")]) == 0
    assert "indexed 3 shards (25 images, 3 classes)" in capsys.readouterr().out
    data = ShardImages(tmp_path / "wds")
    assert len(data) == 25 and data.classes == ["0", "1", "2"]
    got = sorted(data.read_bytes(i) for i in range(len(data)))
    assert got == sorted(written)  # every sample once, its image byte for byte, its label
    assert main(["shards", "--index", str(tmp_path / "wds")]) == 1  # an index is never overwritten
    assert "exists already" in capsys.readouterr().err


def test_webdataset_json_labels_and_unlabelled_pretraining(tmp_path):
    from tinymim.data.shard_index import index_webdataset
    from tinymim.data.shards import ShardImages

    written = _webdataset_shards(tmp_path / "json", n=12, per_shard=5, label_as="json")
    index = index_webdataset(tmp_path / "json", "json:label")
    assert index["classes"] == ["class_0", "class_1", "class_2"] and index["total"] == 12
    assert sorted(ShardImages(tmp_path / "json").read_bytes(i) for i in range(12)) == sorted(written)
    with pytest.raises(DataError, match="has no 'nope' field"):
        index_webdataset(_copy_without_index(tmp_path / "json", tmp_path / "json2"), "json:nope")
    index = index_webdataset(tmp_path / "json2", None)  # pre-training: no labels needed
    assert index["classes"] == ["none"] and set(sum((s["labels"] for s in index["shards"]), [])) == {0}


def _copy_without_index(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("index.json"))
    return dst


def test_webdataset_shards_train(tmp_path):
    """A few distillation steps on shards webdataset wrote, read through their index."""
    _webdataset_shards(tmp_path / "wds", n=40, per_shard=16)
    from tinymim.data.shard_index import index_webdataset

    index_webdataset(tmp_path / "wds")
    cfg = tiny_distill_config(max_steps=2, batch_size=8)
    cfg.data = DataConfig(name="shards", root=str(tmp_path / "wds"), img_size=32, num_workers=0)
    last = tasks.run("distill", cfg, tmp_path / "run")
    assert last is not None and np.isfinite(last["loss"])


def test_unlabelled_webdataset_shards_are_refused_by_fine_tuning_in_one_line(tmp_path, capsys):
    from test_downstream import tiny_finetune_config

    from tinymim.cli import main

    _webdataset_shards(tmp_path / "wds", n=12, per_shard=6)
    assert main(["shards", "--index", str(tmp_path / "wds"), "--label", "none"]) == 0
    capsys.readouterr()
    cfg = tiny_finetune_config(max_steps=1)
    cfg.data.name, cfg.data.root, cfg.num_classes = "shards", str(tmp_path / "wds"), 3
    with pytest.raises(DataError) as e:
        tasks.run("finetune", cfg, tmp_path / "run")
    assert "indexed without labels" in one_line(e.value) and "--label cls" in one_line(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_brace_pattern_reads_those_shards_and_one_matching_none_is_one_line(any_shards, tmp_path):
    from tinymim.data.shard_format import expand_braces

    assert expand_braces("t-{000008..000010}.tar") == ["t-000008.tar", "t-000009.tar", "t-000010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    full = ShardImages(any_shards)
    names = [s.name for s in full.shards]
    stem = names[0][:-len("000000.tar")]
    part = ShardImages(f"{any_shards}/{stem}{{000001..000002}}.tar")
    assert [s.name for s in part.shards] == names[1:3] and len(part) == 2 * SHARD
    assert sorted(part.read_bytes(i) for i in range(len(part))) == sorted(
        full.read_bytes(i) for s in full.shards[1:3] for i in s.range)
    with pytest.raises(DataError) as e:
        ShardImages(f"{any_shards}/{stem}{{000100..000199}}.tar")
    assert f"names {stem}000100.tar and 99 more, which" in one_line(e.value) and "fix the pattern" in one_line(e.value)


def test_webdataset_tars_at_a_url_are_indexed_by_a_brace_pattern(tmp_path, capsys):
    """Tars at a URL (file:// here) are read once each as a stream; the index they give equals the one
    of the same tars on disk, and once served beside them the shards read back."""
    from tinymim.cli import main
    from tinymim.data.shard_index import index_webdataset

    written = _webdataset_shards(tmp_path / "wds", n=12, per_shard=5)
    url = (tmp_path / "wds").as_uri()
    assert main(["shards", "--index", f"{url}/train-{{000000..000002}}.tar", "--output", str(tmp_path / "idx")]) == 0
    assert f"serve it beside the shards, then train on them with data.name=shards data.root={url}" in \
        capsys.readouterr().out
    local = index_webdataset(_copy_without_index(tmp_path / "wds", tmp_path / "copy"))
    assert json.loads((tmp_path / "idx" / "index.json").read_text()) == local
    shutil.copy(tmp_path / "idx" / "index.json", tmp_path / "wds" / "index.json")
    remote = ShardImages(url, cache=tmp_path / "cache")
    assert sorted(remote.read_bytes(i) for i in range(len(remote))) == sorted(written)
    with pytest.raises(DataError, match="brace pattern"):
        index_webdataset(url, "cls", tmp_path / "idx2")  # a URL needs its tars named
