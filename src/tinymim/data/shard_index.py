"""An index for WebDataset tars another tool wrote (`tinymim shards --index DIR`): tinymim then trains on
them as on its own shards (tinymim.data.shards), one pread a sample.

A sample is what WebDataset makes of a tar: consecutive members that share a key, the member name up
to the first dot of its base name (`train/000123.jpg`, `train/000123.cls` -> key `train/000123`). Its
image is the first member with an image extension; its label, with `label="cls"` or `"txt"`, that
member's text; with `"json:FIELD"` that field of its `.json` member; with `label=None` there is none
(pre-training). Integer labels keep their values (classes "0".."N-1"); other labels become class
indices in sorted order of their names. The index lists the tars in sorted name order and records
where each image's data starts, so nothing is copied or rewritten.
"""
from __future__ import annotations

import collections
import json
import posixpath
import tarfile
import urllib.request
from pathlib import Path

from tinymim.core.errors import DataError
from tinymim.core.files import atomic_write
from tinymim.data.shard_download import _remote_size
from tinymim.data.shard_format import FORMAT, INDEX, VERSION, expand_braces
from tinymim.data.shard_writer import _index_text
from tinymim.data.shards import URL_SCHEMES

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
SOURCE = "webdataset"  # index.json's `source`: shards tinymim did not write (no label member after each image)


def _split(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset splits it: at the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext


def _label_of(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, label: str) -> str | None:
    """The label a member holds when it is the label member `label` asks for, else None."""
    if label in ("cls", "txt") and ext.lower() == label:
        return tar.extractfile(member).read().decode("utf-8", "replace").strip()
    if label.startswith("json:") and ext.lower() == "json":
        field = label.split(":", 1)[1]
        try:
            value = json.loads(tar.extractfile(member).read())[field]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{member.name} has no {field!r} field ({e}); give --label json:FIELD naming the field "
                            "that holds the class") from None
        return str(value)
    return None


class _Counted:
    """A stream that counts what was read from it (a tar's size, read once over HTTP)."""

    def __init__(self, raw):
        self.raw, self.read_bytes = raw, 0

    def read(self, n=-1) -> bytes:
        data = self.raw.read(n)
        self.read_bytes += len(data)
        return data


def _scan(path, label: str | None) -> list[tuple[str, str, int, int, str | None]]:
    """(key, image ext, offset, size, raw label) of each sample of one tar, in tar order: a local file,
    or a URL read once as a stream."""
    samples: dict[str, dict] = collections.OrderedDict()
    remote = isinstance(path, str)
    try:
        with (urllib.request.urlopen(path, timeout=60) if remote else open(path, "rb")) as raw, \
                tarfile.open(fileobj=_Counted(raw) if remote else raw, mode="r|" if remote else "r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, ext = _split(m.name)
                sample = samples.setdefault(key, {})
                if ext.lower() in IMAGE_EXTS and "image" not in sample:
                    sample["image"] = (ext, m.offset_data, m.size)
                elif label is not None and "label" not in sample:
                    found = _label_of(tar, m, ext, label)
                    if found is not None:
                        sample["label"] = found
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read {path} as a tar file ({e}); restore it or leave it out") from None
    out = []
    for key, sample in samples.items():
        if "image" not in sample:
            continue  # a sample without an image (a caption file alone...) is not a training sample
        if label is not None and "label" not in sample:
            raise DataError(f"{path}: sample {key} has no {label} label; give --label cls|txt|json:FIELD naming "
                            "where its class is, or --label none for pre-training")
        out.append((key, *sample["image"], sample.get("label")))
    return out


def index_webdataset(folder: str | Path, label: str | None = "cls", output: str | Path | None = None) -> dict:
    """Write index.json for the WebDataset tars in `folder` (see the module's docstring) and return it;
    an existing index is refused. `folder` may instead be a URL pattern naming the tars
    (`https://host/train-{000000..000127}.tar`, read once each); the index then goes to the folder
    `output`, to be served beside them."""
    remote = str(folder).startswith(URL_SCHEMES)
    if label is not None and label not in ("cls", "txt") and not (label.startswith("json:") and label[5:]):
        raise DataError(f"--label {label!r}: give cls, txt, json:FIELD or none")
    if remote:
        prefix, _, pattern = str(folder).rpartition("/")
        if "{" not in pattern or output is None:
            raise DataError(f"{folder}: tars at a URL are named by a brace pattern (PREFIX/train-{{000000..000127}}"
                            ".tar) and the index is written to --output DIR, to be served beside them")
        tars = [f"{prefix}/{name}" for name in expand_braces(pattern)]
        dest = Path(output)
    else:
        folder = dest = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder; give the folder that holds the .tar shards")
        tars = sorted(folder.glob("*.tar"))
        if not tars:
            raise DataError(f"no .tar files in {folder}; give the folder that holds the WebDataset shards")
    if (dest / INDEX).exists():
        raise DataError(f"{dest / INDEX} exists already; delete it to index the shards again")
    scanned = [(path, _scan(path, label)) for path in tars]
    raw = [s[4] for _, samples in scanned for s in samples]
    if not raw:
        raise DataError(f"the tars in {folder} hold no images ({', '.join(IMAGE_EXTS)})")
    if label is None:
        classes, to_index = ["none"], {None: 0}
    elif all(r.lstrip("-").isdigit() for r in raw):
        values = sorted({int(r) for r in raw})
        if values[0] < 0:
            raise DataError(f"negative class {values[0]} in the {label} labels of {folder}")
        classes, to_index = [str(i) for i in range(values[-1] + 1)], {r: int(r) for r in set(raw)}
    else:
        classes = sorted(set(raw))
        to_index = {c: i for i, c in enumerate(classes)}
    shards = []
    for path, samples in scanned:
        if samples:
            name, size = (path.rpartition("/")[2], _remote_size(path)) if remote else (path.name, path.stat().st_size)
            if size is None:
                raise DataError(f"the server does not give the size of {path}; serve the shards with Content-Length")
            shards.append({"name": name, "samples": len(samples), "bytes": size,
                           "keys": [s[0] for s in samples], "exts": [s[1] for s in samples],
                           "offsets": [s[2] for s in samples], "sizes": [s[3] for s in samples],
                           "labels": [to_index[s[4]] for s in samples]})
    counts = collections.Counter(to_index[r] for r in raw)
    index = {"format": FORMAT, "version": VERSION, "source": SOURCE, "label": label or "none",
             "classes": classes, "class_counts": {c: counts.get(i, 0) for i, c in enumerate(classes)},
             "total": len(raw), "shards": shards}
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write(dest / INDEX, lambda f: f.write(_index_text(index).encode()))
    return index
