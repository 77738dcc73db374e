"""Image sources, decoding and preparation for scoring.

An input is an `Item` (a stable id, a display path and a way to read its bytes). Decoding turns
the bytes into the model's channels and size, in the model's data range (ImageSpec.data_range:
[-1, 1] for VP/DDPM models, [0, 1] for VE); anything that cannot be decoded becomes a rejection
with a reason, never a crash and never a silent drop. An input read again after scoring goes
through `read_verified`, whose one rule says what a changed input is.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from pipeline.fields import DEVICE_HELP, check_device, setting
from pipeline.io import webdataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
FOLDER_KINDS = {"folder": "image files", "parquet": "Parquet files", "arrow": "Arrow files",
                "webdataset": "WebDataset .tar shards"}  # what a folder may hold, one kind per source


class Rejected(Exception):
    """An input that cannot be scored; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # e.g. empty_file, corrupt_image, not_an_image
        self.detail = detail  # the underlying error, for people


@dataclass(frozen=True)
class Item:
    """One input, not yet read."""

    id: str  # stable and unique within a source (relative path for folders)
    path: str  # where it came from, for people (undecodable name bytes backslash-escaped)
    read: Callable[[], bytes]  # the file's bytes; raises Rejected (or OSError) when it cannot
    path_bytes: bytes | None = None  # the exact file-system path, when there is one
    reject: str | None = None  # a reason known before reading, e.g. duplicate_path
    sidecar: str | None = None  # WebDataset: the sample's small .json / .txt members, as a JSON object


@dataclass(frozen=True)
class InputSettings:
    """Where the images come from and what an input must be to be taken."""

    data: str = setting(help="an image, a folder of images (recursive), a Parquet file or folder with an image "
                        "column, a datasets folder (save_to_disk) or Arrow file, WebDataset tar shards (a .tar, a "
                        "folder of them or a brace pattern), or a text file listing image paths")
    image_column: str | None = setting(None, "Parquet and Arrow: the column holding images (default: 'image', or the "
                                       "only binary one)")
    max_pixels: int = setting(89_478_485, "reject larger images as decompression bombs")
    min_size: int = setting(8, "reject images whose shorter side is smaller, in pixels")

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_size < 1:
            raise ValueError(f"--max-pixels and --min-size must be positive, got {self.max_pixels}, {self.min_size}")


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes, and what an input must be to be taken."""

    channels: int  # 1 (L), 3 (RGB) or 4 (RGBA)
    size: tuple[int, int]  # (H, W)
    max_pixels: int = InputSettings.max_pixels  # larger images are rejected as decompression bombs (Pillow's limit)
    min_size: int = InputSettings.min_size  # images whose shorter side is smaller are rejected as too_small
    data_range: tuple[float, float] = (-1.0, 1.0)  # pixel values 0 and 255 map to these ends

    def __post_init__(self) -> None:
        if self.channels not in (1, 3, 4):
            raise ValueError(f"models with {self.channels} channels are not supported: 1, 3 or 4")
        if self.max_pixels < 1 or self.min_size < 1:
            raise ValueError(f"max_pixels and min_size must be positive, got {self.max_pixels}, {self.min_size}")


@dataclass
class Decoded:
    """An item after reading and decoding: pixels, or the reason it was rejected."""

    item: Item
    sha256: str | None  # of the file bytes; None when they could not be read
    pixels: torch.Tensor | None  # [C, H, W] float32 in the spec's data range
    reject_reason: str | None = None
    reject_detail: str = ""
    pixel_sha256: str | None = None  # of the decoded full-size pixels in the model's mode
    original_size: tuple[int, int] | None = None  # (W, H) after EXIF orientation
    complexity: float | None = None  # the lossless code length, when worked out ahead (score.scoring.prepared)


def display_path(path: str | bytes) -> str:
    """A printable str for any path: bytes that are not UTF-8 become backslash escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def read_file(path: str) -> bytes:
    """A regular file's bytes, or Rejected naming why not: broken_symlink, symlink_loop,
    missing_file, unreadable (permissions, a folder, a FIFO or device: never opened, never hangs)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise Rejected("unreadable", "not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Rejected("symlink_loop", str(e)) from e
        if isinstance(e, FileNotFoundError):
            raise Rejected("broken_symlink" if os.path.islink(path) else "missing_file", str(e)) from e
        raise Rejected("unreadable", str(e)) from e


def _file_item(id: str, path: str, reject: str | None = None) -> Item:
    return Item(id, display_path(path), partial(read_file, path), os.fsencode(path), reject)


def folder_items(root: str | os.PathLike) -> Iterator[Item]:
    """Every image file below `root`, recursively and sorted; ids are relative paths.

    Symlinked folders are followed once each (a folder loop is logged and not re-entered).
    """
    root = os.fspath(root)
    for path in _folder_files(root):
        if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
            yield _file_item(display_path(os.path.relpath(path, root)).replace(os.sep, "/"), path)


def folder_skipped(root: str | os.PathLike) -> dict[str, int]:
    """The files below a folder source that are not read as images (captions, .ppm, ...), by
    lower-case extension: the same walk as folder_items, for the manifest to say what it left."""
    return dict(sorted(_extension_counts(p for p in _folder_files(os.fspath(root))
                                         if os.path.splitext(p)[1].lower() not in IMAGE_SUFFIXES).items()))


def _extension_counts(paths: Iterable[str]) -> dict[str, int]:
    """How many of `paths` have each lower-case extension ('(no extension)' for none)."""
    counts: dict[str, int] = {}
    for path in paths:
        ext = os.path.splitext(path)[1].lower() or "(no extension)"
        counts[ext] = counts.get(ext, 0) + 1
    return counts


def _folder_files(root: str) -> Iterator[str]:
    """Every file below `root`, sorted, symlinked folders followed once each (a loop is logged)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            log.warning("folder %s was already visited (symlink loop); not entered again", display_path(dirpath))
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def list_items(list_file: str | os.PathLike) -> Iterator[Item]:
    """The paths in a text file, one a line (relative to the file's folder; # comments, blanks skipped).

    A path listed twice is rejected the second time as duplicate_path.
    """
    base = os.path.dirname(os.path.abspath(list_file))
    seen: set[str] = set()
    with open(list_file, "rb") as f:
        for raw in f:
            line = os.fsdecode(raw.rstrip(b"\r\n"))
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            path = os.path.normpath(os.path.join(base, line))
            yield _file_item(display_path(line), path, "duplicate_path" if path in seen else None)
            seen.add(path)


