"""FAISS index files: the duplicate search's vectors written in FAISS's own format a chunk at a
time, and read back memory-mapped.

An inner-product index over unit vectors (exact IndexFlatIP up to FLAT_MAX vectors, IVF above)
is written to its file a chunk at a time, in FAISS's own format, and searched memory-mapped
from it: its storage (1 KB an image) is file pages, not memory the run holds. With a CUDA
device and a GPU build of FAISS (faiss-gpu) the index moves to the GPU.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

# Above FLAT_MAX vectors, an IVF index. benchmarks/dedup.py (2 CPU cores, d = 1024): the exact
# flat self-search takes 0.56 s at 5,000, 6.9 s at 20,000 and 35 s at 50,000 vectors (0.7 ms per
# image, growing linearly: about 1.4 ms at 100,000, well under 1% of the ~0.5 s per image that
# scoring costs), while IVF is no faster below 20,000 and 1.14x faster at 50,000 (recall 1.000
# on that data). Exactness is worth its price up to here; past it IVF's sqrt(n) advantage grows.
FLAT_MAX = 100_000
QUERY_BATCH = 4096  # queries per range search call
VIEW_BATCH = 1024  # rows per search-view computation (a view's scratch is a few times its rows)
IVF_TRAIN_PER_LIST = 39  # training points per IVF list
IVF_NPROBE = 8  # IVF lists searched per query


def gpu_faiss_available() -> bool:
    import faiss

    return hasattr(faiss, "index_cpu_to_gpu") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def on_gpu(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def chunks(vectors: np.ndarray, view: Callable[[np.ndarray], np.ndarray] | None,
            size: int = QUERY_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """(start, view of rows start..start+size) over vectors that may be memory-mapped: only one
    chunk of the view is ever in memory."""
    for start in range(0, len(vectors), size):
        chunk = np.asarray(vectors[start:start + size])
        yield start, np.ascontiguousarray(view(chunk) if view else chunk, dtype=np.float32)


def search_views(vectors: np.ndarray, view: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """Every row through `view` (an embedder's search view), a chunk at a time. When vectors
    are memory-mapped from a file, the views go to an unnamed temporary file beside it, mapped
    too: their pages are the kernel's to drop, and the file is gone once the array is."""
    if view is None:
        return vectors if vectors.dtype == np.float32 and vectors.flags.c_contiguous \
            else np.ascontiguousarray(vectors, dtype=np.float32)
    folder = os.path.dirname(getattr(vectors, "filename", None) or "")
    n = len(vectors)
    d = view(np.ones((1, vectors.shape[1]), np.float32)).shape[1]
    out = np.memmap(tempfile.TemporaryFile(dir=folder), np.float32, "w+", shape=(n, d)) if folder and n \
        else np.empty((n, d), np.float32)
    for start, chunk in chunks(vectors, view, VIEW_BATCH):
        out[start:start + len(chunk)] = chunk
    return out


def build_index(vectors: np.ndarray, kind: str = "auto", device: str = "cpu",
                view: Callable[[np.ndarray], np.ndarray] | None = None, path: str | os.PathLike | None = None):
    """An inner-product FAISS index over unit vectors [N, d] (flat, or IVF for large N) or
    their `view` (an embedder's search view; see search_views), written to `path` (an
    unnamed temporary file when None) by write_index and read back memory-mapped: FAISS's
    storage is the file's pages, which the kernel can drop, not memory the run holds. On the
    GPU when `device` is CUDA and FAISS has GPU support (else on the CPU, with a warning)."""
    import faiss

    x = search_views(vectors, view)
    if path is None:  # a file that is gone once read: the map keeps its pages
        folder = os.path.dirname(getattr(x, "filename", None) or getattr(vectors, "filename", None) or "") or None
        fd, tmp = tempfile.mkstemp(suffix=".faiss", dir=folder)
        os.close(fd)
        try:
            write_index(x, tmp, kind)
            index = read_index(tmp)
        finally:
            os.unlink(tmp)
    else:
        write_index(x, path, kind)
        index = read_index(path)
    del x
    return on_device(index, device)


def on_device(index, device: str = "cpu"):
    """The index on the GPU when `device` is CUDA and FAISS has GPU support (else as it is, with
    a warning)."""
    import faiss

    if str(device).startswith("cuda"):
        if gpu_faiss_available():
            gpu = int(str(device).partition(":")[2] or 0)
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, gpu, index)
            index.memclean_resources = resources  # the GPU memory must live as long as the index
        else:
            log.warning("device %s: this FAISS build has no GPU support (install faiss-gpu); "
                        "duplicate search runs on the CPU", device)
    return index


def check_faiss() -> None:
    """FAISS must memory-map flat indexes (IO_FLAG_MMAP_IFC, FAISS 1.11): checked when a run
    starts, not hours later at its duplicate search."""
    import faiss

    if not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        raise RuntimeError(f"FAISS {faiss.__version__} cannot memory-map a flat index: memclean needs FAISS 1.11 "
                           "or later (pip install 'faiss-cpu>=1.11', or faiss-gpu of that version)")


