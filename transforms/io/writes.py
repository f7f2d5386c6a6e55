"""Tables -> files: one file per bundle under a temporary name, put in place at the end.

Beam's own ``Write`` (temp files, then a finalize step that renames them) costs every writer
three more stages, each with its own bundle on the local runners: ~0.08 s per writer of
every run (measured), three writers per cascade. Here a writer is one ParDo fused into the
stage that produces its tables: a bundle writes one file into ``DIR/.titans-tmp-RUN/`` and
emits its path when the bundle ends. Only the paths of committed bundles reach the job's
last step (the runner discards the output of a failed or retried bundle attempt), which
renames them to ``PREFIX-SSSSS-of-NNNNN.SUFFIX`` (``Destination.put_in_place``) and then
deletes the temporary directory with anything a failed attempt left in it. Renaming skips a
file already in place, so a retried last step neither loses nor duplicates one. Readers
(pyarrow datasets among them) skip the dot-directory while a job runs.

A format is an object with ``suffix``, ``open(handle) -> (write(table), close())``: Parquet
in ``parquet_io.ParquetFormat``, TFRecord in ``tfrecord_io.TFRecordFormat``.
"""
from __future__ import annotations

import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindows

from titans.transforms.io import storage


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where a writer's files go: ``directory/PREFIX-SSSSS-of-NNNNN`` + the format's suffix."""
    directory: str
    prefix: str
    format: object
    run: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def temp_dir(self) -> str:
        return storage.join(self.directory, f".titans-tmp-{self.run}")

    def temp_path(self) -> str:
        return storage.join(self.temp_dir, f"{self.prefix}-{uuid.uuid4().hex}{self.format.suffix}")

    def put_in_place(self, temp_paths: list[str]) -> list[str]:
        """Rename the committed files to their final names (one empty file when there are
        none, so a reader always finds the output); delete the temporary directory."""
        temp_paths = sorted(set(temp_paths))
        if not temp_paths:
            empty = self.temp_path()
            write, close = self.format.open(storage.open_write(empty))
            close()
            temp_paths = [empty]
        n = len(temp_paths)
        final = [storage.join(self.directory, f"{self.prefix}-{i:05d}-of-{n:05d}{self.format.suffix}")
                 for i in range(n)]
        with ThreadPoolExecutor(min(16, n)) as pool:  # an object store renames slowly
            list(pool.map(_rename_once, temp_paths, final))
        storage.delete_under(self.temp_dir)
        return final


def _rename_once(src: str, dst: str) -> None:
    if storage.exists(src):
        storage.rename(src, dst)
    elif not storage.exists(dst):
        raise FileNotFoundError(f"{src} is gone and {dst} is not in its place")


class _WriteBundles(beam.DoFn):
    """Each bundle's tables -> one file under a temporary name; emits its path at the end."""

    def __init__(self, destination: Destination):
        self._destination = destination

    def start_bundle(self):
        self._path, self._write, self._close = None, None, None

    def process(self, table: pa.Table):
        if self._path is None:
            self._path = self._destination.temp_path()
            self._write, self._close = self._destination.format.open(
                storage.open_write(self._path))
        self._write(table)

    def finish_bundle(self):
        if self._path is not None:
            self._close()
            yield GlobalWindows.windowed_value(self._path)
            self._path = None


class WriteTables(beam.PTransform):
    """Tables -> files of ``destination``; outputs their temporary paths. The job's last step
    puts them in place (``Destination.put_in_place``); with ``finalize=True`` (tests, one-off
    writes) this transform does it itself, in a step of its own, and outputs final paths."""

    def __init__(self, destination: Destination, finalize: bool = False):
        super().__init__()
        self.destination = destination
        self._finalize = finalize

    def expand(self, tables):
        paths = tables | "WriteBundles" >> beam.ParDo(_WriteBundles(self.destination)) \
            .with_output_types(str)
        if not self._finalize:
            return paths
        return (paths | "AllPaths" >> beam.combiners.ToList()
                | "PutInPlace" >> beam.FlatMap(self.destination.put_in_place))