def _image_column(schema: pa.Schema, name: str | None, where: str) -> str:
    """The column holding images: `name`, else `image`, else the only binary or bytes-struct column."""
    def holds_images(t: pa.DataType) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)

    if name is not None:
        if name not in schema.names:
            raise ValueError(f"{where}: no column {name!r}; columns are {schema.names}")
        return name
    candidates = [f.name for f in schema if holds_images(f.type)]
    if "image" in candidates or len(candidates) == 1:
        return "image" if "image" in candidates else candidates[0]
    raise ValueError(f"{where}: cannot tell which column holds images among {schema.names}; "
                     "name it with --image-column")


@dataclass(frozen=True)
class CellReader:
    """Bytes of one image cell: binary, or a Hugging Face Image struct (bytes, else path).
    A picklable callable, so items can travel to other processes (Dask workers)."""

    value: Any  # the cell as pyarrow's to_pylist gives it
    base: str  # folder of the Parquet file, for relative paths

    def __call__(self) -> bytes:
        value = self.value
        if value is None:
            raise Rejected("empty_file", "null image cell")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return read_file(os.path.join(self.base, value["path"]))
        raise Rejected("empty_file", "image cell has neither bytes nor path")


def parquet_files(path: str | os.PathLike) -> list[str]:
    p = os.fspath(path)
    return [p] if os.path.isfile(p) else sorted(str(f) for f in Path(p).rglob("*.parquet"))


