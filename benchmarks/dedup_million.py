"""A million images' duplicate search on this machine: seconds, peak RSS, recall of planted pairs.

    .venv/bin/python benchmarks/dedup_million.py [--n 1000000] [--pairs 10000] [--exact 50000]

The vectors are what the default pixel embedder stores (1,024 values: a blurred, mean-removed
32x32 thumbnail), made from random fields with a natural 1/f spectrum, written to a memory-mapped
.npy as a run's shards are; `--pairs` of them are near copies of others (contrast x0.9-1.1, a
1-pixel shift for half of them, noise of 2% of the image's std, as a re-encode leaves). Then
exactly what a run does: build_index (IVF above dedup.FLAT_MAX, over the embedder's 256-value
search view) and find_clusters (range search, the embedder's aligned similarity on each
candidate pair, union-find), timed together, with the process's peak RSS.

Recall is against exact answers: a planted pair is a duplicate when the embedder's similarity of
its two vectors, computed directly, is at or above the threshold; it is found when both are in
one cluster. On the first `--exact` vectors the exact flat index is run too, and the IVF's pairs
are compared with the flat index's (all pairs, not only planted ones) at the same size, with the
seconds of each: the flat search grows as n^2 (the row extrapolates it to --n), the IVF as
n * nprobe * n / nlist. Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware, write_section  # noqa: E402
from benchmarks.memory import status_kb  # noqa: E402
from pipeline.decide.clusters import find_clusters  # noqa: E402
from pipeline.decide.index import FLAT_MAX, build_index, search_views  # noqa: E402
from pipeline.decide.neighbours import range_pairs  # noqa: E402
from pipeline.decide.embeddings import PixelEmbedder  # noqa: E402

CHUNK = 8192


def fields(rng: np.random.Generator, n: int, size: int = 32) -> torch.Tensor:
    """n grey images with a 1/f amplitude spectrum in [-1, 1]: [n, 1, size, size]."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    spectrum = (rng.normal(size=(n, size, size)) + 1j * rng.normal(size=(n, size, size))) / np.maximum(f, 1 / size)
    x = np.fft.ifft2(spectrum).real
    x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    return torch.tensor(np.clip(0.3 * x, -1, 1), dtype=torch.float32)[:, None]


def colour_fields(rng: np.random.Generator, n: int, size: int = 32) -> torch.Tensor:
    """n RGB images: a 1/f grey field, two 1/f opponent-colour fields at a third of its contrast
    and a mean colour drawn per image, in [-1, 1]: [n, 3, size, size]."""
    grey = fields(rng, n, size)[:, 0].numpy()
    c1, c2 = (0.3 * fields(rng, n, size)[:, 0].numpy() for _ in range(2))
    mean = rng.uniform(-0.5, 0.5, (n, 3, 1, 1))
    rgb = np.stack([grey + c1 + c2 / 3, grey - c1 + c2 / 3, grey - 2 * c2 / 3], 1) + mean
    return torch.tensor(np.clip(rgb, -1, 1), dtype=torch.float32)


def copies(rng: np.random.Generator, x: torch.Tensor) -> torch.Tensor:
    """Near copies: contrast x0.9-1.1, half shifted by a pixel (edges replicated), 2% noise."""
    n = len(x)
    out = x * torch.tensor(rng.uniform(0.9, 1.1, n), dtype=torch.float32).view(n, 1, 1, 1)
    shifted = torch.nn.functional.pad(out, (1, 1, 1, 1), mode="replicate")[..., 2:, 2:]
    out = torch.where(torch.tensor(rng.random(n) < 0.5).view(n, 1, 1, 1), shifted, out)
    return out + 0.02 * out.std((2, 3), keepdim=True) * torch.tensor(rng.normal(size=out.shape), dtype=torch.float32)


