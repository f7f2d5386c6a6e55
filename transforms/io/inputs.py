"""A job's input, whatever its format: the files, one schema, a launch sample, a reader.

``open_input`` lists the files (leaving out the run's own output directory), picks the
format (``--format auto``: by file name, then by content) and returns a ``ParquetInput``
(transforms/parquet_io.py) or a ``TFRecordInput`` (below). Both answer the same questions:
``files``, ``schema``, ``conflicts`` (files whose rows cannot be read into the schema),
``num_rows`` (None when only reading would tell), ``sample(rows, seed)``,
``reader(batch_size, file_keys)`` (a PTransform with ``tables``, ``dead_letter`` and
``keys`` outputs) and
``read_all()`` (every row in memory, for the training commands).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import pyarrow as pa

from titans.transforms.io import storage
from titans.transforms.io.parquet import ParquetInput, input_pattern, match_files

_LOG = logging.getLogger("titans")

AUTO, PARQUET, TFRECORD = "auto", "parquet", "tfrecord"
FORMATS = (AUTO, PARQUET, TFRECORD)
_TFRECORD_NAMES = (".tfrecord", ".tfrecords", ".tfr")
SCHEMA_SAMPLE_RECORDS = 1000  # records read at launch to infer a TFRecord input's schema


def format_of_name(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".parquet"):
        return PARQUET
    if name.endswith(_TFRECORD_NAMES):
        return TFRECORD
    return None


def _sniff(path: str) -> str:
    """Parquet files start with 'PAR1'; anything else is taken for TFRecord."""
    with storage.open_read(path) as f:
        return PARQUET if f.read(4) == b"PAR1" else TFRECORD


def open_input(path: str, fmt: str = AUTO, exclude_under: str | None = None):
    """The input at ``path`` (file, directory, glob; local or URL) as a ParquetInput or
    TFRecordInput; ValueError saying what to fix."""
    return load_input(*list_input(path, fmt, exclude_under))


def load_input(fmt: str, files: list[str], max_record_bytes: int | None = None):
    """The files' footers (Parquet) or sampled records (TFRecord) read into one input;
    ``max_record_bytes``: the TFRecord record-size cap (None: the reader's default)."""
    if fmt == PARQUET:
        return ParquetInput.from_files(files)
    return TFRecordInput.from_files(files, max_record_bytes=max_record_bytes)


def list_input(path: str, fmt: str = AUTO, exclude_under: str | None = None) -> tuple[str, list[str]]:
    """(format, sorted files) of the input at ``path``, leaving out ``exclude_under``."""
    from titans.transforms.io.tfrecord import tfrecord_pattern

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    # a path that exists is literal, whatever characters its name holds (input_pattern)
    if fmt == AUTO and (path.endswith("/") or storage.kind(path) == "dir"):
        names = [format_of_name(p) for p in storage.list_under(path)
                 if os.path.dirname(p.rstrip("/")) == path.rstrip("/")]
        found = {f for f in names if f}
        if len(found) > 1:
            raise ValueError(f"{path!r} holds both Parquet and TFRecord files; pass --format")
        fmt = found.pop() if found else PARQUET
    pattern = tfrecord_pattern(path) if fmt == TFRECORD else input_pattern(path)
    files = match_files(pattern, exclude_under=exclude_under)
    if fmt == AUTO:
        kinds = {format_of_name(f) or _sniff(f) for f in files}
        if len(kinds) > 1:
            raise ValueError(f"input {path!r} matches both Parquet and TFRecord files; narrow "
                             f"the pattern or pass --format")
        fmt = kinds.pop()
    return fmt, files


@dataclasses.dataclass(frozen=True)
class TFRecordInput:
    """TFRecord files of tf.train.Example; the schema is inferred from sampled records (a
    feature's kind and length, see ``example_codec.infer_schema``)."""
    files: tuple[str, ...]
    schema: pa.Schema
    compression: str = "auto"
    conflicts: dict = dataclasses.field(default_factory=dict)
    num_rows: int | None = None  # unknown until every record is read
    # records to leave out, {path: ((first, end), ...)} of their byte offsets (where each
    # record's header starts; in the decompressed stream for GZIP)
    skip: dict = dataclasses.field(default_factory=dict)
    format: str = TFRECORD
    max_record_bytes: int | None = None  # larger records are dead-lettered (None: the default)

    @classmethod
    def from_files(cls, files: list[str], compression: str = "auto",
                   max_record_bytes: int | None = None) -> "TFRecordInput":
        from titans.transforms.io.example_codec import infer_schema
        from titans.transforms.io.tfrecord import sample_records

        try:
            records = sample_records(files, SCHEMA_SAMPLE_RECORDS, 0, compression,
                                     max_record_bytes)
        except Exception as e:  # noqa: BLE001 - unreadable, not TFRecord: say which input
            raise ValueError(f"cannot read the input as TFRecord: {type(e).__name__}: {e}") from e
        if not records:
            raise ValueError(f"no readable TFRecord record in the first records of {len(files)} "
                             f"input file(s), e.g. {files[0]}")
        try:
            schema = infer_schema(records)
        except ValueError as e:
            raise ValueError(f"the input's records are not tf.train.Example: {e}") from e
        return cls(tuple(files), schema, compression, max_record_bytes=max_record_bytes)

    def sample(self, rows: int, seed: int) -> pa.Table:
        from titans.transforms.io.example_codec import parse_examples
        from titans.transforms.io.tfrecord import sample_records

        table, _ = parse_examples(sample_records(list(self.files), rows, seed, self.compression,
                                                 self.max_record_bytes), self.schema)
        return table

    def reader(self, batch_size: int, file_keys=None):
        """``file_keys``: paths -> {path: content key}, taken before each file is read (the
        --skip-labeled manifest's), on the reader's ``keys`` output."""
        from titans.transforms.io.tfrecord import ReadTFRecordBatches

        return ReadTFRecordBatches(list(self.files), batch_size, self.schema, self.compression,
                                   max_record_bytes=self.max_record_bytes, skip=self.skip,
                                   file_keys=file_keys)

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """Every parseable record (``columns`` of it, default all), in memory; records that do
        not fit are left out and logged."""
        from titans.transforms.io.example_codec import parse_examples
        from titans.transforms.io.tfrecord_framing import RecordBatch, Unit, iter_unit
        from titans.transforms.io.tfrecord import is_gzip

        tables, dropped = [], 0
        for path in self.files:
            unit = Unit(path, 0, None, is_gzip(path, self.compression))
            for item in iter_unit(unit, 65536, max_record_bytes=self.max_record_bytes):
                if isinstance(item, RecordBatch):
                    table, dead = parse_examples(item.records, self.schema)
                    tables.append(table)
                    dropped += dead.rows.num_rows if dead is not None else 0
                else:
                    dropped += item.rows.num_rows
        if dropped:
            _LOG.warning("%d record(s) could not be read or parsed and are left out", dropped)
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        return table if columns is None else table.select(columns)