def parquet_items(path: str | os.PathLike, image_column: str | None = None, rows_per_read: int = 256,
                  start: int = 0, stop: int | None = None) -> Iterator[Item]:
    """Rows [start, stop) of a Parquet file or folder (files in name order), `rows_per_read` at a
    time from the row groups that hold them only; ids are `file:row`."""
    root = os.fspath(path)
    end = float("inf") if stop is None else stop
    first = 0  # global position of the current file's first row
    for file in parquet_files(root):
        pf = pq.ParquetFile(file)
        if first >= end:
            return
        if first + pf.metadata.num_rows <= start:
            first += pf.metadata.num_rows
            continue
        column = _image_column(pf.schema_arrow, image_column, file)
        rel = os.path.relpath(file, root) if os.path.isdir(root) else os.path.basename(file)
        row = 0  # within the file
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + row + n <= start or first + row >= end:
                row += n
                continue
            for batch in pf.iter_batches(batch_size=rows_per_read, row_groups=[g], columns=[column]):
                for value in batch.column(0).to_pylist():
                    if start <= first + row < end:
                        inner = value.get("path") if isinstance(value, dict) else None
                        yield Item(f"{rel}:{row}", inner or f"{file}:{row}", CellReader(value, os.path.dirname(file)))
                    row += 1
        first += pf.metadata.num_rows


def arrow_files(path: str | os.PathLike) -> list[str]:
    """The Arrow files of a `datasets` folder written by save_to_disk (state.json's `_data_files`,
    in order; a DatasetDict's splits in dataset_dict.json's order), of one .arrow file, or of a
    folder of them (name order)."""
    p = os.fspath(path)
    if os.path.isfile(p):
        return [p]
    root = Path(p)

    def split_files(folder: Path) -> list[str] | None:
        state = folder / "state.json"
        if not state.is_file():
            return None
        return [str(folder / f["filename"]) for f in json.loads(state.read_text()).get("_data_files", [])]

    files = split_files(root)
    if files is not None:
        return files
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        return [f for split in splits for f in split_files(root / split) or []]
    return sorted(str(f) for f in root.rglob("*.arrow"))


