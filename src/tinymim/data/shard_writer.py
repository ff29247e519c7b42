"""Writing an ImageFolder as tar shards (`tinymim shards SRC --output DIR`; the format:
tinymim.data.shard_format): every file written atomically, index.json last, and a write that was
interrupted resumed by keeping the shards it finished."""
from __future__ import annotations

import collections
import io
import json
import logging
import os
import random
import re
import tarfile
from pathlib import Path

from tinymim.core.errors import DataError
from tinymim.core.files import TMP_SUFFIX, atomic_write
from tinymim.data.shard_format import FORMAT, INDEX, SHARD_NAME, VERSION

log = logging.getLogger(__name__)


RESUME_FIX = ("another source, --shard-size or --seed; give the interrupted write's SRC, --shard-size and --seed, "
              "or choose a new --output")
# the temporary files atomic_write leaves when a write is killed (tinymim.core.files._open_tmp names them)
_TMP = re.compile(rf"(shard-\d{{6}}\.tar|{re.escape(INDEX)})\.[0-9a-f]{{8}}{re.escape(TMP_SUFFIX)}")


def write_shards(source, output: str | Path, shard_size: int = 1000, seed: int = 0) -> dict:
    """Write `source` (a `tinymim.data.sources.FolderImages`: its listing, its class names) as tar shards of
    `shard_size` samples and an index into `output`; returns the index. Every file is written to a
    temporary file beside it and renamed, index.json last: a folder without it is unfinished, and writing
    into it again (same source, shard size and seed) keeps the shards it finished and writes the rest."""
    if shard_size < 1:
        raise DataError(f"shard size must be 1 or more, got {shard_size}; e.g. --shard-size 1000 "
                        "(about 100 MiB of ImageNet JPEGs a shard)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file; choose a folder for the shards")
    if (output / INDEX).exists():
        raise DataError(f"{output} already holds shards; choose a new --output, or delete its "
                        f"{INDEX} and shard-*.tar to write them again")
    samples = list(source.samples)
    if not samples:
        raise DataError(f"no images in {source.root}; nothing to write")
    keys = _keys(source.root, [path for path, _ in samples])
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)  # each shard a mix of classes, the same for a given seed
    plan = [[(keys[i], Path(samples[i][0]).suffix.lower().lstrip("."), samples[i][0], samples[i][1])
             for i in order[start:start + shard_size]] for start in range(0, len(order), shard_size)]
    done = _finished_shards(output, plan)  # all checked before anything is written
    for stale in output.glob(f"*{TMP_SUFFIX}") if output.is_dir() else []:
        if _TMP.fullmatch(stale.name):  # an interrupted write's unfinished file
            stale.unlink()
    if done:
        log.info("%s holds %d of the %d shards finished: writing the rest", output, len(done), len(plan))
    shards = []
    for k, items in enumerate(plan):
        name = SHARD_NAME.format(k)
        if k not in done:
            offsets, sizes = _write_tar(output / name, items)
            done[k] = {"name": name, "samples": len(items), "bytes": (output / name).stat().st_size,
                       "keys": [it[0] for it in items], "exts": [it[1] for it in items],
                       "offsets": offsets, "sizes": sizes, "labels": [it[3] for it in items]}
        shards.append(done[k])
        if (k + 1) * 10 // len(plan) > k * 10 // len(plan):
            log.info("wrote %d of %d shards", k + 1, len(plan))
    counts = collections.Counter(label for _, label in samples)
    index = {"format": FORMAT, "version": VERSION, "seed": seed, "shard_size": shard_size,
             "classes": list(source.classes),
             "class_counts": {c: counts.get(i, 0) for i, c in enumerate(source.classes)},
             "total": len(samples), "shards": shards}
    atomic_write(output / INDEX, lambda f: f.write(_index_text(index).encode()))
    return index


def _finished_shards(output: Path, plan: list) -> dict[int, dict]:
    """The index entries of the shards an interrupted write into `output` finished, by position in `plan`.
    Each is checked against what this write would put there (member names, sizes, times and labels: the
    tar headers only, not the image data); one cut short is written again, one holding anything else
    (another source, shard size or seed) stops the write before anything is written."""
    if not output.is_dir():
        return {}
    names = [SHARD_NAME.format(k) for k in range(len(plan))]
    stray = sorted(p.name for p in output.glob("shard-*.tar") if p.name not in names)
    if stray:
        raise DataError(f"{output / stray[0]} is not one of the {len(plan)} shards this write makes: {output} "
                        f"holds an unfinished write of {RESUME_FIX}")
    done = {}
    for k, name in enumerate(names):
        if (output / name).exists():
            entry = _finished(output / name, plan[k])
            if entry is not None:
                done[k] = entry
    return done


