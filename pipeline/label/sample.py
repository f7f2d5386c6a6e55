"""Phase 1, the sample: a seeded simple random sample of N rows over the input files (every
row of every readable file equally likely) -> DIR/_label/sample.parquet: the rows, all their
columns, and where each comes from (FILE_COL: the file's index; ROW_COL: its position).

A position is the row number in a Parquet file, and the byte offset of the record in a
TFRecord file (where its header starts; in the decompressed stream for GZIP), which is what
the cascade's readers leave out (``JobConfig.skip_rows``). Rows are drawn by row number over
the files' row counts (the launch plan's), then read: Parquet decodes only the row groups
holding a sampled row; a TFRecord file is framed from its start and its sampled records
parsed. A sampled row that cannot be read into the input schema is left to the cascade,
which dead-letters it like any other such row.
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titans.transforms.io import storage
from titans.transforms.io.parquet import ParquetInput, conform, open_parquet

_LOG = logging.getLogger("titans")

FILE_COL, ROW_COL = "__titans_file", "__titans_row"  # where a sample row comes from


def run(c, launch, jd) -> int:
    """Draw and read the sample into ``jd.sample``; the number of rows drawn."""
    per_file = draw_sample(launch.row_counts, launch.sample_rows, c.job.seed)
    source = launch.source
    jobs = [(i, f, rows) for i, (f, rows) in enumerate(zip(source.files, per_file)) if rows.size]
    if isinstance(source, ParquetInput):
        def read(job):
            return read_rows(job[1], job[2], job[0], source.schema, c.job.batch_size)
    else:
        def read(job):
            return read_records(job[1], job[2], job[0], source)
    with ThreadPoolExecutor(min(8, len(jobs))) as pool:
        parts = list(pool.map(read, jobs))
    table = pa.concat_tables([t for t, _ in parts])
    bad = sum(b for _, b in parts)
    if bad:
        _LOG.warning("%d sampled row(s) do not fit the input schema; the cascade dead-letters them",
                     bad)
    write_parquet(jd.sample, table)
    return launch.sample_rows


def draw_sample(row_counts: list[int], n: int, seed: int) -> list[np.ndarray]:
    """Row numbers (sorted, per file) of a seeded simple random sample of ``n`` of the rows:
    every row of every file equally likely, so files get rows in proportion to their size."""
    total = int(sum(row_counts))
    picked = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    bounds = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    return [picked[(picked >= a) & (picked < b)] - a for a, b in zip(bounds[:-1], bounds[1:])]


def _target(schema: pa.Schema) -> pa.Schema:
    return pa.schema([*schema, pa.field(FILE_COL, pa.int32()), pa.field(ROW_COL, pa.int64())],
                     metadata=schema.metadata)


def _with_origin(table: pa.Table, file_index: int, positions) -> pa.Table:
    n = table.num_rows
    table = table.append_column(FILE_COL, pa.array(np.full(n, file_index, np.int32)))
    return table.append_column(ROW_COL, pa.array(np.asarray(positions, np.int64)))


def read_rows(path: str, rows: np.ndarray, file_index: int, schema: pa.Schema,
              batch_size: int) -> tuple[pa.Table, int]:
    """(the rows ``rows`` of one Parquet file, conformed to ``schema`` plus their file and row
    numbers; how many could not be conformed, which the cascade will dead-letter). Decodes
    only the row groups that hold a sampled row, ``batch_size`` rows at a time."""
    pf = open_parquet(path)
    meta = pf.metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    target = _target(schema)
    tables, bad = [], 0
    for g in range(len(sizes)):
        lo, hi = np.searchsorted(rows, [starts[g], starts[g + 1]])
        if lo == hi:
            continue
        wanted, offset, kept = rows[lo:hi], int(starts[g]), []
        try:
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g]):
                here = wanted[(wanted >= offset) & (wanted < offset + batch.num_rows)]
                if here.size:
                    t = pa.Table.from_batches([batch]).take(pa.array(here - offset))
                    good, rejected, _ = conform(_with_origin(t, file_index, here), target)
                    kept.append(good)
                    bad += 0 if rejected is None else rejected.num_rows
                offset += batch.num_rows
        except Exception as e:  # noqa: BLE001 - a corrupt page: the cascade dead-letters the group
            _LOG.warning("%s: cannot read row group %d (%s: %s); its %d sampled row(s) are left "
                         "to the cascade", path, g, type(e).__name__, e, wanted.size)
            bad += wanted.size
            continue
        tables.extend(kept)
    return (pa.concat_tables(tables) if tables else target.empty_table()), bad


def _frames(path: str, source):
    """The RecordBatches of one whole TFRecord file, in order (damage skipped, as the
    cascade's reader skips it into the dead letter)."""
    from titans.transforms.io.tfrecord import is_gzip
    from titans.transforms.io.tfrecord_framing import RecordBatch, Unit, iter_unit

    unit = Unit(path, 0, None, is_gzip(path, source.compression))
    for item in iter_unit(unit, 65536, max_record_bytes=source.max_record_bytes):
        if isinstance(item, RecordBatch):
            yield item


def count_records(path: str, source) -> int:
    """The records of one TFRecord file of the input ``source`` (a TFRecordInput)."""
    try:
        return sum(len(batch.records) for batch in _frames(path, source))
    except Exception as e:  # noqa: BLE001 - unreadable: no row of it can be sampled
        _LOG.warning("%s: cannot count its records (%s: %s); none of them is sampled (the "
                     "cascade dead-letters what it cannot read)", path, type(e).__name__, e)
        return 0


def read_records(path: str, rows: np.ndarray, file_index: int, source) -> tuple[pa.Table, int]:
    """(the records numbered ``rows`` of one TFRecord file, parsed into the input schema plus
    their file index and byte offsets; how many did not parse, left to the cascade)."""
    from titans.transforms.io.example_codec import parse_with_rejects

    records, offsets, seen = [], [], 0
    for batch in _frames(path, source):
        n = len(batch.records)
        lo, hi = np.searchsorted(rows, [seen, seen + n])
        for r in rows[lo:hi]:
            records.append(batch.records[r - seen])
            offsets.append(int(batch.offsets[r - seen]))
        seen += n
    table, rejected, _ = parse_with_rejects(records, source.schema)
    good = np.setdiff1d(np.arange(len(records)), rejected)
    table = _with_origin(table, file_index, np.asarray(offsets, np.int64)[good])
    return table.cast(_target(source.schema)), int(rows.size - good.size)


def write_parquet(path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    if not storage.is_url(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_bytes(path, buf.getvalue())


__all__ = ["run", "draw_sample", "read_rows", "read_records", "count_records", "write_parquet",
           "FILE_COL", "ROW_COL"]