def make_vectors(path: Path, n: int, pairs: int, emb: PixelEmbedder, seed: int = 0) -> np.ndarray:
    """The memory-mapped vectors: rows n - pairs .. n - 1 are near copies of rows 0 .. pairs - 1
    (RGB fields when the embedder takes colour)."""
    rng = np.random.default_rng(seed)
    dims = int(emb(torch.zeros(1, 3 if emb.colour else 1, 32, 32)).shape[1])
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dims))
    originals = []
    for start in range(0, n - pairs, CHUNK):
        x = (colour_fields if emb.colour else fields)(rng, min(CHUNK, n - pairs - start))
        if start < pairs:
            originals.append(x[:pairs - start])
        out[start:start + len(x)] = emb(x).numpy()
    originals = torch.cat(originals)
    for start in range(0, pairs, CHUNK):
        out[n - pairs + start:n - pairs + start + CHUNK] = emb(copies(rng, originals[start:start + CHUNK])).numpy()
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon), polled every 50 ms in a thread."""

    def __init__(self):
        import threading

        self.peak, self.done = 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done:
            self.peak = max(self.peak, status_kb(os.getpid()).get("RssAnon", 0))
            time.sleep(0.05)

    def stop(self) -> float:
        """Stop polling; the peak in MB."""
        self.done = True
        self.thread.join()
        return self.peak / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pair_set(index, v: np.ndarray, emb: PixelEmbedder, threshold: float) -> set[tuple[int, int]]:
    """Verified pairs (the embedder's similarity >= threshold) from an index's candidates."""
    found = set()
    for rows, cols, _ in range_pairs(index, v, emb.candidate_threshold(threshold), view=emb.search_view):
        keep = rows < cols
        rows, cols = rows[keep], cols[keep]
        if len(rows):
            s = emb.similarity(v[rows], v[cols], floor=threshold)
            found |= {(int(a), int(b)) for a, b in zip(rows[s >= threshold], cols[s >= threshold])}
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--exact", type=int, default=50_000, help="vectors on which flat and IVF are compared")
    ap.add_argument("--threshold", type=float, default=PixelEmbedder.default_threshold)
    ap.add_argument("--colour", action="store_true",
                    help="RGB fields and the colour embedder (pixel+colour), its threshold judged against chance "
                         "too; prints, never writes (its own section is by hand)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    emb = PixelEmbedder(image_side=64, channels=3 if args.colour else 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        v = make_vectors(Path(tmp) / "vectors.npy", args.n, args.pairs, emb)
        made = time.perf_counter() - t0
        print(f"{args.n:,} vectors made in {made:.0f} s, peak RSS {peak_mb():.0f} MB", flush=True)
        base = peak_mb()
        anon = AnonPeak()
        t0 = time.perf_counter()
        views = search_views(v, emb.search_view)  # as lifecycle.search_duplicates: once, memory-mapped
        index = build_index(views)
        built = time.perf_counter() - t0
        ids = pa.array([f"{i:07d}" for i in range(args.n)])  # Arrow columns, as a run's score table holds them
        hashes = pa.nulls(args.n, pa.string())
        c = find_clusters(v, hashes, np.zeros(args.n), ids, args.threshold, emb, index=index, views=views)
        total = time.perf_counter() - t0
        if args.colour:  # --dup-threshold auto from the dataset itself (no reference), as a run judges it
            from pipeline.decide.chance import threshold_by_chance

            t1 = time.perf_counter()
            # distinct keys spread as pixel hashes are (the chance sample takes the smallest keys:
            # "0", "1", "10", ... would have drawn the planted originals first)
            keys = pa.array([hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(args.n)])
            judged = threshold_by_chance(v, keys, index, views, emb, 0.005)
            print(f"chance-judged threshold {judged.value:.4f} in {time.perf_counter() - t1:.0f} s", flush=True)
        peak, peak_anon = peak_mb(), anon.stop()
        view_dims = views.shape[1]
        del views
        orig, copy = np.arange(args.pairs), np.arange(args.n - args.pairs, args.n)
        truth = emb.similarity(v[orig], v[copy]) >= args.threshold
        found = (c.cluster[orig] >= 0) & (c.cluster[orig] == c.cluster[copy])
        planted = np.zeros(args.n, bool)
        planted[orig], planted[copy] = True, True
        stray = int(((c.cluster >= 0) & ~planted).sum())
        kind = type(index).__name__
        nlist, nprobe = getattr(index, "nlist", None), getattr(index, "nprobe", None)
        print(f"{kind} nlist {nlist} nprobe {nprobe}: built in {built:.0f} s, clustered in {total:.0f} s; "
              f"recall {found[truth].mean():.4f} of {truth.sum()} duplicates; {stray} unplanted rows joined; "
              f"peak RSS {peak:.0f} MB (before {base:.0f}), peak anonymous {peak_anon:.0f} MB", flush=True)
        del index
        m = min(args.exact, args.n)
        sub = np.ascontiguousarray(np.concatenate([v[:m // 2], v[args.n - m // 2:]]))
        rows = []
        for label in ("flat", "ivf"):
            t1 = time.perf_counter()
            pairs = pair_set(build_index(sub, label, view=emb.search_view), sub, emb, args.threshold)
            rows.append((label, time.perf_counter() - t1, pairs))
        (_, flat_s, flat_pairs), (_, ivf_s, ivf_pairs) = rows
        sub_recall = len(flat_pairs & ivf_pairs) / max(len(flat_pairs), 1)
        print(f"{m:,} vectors: flat {flat_s:.1f} s, IVF {ivf_s:.1f} s, IVF recall of the flat pairs {sub_recall:.4f}")
    text = "\n".join([
        "## A million vectors: `benchmarks/dedup_million.py`", "",
        f"{hardware()}. {args.n:,} {emb.name}-embedder vectors (1/f random {'RGB ' if emb.colour else ''}fields; "
        f"{args.pairs:,} near copies: "
        "contrast, 1-pixel shifts, 2% noise) memory-mapped from disk, made in "
        f"{made:.0f} s; then build_index and find_clusters as a run calls them, threshold {args.threshold}.", "",
        "| vectors | index | built (s) | built and clustered (s) | recall of planted duplicates | "
        "unplanted rows joined | peak RSS (MB) | peak anonymous (MB) |", "|---|---|---|---|---|---|---|---|",
        f"| {args.n:,} | {kind} (nlist {nlist}, nprobe {nprobe}) over the {view_dims}-value search view | {built:.0f} | "
        f"{total:.0f} | {found[truth].mean():.4f} ({int(found[truth].sum())} of {int(truth.sum())}) | {stray} | "
        f"{peak:.0f} (of which before the search {base:.0f}) | {peak_anon:.0f} |", "",
        f"Index choice, on {m:,} of them (half originals, half copies, exact answers from the flat index): "
        f"flat {flat_s:.1f} s, IVF {ivf_s:.1f} s, IVF recall of all the flat index's verified pairs "
        f"{sub_recall:.4f} ({len(flat_pairs):,} pairs). A flat self-search grows as n^2: "
        f"{flat_s * (args.n / m) ** 2 / 3600:.1f} h at {args.n:,} by extrapolation; memclean uses flat up to "
        f"{FLAT_MAX:,} vectors and IVF above. Peak RSS counts resident pages of the memory map, which the "
        "kernel can drop; anonymous memory (polled every 50 ms during the search) is what the process holds: "
        "the search's working set and the union-find's arrays. FAISS's index (1 KB a vector) is written to its "
        "file a chunk at a time and searched memory-mapped, so its pages are file-backed."])
    print(text)
    if not args.no_write and not args.colour:
        write_section("dedup-million", text)


if __name__ == "__main__":
    main()
