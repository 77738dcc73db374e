"""What the runs and scoring tasks of one process share: loaded checkpoints, their embedders and
open score caches. They live in one explicit `Resources` object per process (`resources()`), with a bound
on what it holds and a `clear()`, rather than in caches hidden inside functions.

A model is reloaded when its checkpoint is rewritten in place (a retrain at the same path): the
key includes every file's size and modification time.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from pipeline.decide.embeddings import make_embedder
from pipeline.score.cache import ScoreCache
from pipeline.score.hub import model_folder
from pipeline.score.models import CheckpointError, LoadedModel, ModelSettings, load_model


def checkpoint_stamp(path: str) -> tuple:
    """(file, size, mtime) of every file under the checkpoint: changes when it is rewritten."""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return tuple((f, st.st_size, st.st_mtime_ns) for f, st in ((f, os.stat(f)) for f in files))


class Resources:
    """Loaded models (at most `max_models`, least recently used out first) and score caches
    (one per cache folder and namespace, so every shard of a run reads each file once)."""

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._caches: dict[tuple[str, str], ScoreCache] = {}
        self._embedders: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def model(self, settings: ModelSettings) -> LoadedModel:
        """The checkpoint `settings` names, loaded once while it is unchanged on disk."""
        folder, _ = model_folder(settings.model, CheckpointError)  # a Hub id: its cached snapshot
        key = (settings.model, settings.allow_pickle, settings.device, settings.variant, settings.data_range,
               checkpoint_stamp(str(folder)) if folder.exists() else ())
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        loaded = load_model(settings.model, settings.allow_pickle, settings.device, settings.variant,
                            settings.data_range)
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return loaded

    def cache(self, root: str, key: str) -> ScoreCache:
        """The process's cache for (root, key), refreshed with the files other processes added."""
        with self._lock:
            cache = self._caches.setdefault((str(root), key), ScoreCache(root, key))
        return cache.refresh()

    def embedder(self, spec: str, model: LoadedModel, size: int, device: str):
        """The duplicate-search embedder `spec` for this model, made once (a TorchScript file is
        loaded once while it is unchanged on disk, not once per shard)."""
        path = spec.partition(":")[2]
        key = (spec, model.fingerprint, size, device, checkpoint_stamp(path) if os.path.isfile(path) else ())
        with self._lock:
            if key in self._embedders:
                self._embedders.move_to_end(key)
                return self._embedders[key]
        made = make_embedder(spec, model, size, device)
        with self._lock:
            self._embedders[key] = made
            while len(self._embedders) > 2 * self.max_models:
                self._embedders.popitem(last=False)
        return made

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._caches.clear()
            self._embedders.clear()


_PROCESS = Resources()


def resources() -> Resources:
    """This process's Resources (Prefect task threads and Dask workers each reach their own)."""
    return _PROCESS


def held_mb() -> float | None:
    """The anonymous memory this process holds now (Linux RssAnon, MB): what it allocated and
    has not freed, without file pages the kernel can drop. None where /proc has no such line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def trim_heap() -> bool:
    """Hand the free pages of the C heap and of Arrow's memory pool back to the OS. A stage's
    transient arrays (a blur's buffers, a table being written) are freed, but glibc keeps the
    pages of large blocks it served from its heap, and the process's resident size would carry
    every stage's high-water mark to the end of the run. False where there is no glibc."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # Arrow's own allocator keeps freed pages too
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
