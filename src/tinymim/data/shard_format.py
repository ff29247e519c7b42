"""The on-disk format of tinymim's tar shards, and the names and messages that writing them
(tinymim.data.shard_writer) and reading them (tinymim.data.shards) share.

On disk (`tinymim shards SRC --output DIR`):

    DIR/shard-000000.tar, shard-000001.tar, ...   plain (uncompressed) tar files
        <key>.<ext>   the original image file, byte for byte (ext: its suffix, lowercased: jpg, jpeg, png ...)
        <key>.cls     its label, as decimal text
    DIR/index.json    format, version, class names, images per class, total, and per shard: file name,
                      sample count, byte size, and per sample its key, ext, the offset and size of the image
                      data inside the tar, and its label

A key is `<class folder>/<file name without suffix>`, with dots turned into underscores (WebDataset splits
a member name at the first dot of its base name). A sample's two members are consecutive, so the shards
are ordinary WebDataset shards (`webdataset.WebDataset("DIR/shard-{000000..000127}.tar")` reads them);
tinymim itself does not need the webdataset package: the index lets it read any sample with one pread.
Samples are written in an order shuffled with a fixed seed, so every shard mixes classes; every shard
holds `shard_size` samples except the last.
"""
from __future__ import annotations

import re

from tinymim.core.errors import DataError

FORMAT, VERSION = "tinymim-shards", 1
INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
WRITE_FIX = "write them with `tinymim shards SRC --output DIR`"
REWRITE_FIX = "rewrite the shards with `tinymim shards SRC --output DIR`"


MAX_PATTERN_NAMES = 1_000_000  # a pattern naming more shards is refused before any name is made


def _brace_options(pattern: str, body: str) -> tuple[int, object]:
    """(how many, the options) of one brace group: a `range` stays a range until it is expanded."""
    if ".." in body:
        r = re.fullmatch(r"(\d{1,18})\.\.(\d{1,18})", body)
        if r is None:
            raise DataError(f"the pattern {pattern} has the range {{{body}}}, which is not {{LO..HI}} with "
                            "whole numbers of up to 18 digits; write it as {000000..000127}")
        lo, hi = r.groups()
        if int(lo) > int(hi):
            raise DataError(f"the pattern {pattern} has the reversed range {{{body}}}: its first bound is above its "
                            f"last; write {{{lo}..{hi}}} as {{{hi}..{lo}}}")
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        return int(hi) - int(lo) + 1, (str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    if not body:
        raise DataError(f"the pattern {pattern} has an empty {{}}, which names nothing; write {{a,b}} or "
                        "{LO..HI} there, or drop the braces")
    options = body.split(",")
    return len(options), options


def count_braces(pattern: str) -> tuple[int, list]:
    """(how many names `pattern` makes, its parts: literal text or a brace group's (count, options)),
    counted from the ranges' bounds and the lists' lengths without making a name."""
    parts, total, pos = [], 1, 0
    for m in re.finditer(r"[{}]", pattern):
        if m.start() < pos:
            continue
        close = pattern.find("}", m.start())
        if m.group() == "}" or close < 0 or "{" in pattern[m.start() + 1:close]:
            raise DataError(f"the pattern {pattern} has an unmatched or nested brace at character {m.start() + 1}; "
                            "write ranges {000000..000127} and lists {a,b}, one level deep")
        parts.append(pattern[pos:m.start()])
        group = _brace_options(pattern, pattern[m.start() + 1:close])
        parts.append(group)
        total *= group[0]
        pos = close + 1
    parts.append(pattern[pos:])
    return total, parts


def expand_braces(pattern: str, limit: int = MAX_PATTERN_NAMES) -> list[str]:
    """WebDataset's (braceexpand's) shard patterns: `{000000..000127}` ranges, zero-padded to the width
    of a bound written with leading zeros, and `{a,b}` lists; several braces expand left to right.
    The names are counted first: a pattern naming more than `limit` is refused in one line."""
    total, parts = count_braces(pattern)
    if total > limit:
        raise DataError(f"the pattern {pattern} names {total:,} shards, more than the {limit:,} tinymim expands; "
                        "name fewer shards, or give the folder to read all of its index's shards")
    names = [""]
    for part in parts:
        if isinstance(part, str):
            names = [n + part for n in names]
        else:
            options = list(part[1])
            names = [n + o for n in names for o in options]
    return names