def _finished(path: Path, items) -> dict | None:
    """`path`'s index entry when it holds `items` whole, as _write_tar writes them; None when it is a
    part of that (cut short); a DataError when it holds anything else."""
    expected = []
    for key, ext, src, label in items:
        try:
            st = os.stat(src)
        except OSError as e:
            raise DataError(f"cannot read {src} ({e.strerror or e}); fix or remove it, then write the shards "
                            "again") from e
        expected += [(f"{key}.{ext}", st.st_size, int(st.st_mtime), None),
                     (f"{key}.cls", len(str(label)), int(st.st_mtime), str(label).encode())]
    got = []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                n = len(got)
                name, size, mtime, data = expected[n] if n < len(expected) else (None, None, None, None)
                if (m.name, m.size, int(m.mtime)) != (name, size, mtime) or not m.isreg() or \
                        (data is not None and tar.extractfile(m).read() != data):
                    held = f"{m.name} of another size, time or label" if m.name == name else m.name
                    want = name or f"the end of the shard ({len(items)} images)"
                    raise DataError(f"{path} holds {held} where this write puts {want}: its folder holds an "
                                    f"unfinished write of {RESUME_FIX}")
                got.append(m)
        size = path.stat().st_size
    except (tarfile.TarError, OSError, EOFError):
        return None  # cut short: everything read so far was the write's own
    if len(got) < len(expected) or not got:
        return None
    end = got[-1].offset_data + -(-got[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if size != -(-(end + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE:
        return None  # the end-of-archive blocks are missing
    images = got[0::2]
    return {"name": path.name, "samples": len(items), "bytes": size, "keys": [it[0] for it in items],
            "exts": [it[1] for it in items], "offsets": [m.offset_data for m in images],
            "sizes": [m.size for m in images], "labels": [it[3] for it in items]}


def _keys(root, paths: list[str]) -> list[str]:
    """`<class>/<name>` per file: no dot in the base name (WebDataset cuts the extension at the first
    one), made unique where two files differ only there (a.jpg and a.png, a.b.jpg and a_b.jpg)."""
    keys, seen = [], set()
    for p in paths:
        rel = Path(p).relative_to(root)
        key = rel.parent.joinpath(rel.stem.replace(".", "_")).as_posix()
        unique, n = key, 1
        while unique in seen:
            n += 1
            unique = f"{key}_{n}"
        seen.add(unique)
        keys.append(unique)
    return keys


def _write_tar(path: Path, items) -> tuple[list[int], list[int]]:
    """One shard: per item (key, ext, source file, label) the file's bytes as <key>.<ext>, then the
    label as <key>.cls. Returns where each image's data starts inside the tar, and its size."""
    offsets, sizes = [], []

    def write(f) -> None:
        offsets.clear()
        sizes.clear()
        # stream mode: the atomic writer's file object can only be written, not told or seeked
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, src, label in items:
                data, mtime = _read_source(src)
                _add(tar, f"{key}.{ext}", data, mtime)
                # the data ends where the tar now stands, padded to whole 512-byte blocks
                offsets.append(tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                sizes.append(len(data))
                _add(tar, f"{key}.cls", str(label).encode(), mtime)

    atomic_write(path, write)
    return offsets, sizes


def _read_source(path: str) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(), int(os.fstat(f.fileno()).st_mtime)
    except OSError as e:  # not the writer's error: atomic_write would report it as one
        raise DataError(f"cannot read {path} ({e.strerror or e}); fix or remove it, then write the shards "
                        "again into a new --output") from e


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def _index_text(index: dict) -> str:
    """index.json, one shard a line: compact (ImageNet's is tens of MiB), still readable with `head`."""
    head = json.dumps({k: v for k, v in index.items() if k != "shards"})
    shards = ",\n".join(json.dumps(s, separators=(",", ":")) for s in index["shards"])
    return f'{head[:-1]}, "shards": [\n{shards}\n]}}\n'
