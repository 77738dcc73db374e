"""WebDataset tar shards as a source: `--data shard.tar`, a folder of shards, or a brace pattern
(`shards/{00000..00099}.tar`), streamed member by member, never extracted.

A sample is the run of consecutive members that share a key (the member's path up to the first
dot of its file name: `a/b.seg.jpg` has key `a/b`, extension `seg.jpg`), as img2dataset writes
them. Its image is the member with extension jpg, jpeg, png or webp (the first of them); its
`.json` and `.txt` members, when small (SIDECAR_MAX bytes), are carried into `scores.parquet`'s
`sidecar` column as-is. Ids are `shard.tar:key` (the shard relative to the folder or pattern).

Hostile shards end as rejected rows with reasons, never a crash and never a file written:
a member path that is absolute or climbs out (`unsafe_member_path`), an image member that is a
link, device or folder (`not_a_regular_member`), one larger than MEMBER_MAX (`member_too_large`),
a sample with no image member (`no_image_member`), a shard cut short (`truncated_tar`: its last
sample, and the shard's scan stops there) and a file that is no tar at all (`corrupt_tar`, one row
for the shard). A shard the pattern names that does not exist is a `missing_file` row.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIDECAR_EXTS = ("json", "txt")
SIDECAR_MAX = 16 * 1024  # bytes of a sidecar carried into scores.parquet
MEMBER_MAX = 256 * 1024 * 1024  # bytes of an image member (larger: member_too_large)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_BRACE = re.compile(f"{_RANGE.pattern}|{_LIST.pattern}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar; `{x,y}` lists too. As
    braceexpand does: the leftmost brace varies slowest, and a range with a zero-padded bound is
    padded to its longer bound's width (`{01..100}` -> 001 ... 100)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    if m.group(1) is not None:  # a range
        lo, hi = m.group(1), m.group(2)
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(k).zfill(width) for k in range(int(lo), int(hi) + step, step)]
    else:
        choices = m.group(3).split(",")
    return [p for choice in choices for p in expand_braces(head + choice + tail)]


def is_pattern(path: str) -> bool:
    return bool(_BRACE.search(path))


def shard_files(path: str) -> tuple[str, list[str]]:
    """(the folder ids are relative to, the shard paths in order) of a tar, a folder of tars
    (recursive, name order) or a brace pattern (its order; missing shards included)."""
    if is_pattern(path):
        files = expand_braces(path)
        return os.path.dirname(path.split("{", 1)[0]) or ".", files
    if os.path.isdir(path):
        return path, sorted(str(f) for f in Path(path).rglob("*.tar"))
    return os.path.dirname(path) or ".", [path]


def is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


@dataclass(frozen=True)
class MemberReader:
    """The bytes of one tar member, read by offset (picklable: items travel to workers)."""

    tar: str
    offset: int
    size: int

    def __call__(self) -> bytes:
        from pipeline.io.data import Rejected, read_file

        if not os.path.isfile(self.tar):
            read_file(self.tar)  # raises the reason (missing_file, unreadable, ...)
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise Rejected("truncated_tar", f"member of {self.size} bytes at {self.offset} ends at {len(data)}")
        return data


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its key, its image member (or the reason it has none) and sidecars."""

    key: str
    image: tarfile.TarInfo | None
    reject: str | None
    detail: str
    sidecar: str | None  # JSON object {ext: text} of the small .json / .txt members


def _split(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower() if dot else ""


def _unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or bool(re.match(r"^[A-Za-z]:", name))


def samples(tar_path: str, sidecars: bool = True, sidecars_from: int = 0) -> Iterator[Sample]:
    """The samples of one shard in order, with hostile members turned into rejected samples and a
    key seen before in the shard (its members not consecutive, or named twice) rejected as
    duplicate_key; `sidecars` False reads headers only (counting), and samples before
    `sidecars_from` are read headers only too (a shard's rows skipped to reach its range)."""
    size = os.path.getsize(tar_path)
    try:
        tf = tarfile.open(tar_path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        yield Sample("", None, "corrupt_tar", str(e), None)
        return
    with tf:
        group: list[tarfile.TarInfo] = []
        key = None
        seen: set[str] = set()
        n = 0

        def flush() -> Sample:
            nonlocal group, n
            if key in seen:
                out = Sample(key, None, "duplicate_key", f"key {key!r} comes again after other samples", None)
            else:
                out = _sample(tf, key, group, size, sidecars and n >= sidecars_from)
            seen.add(key)
            group, n = [], n + 1
            return out

        members = iter(tf)
        while True:
            try:
                m = next(members)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, EOFError) as e:
                if group:
                    yield flush()
                yield Sample(f"@{tf.offset}", None, "truncated_tar", str(e), None)
                return
            if m.isdir():
                continue
            k, _ = _split(m.name)
            if _unsafe(m.name):
                if group:  # rows in the shard's order: the sample before it first
                    yield flush()
                    key = None
                yield Sample(m.name, None, "unsafe_member_path", f"member path {m.name!r}", None)
                n += 1
                continue
            if group and k != key:
                yield flush()
            key = k
            group.append(m)
        if group:
            yield flush()


def _sample(tf: tarfile.TarFile, key: str, members: list[tarfile.TarInfo], tar_size: int,
            sidecars: bool = True) -> Sample:
    by_ext = {}
    for m in members:
        by_ext.setdefault(_split(m.name)[1], m)
    sidecar = {}
    for ext in SIDECAR_EXTS if sidecars else ():
        m = by_ext.get(ext)
        if m is not None and m.isfile() and m.size <= SIDECAR_MAX and m.offset_data + m.size <= tar_size:
            f = tf.extractfile(m)
            sidecar[ext] = f.read().decode("utf-8", "replace") if f is not None else None
        elif m is not None:
            sidecar[ext] = f"<{m.size} bytes: not carried>"
    side = json.dumps(sidecar, ensure_ascii=False, sort_keys=True) if sidecar else None
    image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
    if image is None:
        return Sample(key, None, "no_image_member", f"members {sorted(by_ext)}", side)
    if not image.isfile():
        return Sample(key, None, "not_a_regular_member", f"{image.name!r} is a link, device or folder", side)
    if image.size > MEMBER_MAX:
        return Sample(key, None, "member_too_large", f"{image.size} bytes", side)
    if image.offset_data + image.size > tar_size:
        return Sample(key, None, "truncated_tar", f"{image.name!r} runs past the end of the file", side)
    return Sample(key, image, None, "", side)


def tar_items(root: str, tar_path: str, start: int = 0, stop: int | None = None):
    """Items of samples [start, stop) of one shard (ids relative to `root`)."""
    from pipeline.io.data import Item, display_path

    rel = os.path.relpath(tar_path, root).replace(os.sep, "/")
    end = float("inf") if stop is None else stop
    if not os.path.isfile(tar_path):
        if start == 0:
            yield Item(f"{rel}:", display_path(tar_path), MemberReader(tar_path, 0, 0), reject="missing_file")
        return
    for k, s in enumerate(samples(tar_path, sidecars_from=start)):
        if k >= end:
            return
        if k < start:
            continue
        where = display_path(f"{tar_path}:{s.image.name if s.image is not None else s.key}")
        reader = MemberReader(tar_path, s.image.offset_data if s.image else 0, s.image.size if s.image else 0)
        yield Item(f"{rel}:{s.key}", where, reader, reject=s.reject, sidecar=s.sidecar)


def count(tar_path: str) -> int:
    """Samples (rows) of one shard: its headers are read, no image member."""
    return sum(1 for _ in samples(tar_path, sidecars=False)) if os.path.isfile(tar_path) else 1
