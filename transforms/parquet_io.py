"""Read and write Parquet as bounded Arrow tables, on any Beam filesystem (local, gs://, ...).

Reading is planned per row group, not per file: a file's footer is split into
(file, row group) units, the units are reshuffled so workers share them, and each unit
is decoded ``batch_size`` rows at a time. So a batch never exceeds ``batch_size`` rows
whatever the file layout (pyarrow writes 1M-row groups by default, Spark ~128 MB ones),
and a few huge files still spread over many workers.
"""
from __future__ import annotations

import logging
import random

import apache_beam as beam
import numpy as np
from apache_beam.io import filebasedsink, fileio, filesystem
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from titans.transforms import arrow_coder  # noqa: F401  registers the pa.Table coder
from titans.transforms.dead_letter import READ, DeadLetter
from titans.transforms.features import is_list_type
from titans.transforms.overlap import BackgroundWriter, read_ahead

_LOG = logging.getLogger("titans")


def input_pattern(path: str) -> str:
    """A directory (local or URL) means every ``*.parquet`` file directly inside it."""
    if any(ch in path for ch in "*?["):
        return path
    if path.endswith("/") or _is_local_dir(path):
        return FileSystems.join(path.rstrip("/"), "*.parquet")
    return path


def _is_local_dir(path: str) -> bool:
    import os

    return "://" not in path and os.path.isdir(path)


def match_files(pattern: str) -> list[str]:
    """Sorted paths matching ``pattern``; ValueError with what to fix if there are none."""
    try:
        result = FileSystems.match([pattern])[0]
    except Exception as e:  # noqa: BLE001 - bad scheme, missing bucket, no credentials...
        raise ValueError(f"cannot list input {pattern!r}: {e}") from e
    files = sorted(m.path for m in result.metadata_list if m.size_in_bytes > 0)
    if not files:
        raise ValueError(f"no non-empty file matches input {pattern!r}; check the path, or pass "
                         f"a directory of .parquet files or a glob like 'data/*.parquet'")
    return files


def open_parquet(path: str) -> pq.ParquetFile:
    """Local files are memory-mapped; anything else goes through Beam's filesystems."""
    if "://" not in path:
        return pq.ParquetFile(path, memory_map=True)
    return pq.ParquetFile(FileSystems.open(path, compression_type="uncompressed"))


def read_schema(path: str) -> pa.Schema:
    try:
        return open_parquet(path).schema_arrow
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read {path!r} as Parquet: {e}") from e


