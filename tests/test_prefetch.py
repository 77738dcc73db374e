"""io/prefetch.py: read-ahead in order, bounded, errors where they belong, stopped when left."""
import threading
import time

import pytest

from pipeline.io.prefetch import prefetch


def test_yields_everything_in_order_with_work_applied():
    assert list(prefetch(range(10), 2, lambda i: i * i)) == [i * i for i in range(10)]
    assert list(prefetch([], 1)) == []


def test_reads_at_most_depth_ahead():
    """With the consumer holding still, the thread has taken depth items into the queue, one
    more in hand waiting for room, and no further."""
    taken = []

    def source():
        for i in range(100):
            taken.append(i)
            yield i
    it = prefetch(source(), 3)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(taken) <= 1 + 3 + 1  # the one consumed, the queue's 3, the one waiting to go in
    it.close()


def test_an_error_is_raised_where_its_item_would_come():
    def source():
        yield 1
        raise OSError("disk gone")
    it = prefetch(source(), 2)
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_leaving_early_stops_the_thread():
    before = threading.active_count()
    it = prefetch(iter(range(10**9)), 2)
    next(it)
    it.close()
    assert threading.active_count() == before


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        list(prefetch([1], 0))