def is_datasets_folder(path: str | os.PathLike) -> bool:
    """A folder `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json) wrote."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def read_arrow(file: str) -> pa.Table:
    """An Arrow IPC file memory-mapped, zero-copy: the stream format save_to_disk writes, or the
    random-access file format."""
    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def arrow_items(path: str | os.PathLike, image_column: str | None = None, rows_per_read: int = 256,
                start: int = 0, stop: int | None = None) -> Iterator[Item]:
    """Rows [start, stop) of a `datasets` folder or Arrow file(s), read `rows_per_read` at a time
    from the memory-mapped files; ids are `file:row` (the file relative to the folder)."""
    root = os.fspath(path)
    end = float("inf") if stop is None else stop
    first = 0
    for file in arrow_files(root):
        if first >= end:
            return
        table = read_arrow(file)
        n = table.num_rows
        if first + n > start:
            column = table.column(_image_column(table.schema, image_column, file))
            rel = os.path.relpath(file, root) if os.path.isdir(root) else os.path.basename(file)
            lo, hi = max(start - first, 0), int(min(end - first, n))
            for at in range(lo, hi, rows_per_read):
                for row, value in enumerate(column.slice(at, min(rows_per_read, hi - at)).to_pylist(), at):
                    inner = value.get("path") if isinstance(value, dict) else None
                    yield Item(f"{rel}:{row}", inner or f"{file}:{row}", CellReader(value, os.path.dirname(file)))
        first += n
        del table


@dataclass(frozen=True)
class Shard:
    """Items [start, stop) of a source, which a worker opens itself: a Parquet shard is its row
    range (no image bytes travel with it), a folder or list shard its items (paths)."""

    path: str  # the source (--data)
    kind: str  # folder | list | parquet | arrow | webdataset | image
    image_column: str | None
    start: int
    stop: int
    items: tuple[Item, ...] = ()  # folder, list and image sources only
    member: str | None = None  # WebDataset: the shard file whose samples [start, stop) these are

    def __iter__(self) -> Iterator[Item]:
        if self.kind == "parquet":
            return parquet_items(self.path, self.image_column, start=self.start, stop=self.stop)
        if self.kind == "arrow":
            return arrow_items(self.path, self.image_column, start=self.start, stop=self.stop)
        if self.kind == "webdataset":
            return webdataset.tar_items(self.path, self.member, self.start, self.stop)
        return iter(self.items)

    def __len__(self) -> int:
        return self.stop - self.start


class Source:
    """A data source that can be iterated more than once: a folder, Parquet, a datasets folder or Arrow
    files, WebDataset shards, one image, or a list of paths (`kind` says which)."""

    def __init__(self, path: str | os.PathLike, image_column: str | None = None):
        self.path = os.fspath(path)  # what the user named with --data
        self.image_column = image_column  # Parquet and Arrow: the column holding images
        if (webdataset.is_pattern(self.path) and not os.path.exists(self.path)) or (os.path.isfile(self.path) and (self.path.endswith(".tar") or (
                not _is_text(self.path) and webdataset.is_tar(self.path)))):
            self.kind = "webdataset"  # tar shards: one, or a brace pattern of them
        elif os.path.isdir(self.path):
            self.kind = self._folder_kind()
        elif os.path.isfile(self.path):
            # by content, not name: text is a list of paths, an image Pillow recognises is that one image
            self.kind = "parquet" if self.path.endswith(".parquet") else "arrow" if self.path.endswith(".arrow") \
                else "list" if _is_text(self.path) \
                else "image" if _is_image(self.path) else None
            if self.kind is None:
                raise ValueError(f"data path {self.path!r} is neither an image Pillow recognises nor a text file of "
                                 "image paths: give an image, a folder of images, a Parquet file or folder, or a "
                                 "text file listing image paths, one a line")
        else:
            raise ValueError(f"data path {self.path!r} does not exist: expected a folder of images, a Parquet file "
                             "or folder, a datasets folder or Arrow files, WebDataset shards (a .tar, a folder of them "
                             "or a brace pattern), one image, or a text file listing image paths")
        if self.kind in ("parquet", "arrow", "list", "webdataset") and self.count() == 0:
            raise ValueError(f"data path {self.path!r} yields no image: "
                             + ("its Parquet files have no rows" if self.kind == "parquet" else
                                "its Arrow files have no rows" if self.kind == "arrow" else
                                "its tar shards hold no sample" if self.kind == "webdataset" else
                                "the list names no path (only blank lines and # comments)"))

    def _folder_kind(self) -> str:
        """What a folder holds, from one walk of its file names: a datasets folder (save_to_disk)
        or Arrow files, WebDataset shards, Parquet, or images (symlinked folders are followed for
        images only when the walk saw none); or an error saying what it holds instead, and when it
        holds more than one of these kinds (reading one would leave the others' images out)."""
        if is_datasets_folder(self.path):
            return "arrow"
        found = _suffixes(self.path)
        kinds = {"folder": bool(found & IMAGE_SUFFIXES) or any(self._images_in_folder()),
                 "parquet": ".parquet" in found, "arrow": ".arrow" in found, "webdataset": ".tar" in found}
        present = [kind for kind, held in kinds.items() if held]
        if len(present) > 1:  # reading one kind would leave the others' images out, unsaid
            named = [FOLDER_KINDS[kind] for kind in present]
            listed = f"both {named[0]} and {named[1]}" if len(named) == 2 else ", ".join(named[:-1]) + f" and {named[-1]}"
            raise ValueError(f"data folder {self.path!r} holds {listed}: memclean reads one kind per source and "
                             "would leave the others out; point --data at the folder (or files) of one kind")
        if not present:
            raise ValueError(f"data folder {self.path!r} holds no image (no {', '.join(sorted(IMAGE_SUFFIXES))} "
                             f"file and no Parquet, Arrow or .tar file): {holdings(self.path)}")
        return present[0]

    def _images_in_folder(self) -> Iterator[Item]:
        return folder_items(self.path)

    @cached_property
    def skipped(self) -> dict[str, int]:
        """A folder's files that are not read as images, by extension (folder_skipped): walked
        once, when a run first asks (at its start), and logged then when there are any."""
        skipped = folder_skipped(self.path) if self.kind == "folder" else {}
        if skipped:
            log.warning("data folder %s: %d files not read as images (not %s): %s", display_path(self.path),
                        sum(skipped.values()), "/".join(sorted(IMAGE_SUFFIXES)), skipped)
        return skipped

    def record(self) -> dict[str, Any]:
        """The manifest's `data`: path, kind and `skipped_files` (self.skipped)."""
        return {"path": self.path, "kind": self.kind, "skipped_files": self.skipped}

    def __iter__(self) -> Iterator[Item]:
        if self.kind == "folder":
            return folder_items(self.path)
        if self.kind == "image":  # one image file: one input, its file name the id
            return iter([_file_item(os.path.basename(self.path), self.path)])
        if self.kind == "parquet":
            return parquet_items(self.path, self.image_column)
        if self.kind == "arrow":
            return arrow_items(self.path, self.image_column)
        if self.kind == "webdataset":
            root, files = webdataset.shard_files(self.path)
            return (item for tar in files for item in webdataset.tar_items(root, tar))
        return list_items(self.path)

    def count(self) -> int:
        """How many items there are, without reading any image."""
        if self.kind == "parquet":
            return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(self.path))
        if self.kind == "arrow":
            return sum(read_arrow(f).num_rows for f in arrow_files(self.path))
        if self.kind == "webdataset":
            return sum(webdataset.count(tar) for tar in webdataset.shard_files(self.path)[1])
        return sum(1 for _ in self)

    def shards(self, size: int) -> Iterator[Shard]:
        """The source in consecutive shards of `size` items, each light enough to send to a
        worker: Parquet shards are row ranges read from the files' metadata alone."""
        if self.kind == "webdataset":  # row ranges within each shard file: descriptors, no bytes
            root, files = webdataset.shard_files(self.path)
            for tar in files:
                n = webdataset.count(tar)
                for start in range(0, n, size):
                    yield Shard(root, self.kind, None, start, min(start + size, n), member=tar)
            return
        if self.kind in ("parquet", "arrow"):
            n = self.count()
            for start in range(0, n, size):
                yield Shard(self.path, self.kind, self.image_column, start, min(start + size, n))
            return
        chunk: list[Item] = []
        start = 0
        for item in self:
            chunk.append(item)
            if len(chunk) == size:
                yield Shard(self.path, self.kind, self.image_column, start, start + size, tuple(chunk))
                start, chunk = start + size, []
        if chunk:
            yield Shard(self.path, self.kind, self.image_column, start, start + len(chunk), tuple(chunk))


