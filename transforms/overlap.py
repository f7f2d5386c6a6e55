"""Overlap Parquet decoding and encoding with model work, one background thread each.

Beam runs a fused stage on one thread per bundle: read, student, split, teacher and
write follow one another. pyarrow releases the GIL while it decodes and encodes, so a
reader thread that decodes the next batch and a writer thread that encodes the previous
one keep a second core busy. Queues are bounded, so at most ``depth`` extra batches are
held in memory.

The file reader and the writers run at the lowest CPU priority (``low_priority``): the
models' forward passes split their work across every core, and one that waits for a core
the writer holds waits for all of them. Low, they take the cores the models leave idle (the
Python between forward passes) and a full queue still stops the models for them. 1M rows, 2
CPUs, 6 interleaved runs: processing 1.62 -> 1.53 s (the large pair of
benchmarks/throughput.py), 0.93-0.98 -> 0.90-0.91 s (the small pair). Not the image
decoding of ``slices_ahead``, which the model waits for (png28 processing 1.43 -> 1.55 s
at the lowest priority).
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


LOWEST = 19  # nice: a background thread's weight is 15 against the models' 1024


def low_priority() -> None:
    """This thread at the lowest CPU priority (Linux: a thread has its own nice value);
    unchanged where that cannot be set."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(items: Iterable[T], depth: int = 1, low: bool = False) -> Iterator[T]:
    """Yield ``items`` while a background thread already produces the next ``depth``; with
    ``low``, that thread at the lowest priority (``low_priority``)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        if low:
            low_priority()
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="titans-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:  # also when the consumer stops early: let the producer end
        stop.set()
        thread.join()


def slices_ahead(table, fn: Callable, rows: int) -> Iterator[tuple[int, object]]:
    """(start, fn(slice)) over consecutive slices of ``table`` of ``rows`` rows (one slice,
    possibly empty, when ``rows`` covers it); with several, the next slice's ``fn`` runs on
    a background thread while the caller works on this one: images are decoded while the
    model runs on the previous slice."""
    starts = range(0, max(table.num_rows, 1), max(rows, 1))
    items = ((lo, fn(table.slice(lo, rows))) for lo in starts)
    if len(starts) == 1:
        yield from items
    else:
        yield from read_ahead(items, depth=1)


class BackgroundWriter:
    """Calls ``write(item)`` on a background thread at the lowest priority (``low_priority``);
    ``close()`` waits and re-raises errors."""

    def __init__(self, write: Callable[[T], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="titans-writer", daemon=True)
        self._thread.start()

    def _run(self):
        low_priority()
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as e:  # noqa: BLE001 - re-raised by put/close
                    self._error = e

    def put(self, item: T) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
