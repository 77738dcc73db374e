"""What the runs and scoring tasks of one process share: loaded checkpoints and open score
caches. They live in one explicit `Resources` object per process (`resources()`), with a bound
on what it holds and a `clear()`, rather than in caches hidden inside functions.

A model is reloaded when its checkpoint is rewritten in place (a retrain at the same path): the
key includes every file's size and modification time.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from pipeline.score.cache import ScoreCache
from pipeline.score.models import LoadedModel, ModelSettings, load_model


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
        self._lock = threading.Lock()

    def model(self, settings: ModelSettings) -> LoadedModel:
        """The checkpoint `settings` names, loaded once while it is unchanged on disk."""
        key = (settings.model, settings.allow_pickle, settings.device, settings.variant, settings.data_range,
               checkpoint_stamp(settings.model) if os.path.exists(settings.model) else ())
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

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._caches.clear()


_PROCESS = Resources()


def resources() -> Resources:
    """This process's Resources (Prefect task threads and Dask workers each reach their own)."""
    return _PROCESS