HINTS = {".npy": "NumPy arrays?", ".npz": "NumPy arrays?", ".csv": "a table of paths? (a list file takes one per line)"}


def holdings(folder: str) -> str:
    """What a folder does hold, for an error: '12 .arrow files (a datasets folder ...?), 1 .json file'."""
    counts = _extension_counts(name for _, _, files in os.walk(folder) for name in files)
    if not counts:
        return "it is empty"
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
    return "it holds " + ", ".join(f"{n} {ext} file{'s' if n > 1 else ''}" + (f" ({HINTS[ext]})" if ext in HINTS else "")
                                   for ext, n in top) + (", ..." if len(counts) > 6 else "")


def _suffixes(folder: str) -> set[str]:
    """The lower-case extensions of every file below `folder`: one walk, for telling a folder's kind."""
    return {os.path.splitext(n)[1].lower() for _, _, files in os.walk(folder) for n in files}


def _is_image(path: str) -> bool:
    """Whether Pillow recognises the file's content as an image (its header only is read)."""
    try:
        with Image.open(path) as img:
            return bool(img.format)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _is_text(path: str) -> bool:
    """Whether a file reads as text (its first 4 KB decode as UTF-8 with no NUL): a list of paths."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return True  # unreadable: let reading it report why
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a multi-byte character cut by the 4 KB boundary
    return True


def discover(path: str | os.PathLike, image_column: str | None = None) -> Source:
    """The data source at `path` (see Source)."""
    return Source(path, image_column)


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to L / RGB / RGBA deterministically; alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_high_depth_to_uint8(img), "L")
    if channels == 4:
        return img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float grey to 8 bits, by the range the values fit in.

    I;16: full scale 65535. I and F: the smallest of 1 (float only), 255, 65535 that holds the
    maximum, else the maximum itself; negative values clip to 0.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        full = 65535.0
    else:
        peak = float(arr.max(initial=0.0))
        scales = ([1.0] if img.mode == "F" else []) + [255.0, 65535.0]
        full = next((s for s in scales if peak <= s), peak)
    return np.clip(np.round(arr / full * 255.0), 0, 255).astype(np.uint8)


def center_crop_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the largest centred box of the target aspect ratio, then resize to (H, W)."""
    H, W = size
    w, h = img.size
    if w * H > h * W:  # too wide
        cw, ch = max(1, round(h * W / H)), h
    else:
        cw, ch = w, max(1, round(w * H / W))
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return img.resize((W, H), Image.Resampling.BILINEAR) if (cw, ch) != (W, H) else img


