"""Read groups: how the rows of many files reach the models in batches of ``batch_size`` rows,
and how a job graph describes the reading of 100,000 files in a few hundred kilobytes.

A group is a run of (file, row groups) units of about ``batch_size`` rows, planned on the
launcher from the footers it read (``plan_groups``); one worker reads a whole group, in one
bundle, and ``Coalesce`` merges its small tables into full batches, so 3,000 files of 500
rows make 23 batches of 65,536 rows, not 3,000 tables that every later step (the models,
the split, the counts, the writers' row groups) would handle one by one. The groups travel
in the graph as one compressed blob (``ReadPlan``) and are expanded on the workers.
"""
from __future__ import annotations

import dataclasses
import pickle
import zlib

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
import numpy as np
import pyarrow as pa

SHARDS = 256  # Create elements the blob is expanded from: enough to spread, few to carry


@dataclasses.dataclass(frozen=True)
class Unit:
    """Row groups ``[first, end)`` of one file, as the launch planned them: ``rows`` is what
    its footer said the whole file holds (the rows dead-lettered if the worker cannot open
    it: only the unit with ``first == 0`` counts them), ``conflict`` why its rows cannot be
    read into the schema (or ""), ``skip`` its row ranges to leave out."""
    path: str
    first: int
    end: int
    rows: int
    conflict: str = ""
    skip: tuple = ()


def plan_groups(file_rows, row_groups, batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Read groups: lists of (file index, first row group, end row group), in file order, each
    about ``batch_size`` rows by the footers' counts (a file's row groups taken as equal).
    Many small files (or small row groups) share a group, so their rows reach the models and
    every later step as batches of ``batch_size``, in one bundle per group; a row group of
    ``batch_size`` rows or more is a group of its own (it is read ``batch_size`` rows at a
    time), so a big file spreads over as many workers as it has row groups."""
    groups, current, rows = [], [], 0.0
    for i, (n, g) in enumerate(zip(file_rows, row_groups)):
        per, first = (n / g if g else 0.0), 0
        if not g:  # no rows: still in a group, so its worker takes its content key
            current.append((i, 0, 0))
        while first < g:
            fit = g - first if per * (g - first) <= batch_size - rows else int(
                (batch_size - rows) // per)
            if not fit and current:
                groups.append(current)
                current, rows = [], 0.0
                continue
            fit = max(fit, 1)
            current.append((i, first, first + fit))
            rows += per * fit
            first += fit
            if rows >= batch_size:
                groups.append(current)
                current, rows = [], 0.0
    if current:
        groups.append(current)
    return groups


class ReadPlan:
    """The read groups of an input in compact form: the file list and the groups, pickled and
    zlib-compressed into one blob that the job graph carries (a few bytes per file, where a
    Create of (file, row group) units carried a serialized element per unit: ~4 MB per
    100,000 files, near Dataflow's 10 MB request limit). Workers expand it: ``shard(k)``
    yields the units of every ``shards``-th group."""

    def __init__(self, files, file_rows, row_groups, conflicts: dict, skip: dict,
                 batch_size: int):
        groups = plan_groups(file_rows, row_groups, batch_size)
        self.groups = len(groups)
        self.shards = max(1, min(self.groups, SHARDS))
        self._blob = zlib.compress(pickle.dumps(
            (list(files), list(file_rows), dict(conflicts), dict(skip),
             [np.array(g, np.int64).reshape(-1) for g in groups]),
            protocol=pickle.HIGHEST_PROTOCOL), 9)
        self._plan = None

    def __getstate__(self):
        return {"groups": self.groups, "shards": self.shards, "_blob": self._blob, "_plan": None}

    def shard(self, k: int):
        if self._plan is None:
            self._plan = pickle.loads(zlib.decompress(self._blob))
        files, file_rows, conflicts, skip, groups = self._plan
        for flat in groups[k::self.shards]:
            yield [Unit(files[i], int(a), int(b), file_rows[i], conflicts.get(files[i], ""),
                        tuple(skip.get(files[i], ()))) for i, a, b in flat.reshape(-1, 3).tolist()]


class Coalesce:
    """Tables in, tables of at least half of ``batch_size`` rows out (but the last one). A
    table of half a batch or more passes through untouched (a big file's batches, or a
    batch less the rows `titans label` skips, are not copied); smaller ones are merged into
    tables of exactly ``batch_size`` rows whose columns are single contiguous arrays, however
    many files they came from."""

    def __init__(self, batch_size: int):
        self._size = batch_size
        self._parts: list[pa.Table] = []
        self._rows = 0

    def add(self, table: pa.Table):
        if 2 * table.num_rows >= self._size:
            yield table
            return
        self._parts.append(table)
        self._rows += table.num_rows
        while self._rows >= self._size:
            merged = pa.concat_tables(self._parts)
            rest = merged.slice(self._size)
            yield merged.slice(0, self._size).combine_chunks()
            self._parts, self._rows = ([rest] if rest.num_rows else []), rest.num_rows

    def flush(self):
        if self._parts:
            merged = pa.concat_tables(self._parts)
            self._parts, self._rows = [], 0
            yield merged.combine_chunks() if merged.column(0).num_chunks > 1 else merged


class FileList:
    """A list of paths in compact form for the job graph (zlib over the sorted names: a few
    bytes per file where names share their directory and pattern), expanded on the workers:
    ``shard(k)`` yields every ``shards``-th path."""

    def __init__(self, paths):
        paths = list(paths)
        self.files = len(paths)
        self.shards = max(1, min(len(paths), SHARDS))
        self._blob = zlib.compress("\n".join(paths).encode(), 9)
        self._paths = None

    def __getstate__(self):
        return {"files": self.files, "shards": self.shards, "_blob": self._blob, "_paths": None}

    def shard(self, k: int):
        if self._paths is None:
            self._paths = zlib.decompress(self._blob).decode().split("\n")
        yield from self._paths[k::self.shards]


class Rebatch(beam.DoFn):
    """Tables of one bundle merged into tables of ``batch_size`` rows (``Coalesce``), the rest
    emitted when the bundle ends: the merge waits for nothing a bundle does not already
    hold. For readers whose units are known only on the workers (TFRecord files, split by
    size there): many small files in one bundle reach the models as full batches."""

    def __init__(self, batch_size: int):
        super().__init__()
        self._batch_size = batch_size
        self._out = None

    def start_bundle(self):
        self._out = Coalesce(self._batch_size)

    def process(self, table: pa.Table):
        yield from self._out.add(table)

    def finish_bundle(self):
        for table in self._out.flush():
            yield GlobalWindows.windowed_value(table)