def sample_rows(files: list[str], rows: int, seed: int, schema: pa.Schema) -> pa.Table:
    """About ``rows`` rows from randomly chosen row groups (the first rows of each).

    Reads at most 32 files' footers and decodes only the rows it keeps, so it stays
    cheap on huge datasets. Rows are spread over up to 32 (file, row group) units and
    conformed to ``schema``; rows that cannot be are left out.
    """
    rng = random.Random(seed)
    chosen = rng.sample(files, min(len(files), 32))
    units = [(f, g) for f in chosen for g in range(open_parquet(f).num_row_groups)]
    rng.shuffle(units)
    units = units[:32]
    per_unit = max(1, -(-rows // max(1, len(units))))
    tables = []
    for f, g in units:
        batches = open_parquet(f).iter_batches(batch_size=per_unit, row_groups=[g])
        first = next(iter(batches), None)
        if first is not None:
            tables.append(split_conforming(pa.Table.from_batches([first]), schema)[0])
    return pa.concat_tables(tables) if tables else schema.empty_table()


class _SplitIntoRowGroups(beam.DoFn):
    def process(self, path: str):
        for g in range(open_parquet(path).num_row_groups):
            yield path, g


class _ReadRowGroup(beam.DoFn):
    """One row group -> tables of at most ``batch_size`` rows, conformed to the input schema.

    Rows that cannot be conformed (a file whose schema differs from the first file's)
    go to the ``dead_letter`` output with the reason, so they are still counted.
    """
    DEAD_LETTER = "dead_letter"

    def __init__(self, batch_size: int, schema: pa.Schema):
        self._batch_size = batch_size
        self._schema = schema

    def process(self, unit):
        path, group = unit
        batches = open_parquet(path).iter_batches(batch_size=self._batch_size, row_groups=[group])
        for batch in read_ahead(batches):
            good, bad, reason = split_conforming(pa.Table.from_batches([batch]), self._schema)
            if good.num_rows:
                yield good
            if bad is not None:
                yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, DeadLetter(
                    bad, f"{path} does not fit the first input file's schema: {reason}", READ))


def split_conforming(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, pa.Table | None, str]:
    """(rows conformed to ``schema``, the rows that cannot be or None, why).

    The common case is one cast of the whole table; only when that fails are rows cast
    one by one, so a few odd rows (a vector of the wrong length in a variable-length
    list column, say) do not take their whole batch down with them.
    """
    if table.schema.equals(schema, check_metadata=False):
        return table, None, ""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        return schema.empty_table(), table, f"missing column(s) {missing}"
    table = table.select(schema.names)
    try:
        return table.cast(schema), None, ""
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        reason = str(e).splitlines()[0]
    ok = np.zeros(table.num_rows, bool)
    for i in range(table.num_rows):
        try:
            table.slice(i, 1).cast(schema)
            ok[i] = True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    good = table.filter(pa.array(ok)).cast(schema) if ok.any() else schema.empty_table()
    return good, (table.filter(pa.array(~ok)) if not ok.all() else None), reason


class ReadParquetBatches(beam.PTransform):
    """Files matching ``pattern`` -> PCollection of pa.Table with at most ``batch_size`` rows.

    Tagged outputs: ``tables`` (conforming to ``schema``) and ``dead_letter``
    (DeadLetter for batches whose schema cannot be made to conform).
    """

    def __init__(self, pattern: str, batch_size: int, schema: pa.Schema):
        super().__init__()
        self._pattern = pattern
        self._batch_size = batch_size
        self._schema = schema

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern)
            | "NonEmpty" >> beam.Filter(lambda m: m.size_in_bytes > 0)
            | "Paths" >> beam.Map(lambda m: m.path)
            | "SplitIntoRowGroups" >> beam.ParDo(_SplitIntoRowGroups())
            | "Spread" >> beam.Reshuffle()
            | "ReadRowGroups" >> beam.ParDo(_ReadRowGroup(self._batch_size, self._schema))
            .with_output_types(pa.Table, dead_letter=DeadLetter)
            .with_outputs(_ReadRowGroup.DEAD_LETTER, main="tables"))


class _ParquetSink(filebasedsink.FileBasedSink):
    """Tables -> Parquet files through Beam's temp-file-and-rename protocol (safe on retries).

    Dictionary encoding only for non-floating columns: pyarrow tries it on every column by
    default, and on float features it costs ~25% of the write for no gain.
    """

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__(prefix, coder=None, file_name_suffix=".parquet",
                         mime_type="application/x-parquet",
                         compression_type=filesystem.CompressionTypes.UNCOMPRESSED)
        self._schema = schema
        self._dictionary = [f.name for f in schema if not _is_floating(f.type)]

    def open(self, temp_path):
        handle = super().open(temp_path)
        writer = pq.ParquetWriter(handle, self._schema, compression="snappy",
                                  use_dictionary=self._dictionary)
        return writer, handle, BackgroundWriter(writer.write_table)

    def write_record(self, file, table: pa.Table):
        file[2].put(table)

    def close(self, file):
        writer, handle, background = file
        background.close()
        writer.close()
        handle.close()


def _is_floating(t: pa.DataType) -> bool:
    while is_list_type(t):
        t = t.value_type
    return pa.types.is_floating(t)


class WriteParquetBatches(beam.PTransform):
    """Tables -> ``directory/PREFIX-SSSSS-of-NNNNN.parquet`` (snappy), a row group per table."""

    def __init__(self, directory: str, schema: pa.Schema, prefix: str = "part"):
        super().__init__()
        self._prefix = FileSystems.join(directory, prefix)
        self._schema = schema

    def expand(self, tables):
        return tables | beam.io.iobase.Write(_ParquetSink(self._prefix, self._schema))
