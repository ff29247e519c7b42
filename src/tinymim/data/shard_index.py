"""An index for WebDataset tars another tool wrote (`tinymim shards --index DIR`): tinymim then trains on
them as on its own shards (tinymim.data.shards), one pread a sample.

A sample is what WebDataset makes of a tar: consecutive members that share a key, the member name up
to the first dot of its base name (`train/000123.jpg`, `train/000123.cls` -> key `train/000123`). Its
image is the first member with an image extension; its label, with `label="cls"` or `"txt"`, that
member's text; with `"json:FIELD"` that field of its `.json` member; with `label=None` there is none
(pre-training). Member names are read as the exact bytes the tar holds (UTF-8; other bytes kept by
surrogateescape, never normalized), and the index records where each image's header starts, so that
reading checks the whole name, however the tool that wrote it spelled long or non-ASCII names.

Labels are read one way for the whole set, never a silent mix:
- class indices: every label ASCII digits (`3`, ` 3 ` and a newline), or a JSON number that is an integer
  (`1.0` is 1; `1.5` is refused). They keep their values: classes are "0".."MAX" for the largest value
  present, so the same index means the same class in every set indexed this way. A value must be below
  MAX_CLASSES (100,000), checked on its digits before anything is built from it;
- class names: every label text with a letter in it; classes are the distinct names, sorted.
Refused, in one line naming the sample: an empty label, a negative one, one past the bound, one that is
neither (`²`, `3.5`, `-`, a JSON boolean or list), a label member over MAX_LABEL_BYTES (a JSON member
over MAX_JSON_BYTES), a set mixing indices and names (one sample of each named), more than MAX_CLASSES
distinct names.

The index lists the tars in sorted name order and records where each image's data starts, so nothing
is copied or rewritten. It is written into the tars' folder, or into `output` (`--output OUT`): then
it records the tars' folder relative to OUT (`tars`), and the tars are read where they are, so tars on
read-only storage can be indexed.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import tarfile
import urllib.request
from pathlib import Path

from tinymim.core.errors import DataError
from tinymim.core.files import atomic_write
from tinymim.data.shard_download import _remote_size
from tinymim.data.shard_format import FORMAT, INDEX, VERSION, expand_braces
from tinymim.data.shard_writer import _index_text
from tinymim.data.shards import NAME_CODEC, URL_SCHEMES

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
SOURCE = "webdataset"  # index.json's `source`: shards tinymim did not write (no label member after each image)
MAX_CLASSES = 100_000  # class indices 0..99,999, or as many distinct names
MAX_LABEL_BYTES = 1024  # a .cls or .txt label member: a class, not a caption
MAX_JSON_BYTES = 1 << 24  # a .json member, read whole for its label field
_INDEX_LABEL = re.compile(r"[0-9]+", re.ASCII)


def _split(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset splits it: at the first dot of the base name; the
    key is the name's own text before that dot (key + "." + ext gives the name back exactly)."""
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _text_label(text: str, where: str) -> int | str:
    """A label written as text: a class index (ASCII digits) or a class name (text with a letter)."""
    text = text.strip()
    if not text:
        raise DataError(f"{where} is empty; give every sample its class (or --label none for pre-training)")
    if _INDEX_LABEL.fullmatch(text):
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(MAX_CLASSES)) or int(digits) >= MAX_CLASSES:  # bounded before int() of it all
            raise DataError(f"{where} is class {digits[:12]}{'...' if len(digits) > 12 else ''}, past the bound of "
                            f"{MAX_CLASSES:,} classes (indices 0..{MAX_CLASSES - 1}); fix the label")
        return int(digits)
    if re.fullmatch(r"-[0-9]+", text, re.ASCII):
        raise DataError(f"{where} is the negative class {text[:12]}; class indices are 0..{MAX_CLASSES - 1}")
    if not any(c.isalpha() for c in text):
        raise DataError(f"{where} is {text[:40]!r}: neither a class index (ASCII digits, 0..{MAX_CLASSES - 1}) "
                        "nor a class name (text with a letter); fix the label")
    return text


