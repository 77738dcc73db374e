"""Read ahead in a background thread: decoding, hashing and the complexity code length overlap
the network instead of idling it between batches.

`prefetch(items, depth, work)` yields what `items` yields, in order, while a thread runs up to
`depth` items ahead (a bounded queue: memory stays depth batches), applying `work` to each
there. An error in the thread is raised where the item would have come; leaving the loop early
stops the thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 2, work: Callable[[T], T] | None = None) -> Iterator[T]:
    """items, read (and passed through `work`) up to `depth` ahead in a background thread."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put((work(item) if work else item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # raised in the consumer, where the item would have come
            put((_END, e))

    thread = threading.Thread(target=fill, name="memclean-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