def to_tensor(img: Image.Image, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """uint8 image -> [C, H, W] float32 in [lo, hi] as x / (255 / (hi - lo)) + lo ([-1, 1]: x / 127.5 - 1)."""
    lo, hi = data_range
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255 / (hi - lo)) + np.float32(lo))


def open_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """File bytes -> the full-size image, EXIF-oriented, in the model's mode; or Rejected."""
    if not data:
        raise Rejected("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > spec.max_pixels:
                    raise Rejected("decompression_bomb", f"{w}x{h} is over {spec.max_pixels} pixels")
                img.seek(0)  # first frame of animations
                img.load()
                img = ImageOps.exif_transpose(img)
                if min(img.size) < spec.min_size:
                    raise Rejected("too_small", f"{img.size[0]}x{img.size[1]} is under {spec.min_size} px")
                return to_model_mode(img, spec.channels)
    except Image.DecompressionBombError as e:
        raise Rejected("decompression_bomb", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise Rejected("not_an_image", str(e)) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise Rejected("corrupt_image", str(e)) from e


def pixel_sha256(img: Image.Image) -> str:
    """sha256 of mode, size and pixels: equal for the same picture in any file format."""
    h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def decode_image(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """File bytes -> [C, H, W] in the spec's data range; raises Rejected with the reason."""
    return to_tensor(center_crop_resize(open_image(data, spec), spec.size), spec.data_range)


def decode_item(item: Item, spec: ImageSpec) -> Decoded:
    """Read and decode one item; never raises for bad input."""
    if item.reject:
        return Decoded(item, None, None, item.reject)
    try:
        data = item.read()
    except Rejected as e:
        return Decoded(item, None, None, e.reason, e.detail)
    except OSError as e:
        return Decoded(item, None, None, "unreadable", str(e))
    sha = hashlib.sha256(data).hexdigest()
    try:
        img = open_image(data, spec)
    except Rejected as e:
        return Decoded(item, sha, None, e.reason, e.detail)
    pixels = to_tensor(center_crop_resize(img, spec.size), spec.data_range)
    return Decoded(item, sha, pixels, pixel_sha256=pixel_sha256(img), original_size=img.size)


def batched(items: Iterable[Item], spec: ImageSpec, size: int) -> Iterator[list[Decoded]]:
    """Decode items lazily, `size` at a time: memory holds one batch, not the dataset."""
    batch: list[Decoded] = []
    for item in items:
        batch.append(decode_item(item, spec))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_verified(source: Iterable[Item], wanted: Mapping[str, str], changed: set[str]) -> Iterator[tuple[Item, bytes]]:
    """One pass over a source: (item, bytes) of each wanted input (id -> the sha256 it was scored
    with) whose bytes are still those. The one rule for an input re-read after scoring: if its
    bytes differ, it can no longer be read, or it is gone from the source, its id is added to
    `changed` (the run rejects it as changed_during_run) and it is not yielded."""
    seen = set()
    for item in source:
        sha = wanted.get(item.id)
        if sha is None:
            continue
        seen.add(item.id)
        try:
            data = item.read()
        except (Rejected, OSError) as e:
            log.warning("%s can no longer be read: %s", item.path, e)
            changed.add(item.id)
            continue
        if hashlib.sha256(data).hexdigest() != sha:
            log.warning("%s changed since it was scored", item.path)
            changed.add(item.id)
            continue
        yield item, data
    changed.update(i for i in wanted if i not in seen)  # removed from the source since scoring


@dataclass(frozen=True)
class DecodeSettings:
    """How images are decoded when no model says it (`memclean dedup`)."""

    image_size: int = setting(64, "side images are decoded at (RGB, centre-cropped to a square) before they "
                              "are embedded; the pixel embedder then makes 32x32 thumbnails of them")
    batch_size: int = setting(64, "images decoded and embedded at a time")
    device: str = setting("cpu", f"the embedder: {DEVICE_HELP}")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.image_size < 8 or self.batch_size < 1:
            raise ValueError(f"--image-size must be at least 8 and --batch-size positive, got "
                             f"{self.image_size}, {self.batch_size}")

    def spec(self, inputs: InputSettings) -> ImageSpec:
        return ImageSpec(3, (self.image_size, self.image_size), inputs.max_pixels, inputs.min_size)