def _json_label(value, where: str) -> int | str:
    """A JSON label: an integral number is the class index, a string is read as a text label."""
    if isinstance(value, str):
        return _text_label(value, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise DataError(f"{where} is {value!r}, not a whole number; a class index is an integer "
                            f"0..{MAX_CLASSES - 1}")
        if not 0 <= value < MAX_CLASSES:
            raise DataError(f"{where} is class {str(value)[:12]}, outside 0..{MAX_CLASSES - 1} (the bound of "
                            f"{MAX_CLASSES:,} classes); fix the label")
        return int(value)
    raise DataError(f"{where} is {json.dumps(value)[:40]}: neither a class index nor a class name; fix the label")


def _label_of(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, label: str, path) -> int | str | None:
    """The label a member holds when it is the label member `label` asks for, else None."""
    where = f"the {label} label of {member.name} in {path}"
    if label in ("cls", "txt") and ext.lower() == label:
        if member.size > MAX_LABEL_BYTES:
            raise DataError(f"{member.name} in {path} is {member.size:,} bytes, not a class label (at most "
                            f"{MAX_LABEL_BYTES} bytes); give --label naming the member that holds the class")
        try:
            return _text_label(tar.extractfile(member).read().decode("utf-8"), where)
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8 text; fix the label") from None
    if label.startswith("json:") and ext.lower() == "json":
        field = label.split(":", 1)[1]
        if member.size > MAX_JSON_BYTES:
            raise DataError(f"{member.name} in {path} is {member.size:,} bytes (at most {MAX_JSON_BYTES:,} are read "
                            "for a label); give --label naming a smaller member that holds the class")
        try:
            value = json.loads(tar.extractfile(member).read())[field]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            reason = "nested too deep" if isinstance(e, RecursionError) else e
            raise DataError(f"{member.name} in {path} has no {field!r} field ({str(reason)[:80]}); give "
                            "--label json:FIELD naming the field that holds the class") from None
        return _json_label(value, where)
    return None


class _Counted:
    """A stream that counts what was read from it (a tar's size, read once over HTTP)."""

    def __init__(self, raw):
        self.raw, self.read_bytes = raw, 0

    def read(self, n=-1) -> bytes:
        data = self.raw.read(n)
        self.read_bytes += len(data)
        return data


def _scan(path, label: str | None) -> list[tuple[str, str, int, int, int, int | str | None]]:
    """(key, image ext, offset, size, header offset, label) of each sample of one tar, in tar order: a
    local file, or a URL read once as a stream."""
    samples: dict[str, dict] = collections.OrderedDict()
    remote = isinstance(path, str)
    try:
        with (urllib.request.urlopen(path, timeout=60) if remote else open(path, "rb")) as raw, \
                tarfile.open(fileobj=_Counted(raw) if remote else raw, mode="r|" if remote else "r:",
                             encoding=NAME_CODEC[0], errors=NAME_CODEC[1]) as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, ext = _split(m.name)
                sample = samples.setdefault(key, {})
                if ext.lower() in IMAGE_EXTS and "image" not in sample:
                    # m.offset: where the member's headers start (a long or non-ASCII name's extended header)
                    sample["image"] = (ext, m.offset_data, m.size, m.offset)
                elif label is not None and "label" not in sample:
                    found = _label_of(tar, m, ext, label, path)
                    if found is not None:
                        sample["label"] = found
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read {path} as a tar file ({e}); restore it or leave it out") from None
    out = []
    for key, sample in samples.items():
        if "image" not in sample:
            continue  # a sample without an image (a caption file alone...) is not a training sample
        if label is not None and "label" not in sample:
            raise DataError(f"{path}: sample {key!r} has no {label} label; give --label cls|txt|json:FIELD naming "
                            "where its class is, or --label none for pre-training")
        out.append((key, *sample["image"], sample.get("label")))
    return out


def _classes(scanned: list, label: str) -> tuple[list[str], dict]:
    """The class list and each label's index: indices keep their values, names are sorted (module docstring)."""
    first: dict[type, tuple] = {}
    for path, samples in scanned:
        for s in samples:
            first.setdefault(type(s[5]), (s[0], path, s[5]))
        if len(first) > 1:
            (k1, p1, v1), (k2, p2, v2) = first[int], first[str]
            raise DataError(f"the {label} labels mix class indices and class names: sample {k1!r} in {p1} is {v1}, "
                            f"sample {k2!r} in {p2} is {v2!r}; give every sample an index (0..{MAX_CLASSES - 1}) "
                            "or every sample a name")
    values = {s[5] for _, samples in scanned for s in samples}
    if int in first:  # bounded by MAX_CLASSES when read
        return [str(i) for i in range(max(values) + 1)], {v: v for v in values}
    if len(values) > MAX_CLASSES:
        raise DataError(f"the {label} labels name {len(values):,} classes, past the bound of {MAX_CLASSES:,}; "
                        "give --label naming the member that holds the class, or --label none")
    classes = sorted(values)
    return classes, {c: i for i, c in enumerate(classes)}


def index_webdataset(folder: str | Path, label: str | None = "cls", output: str | Path | None = None) -> dict:
    """Write index.json for the WebDataset tars in `folder` (see the module's docstring) and return it;
    an existing index is refused. With `output`, the index goes into that folder and records where the
    tars are. `folder` may instead be a URL pattern naming the tars (`https://host/train-{000000..000127}.tar`,
    read once each); the index then goes to the folder `output`, to be served beside them."""
    remote = str(folder).startswith(URL_SCHEMES)
    if label is not None and label not in ("cls", "txt") and not (label.startswith("json:") and label[5:]):
        raise DataError(f"--label {label!r}: give cls, txt, json:FIELD or none")
    tars_folder = None  # the tars' folder as the index records it, relative to the index's folder
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
        if output is not None:
            dest = Path(output)
            if dest.exists() and not dest.is_dir():
                raise DataError(f"--output {dest} is a file; give a folder for {INDEX}")
            relative = os.path.relpath(folder.resolve(), dest.resolve())
            tars_folder = None if relative == "." else Path(relative).as_posix()
    if (dest / INDEX).exists():
        raise DataError(f"{dest / INDEX} exists already; delete it to index the shards again")
    scanned = [(path, _scan(path, label)) for path in tars]
    total = sum(len(samples) for _, samples in scanned)
    if not total:
        raise DataError(f"the tars in {folder} hold no images ({', '.join(IMAGE_EXTS)})")
    classes, to_index = (["none"], {None: 0}) if label is None else _classes(scanned, label)
    shards = []
    for path, samples in scanned:
        if samples:
            name, size = (path.rpartition("/")[2], _remote_size(path)) if remote else (path.name, path.stat().st_size)
            if size is None:
                raise DataError(f"the server does not give the size of {path}; serve the shards with Content-Length")
            shards.append({"name": name, "samples": len(samples), "bytes": size,
                           "keys": [s[0] for s in samples], "exts": [s[1] for s in samples],
                           "offsets": [s[2] for s in samples], "sizes": [s[3] for s in samples],
                           "labels": [to_index[s[5]] for s in samples],
                           # where the first and last sample's headers start: reading checks their whole names
                           "header_offsets": [samples[0][4], samples[-1][4]]})
    counts = collections.Counter(to_index[s[5]] for _, samples in scanned for s in samples)
    index = {"format": FORMAT, "version": VERSION, "source": SOURCE, "label": label or "none",
             "classes": classes, "class_counts": {c: counts.get(i, 0) for i, c in enumerate(classes)},
             "total": total, **({"tars": tars_folder} if tars_folder else {}), "shards": shards}
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot make the folder {dest} for {INDEX} ({e.strerror or e}); give an --output folder "
                        "you can write to") from None
    # a read-only or full folder is one line from atomic_write (RunDirError), naming --output
    atomic_write(dest / INDEX, lambda f: f.write(_index_text(index).encode()))
    return index