def read_index(path: str | os.PathLike):
    """A FAISS index file memory-mapped: a flat index's storage (IO_FLAG_MMAP_IFC), or an IVF
    index's lists (IO_FLAG_MMAP: OnDiskInvertedLists over the file). FAISS takes one or the other."""
    import faiss

    check_faiss()
    with open(path, "rb") as f:
        ivf = f.read(4) == b"IwFl"
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC)


def write_index(x: np.ndarray, path: str | os.PathLike, kind: str = "auto") -> str:
    """Write `x` [N, d] (float32, possibly memory-mapped) as a FAISS inner-product index file
    a chunk at a time: IndexFlatIP up to FLAT_MAX rows (or kind 'flat'), else IndexIVFFlat.
    FAISS's own serialisation gives the header and the rows follow in its layout, without ever
    holding the index (at a million images it is 1 GB): faiss.read_index reads it as the same
    index built in memory, and the bytes are faiss.write_index's own (for IVF when more than
    half the lists are non-empty; FAISS writes sparse list sizes otherwise). Returns the kind."""
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"index kind must be auto, flat or ivf, got {kind!r}")
    n, d = x.shape
    flat = kind == "flat" or (kind == "auto" and n <= FLAT_MAX)
    with open(path, "wb") as f:
        if flat:
            _write_flat(f, x)
        else:
            _write_ivf(f, x)
    return "flat" if flat else "ivf"


def _serialized(index) -> bytearray:
    import faiss

    return bytearray(faiss.serialize_index(index).tobytes())


def _set_ntotal(header: bytearray, n: int) -> bytearray:
    """Every FAISS index header is fourcc, d (int32), ntotal (int64), ...: set ntotal."""
    if header[8:16] != bytes(8):
        raise RuntimeError("unexpected FAISS index header (ntotal of an empty index is not 0)")
    header[8:16] = np.int64(n).tobytes()
    return header


def _write_flat(f, x: np.ndarray) -> None:
    """IndexFlatIP: its header, then its codes as one vector (count of floats, the floats)."""
    import faiss

    n, d = x.shape
    header = _serialized(faiss.IndexFlatIP(d))  # ends with the empty codes vector's count, 0
    if header[-8:] != bytes(8) or header[:4] != b"IxFI":
        raise RuntimeError("unexpected FAISS IndexFlatIP serialisation")
    header[-8:] = np.uint64(n * d).tobytes()
    f.write(_set_ntotal(header, n))
    for start, chunk in chunks(x, None):
        f.write(chunk.tobytes())


IVF_EMPTY_LISTS = 32  # "ilar", nlist, code_size, "sprs", an empty vector: the lists of an empty index


def _write_ivf(f, x: np.ndarray) -> None:
    """IndexIVFFlat: FAISS's serialisation of the trained, empty index up to its inverted
    lists, then the lists in FAISS's array layout ("ilar", "full" sizes, then each non-empty
    list's codes and ids), each row in the list of its nearest centroid (quantizer.assign, as
    IndexIVF.add does), in row order within a list."""
    import faiss

    n, d = x.shape
    # benchmarks/dedup_million.py: 4 sqrt(n) lists trained on 39 points each (FAISS's floor)
    # and 8 probed keep the planted pairs' recall above 0.95 at a million, in minutes on 2 cores
    nlist = max(1, int(4 * np.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
    index.train(np.ascontiguousarray(x[sample]))
    index.nprobe = min(nlist, IVF_NPROBE)
    empty = _serialized(index)
    tail = empty[-IVF_EMPTY_LISTS:]
    if tail[:4] != b"ilar" or tail[20:24] != b"sprs" or empty[:4] != b"IwFl":
        raise RuntimeError("unexpected FAISS IndexIVFFlat serialisation")
    lists = np.empty(n, np.int64)
    for start, chunk in chunks(x, None):
        lists[start:start + len(chunk)] = index.quantizer.assign(chunk, 1).ravel()
    order = np.argsort(lists, kind="stable")
    sizes = np.bincount(lists, minlength=nlist).astype(np.uint64)
    del lists
    f.write(_set_ntotal(empty[:-IVF_EMPTY_LISTS], n))
    f.write(b"ilar" + np.uint64(nlist).tobytes() + np.uint64(d * 4).tobytes() + b"full")
    f.write(np.uint64(nlist).tobytes() + sizes.tobytes())
    ends = np.cumsum(sizes.astype(np.int64))
    for end, size in zip(ends.tolist(), sizes.tolist()):
        if size:
            rows = order[end - size:end]
            f.write(np.ascontiguousarray(x[rows], dtype=np.float32).tobytes())
            f.write(rows.astype(np.int64).tobytes())

