"""The background threads of transforms/overlap.py: what they produce, and at what priority
(the file reader and the writers below the models' thread; the image decoding at its own)."""
import os
import threading

import pytest

from titans.transforms.overlap import LOWEST, BackgroundWriter, read_ahead

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread nice")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _producing(seen: list):
    for i in range(5):
        seen.append(_nice())
        yield i


def test_the_reader_thread_runs_at_the_lowest_priority_only_when_asked():
    mine = _nice()
    low, default = [], []
    assert list(read_ahead(_producing(low), low=True)) == list(range(5))
    assert list(read_ahead(_producing(default))) == list(range(5))
    assert set(low) == {LOWEST} and set(default) == {mine}
    assert _nice() == mine  # the caller's thread keeps its priority


def test_the_writer_writes_everything_in_order_at_the_lowest_priority():
    mine = _nice()
    written, priorities = [], []

    def write(item):
        priorities.append(_nice())
        written.append(item)

    writer = BackgroundWriter(write)
    for i in range(10):
        writer.put(i)
    writer.close()
    assert written == list(range(10)) and set(priorities) == {LOWEST}
    assert _nice() == mine


def test_a_failing_write_is_raised_in_the_caller():
    def write(item):
        if item == 3:
            raise ValueError("disk full")

    writer = BackgroundWriter(write)
    with pytest.raises(ValueError, match="disk full"):
        for i in range(10):
            writer.put(i)
        writer.close()
