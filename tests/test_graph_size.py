"""The job graph stays small however many files the input has (issue 20, defect 6): Dataflow
refuses a job request over 10 MB, and a graph that carried one element per (file, row group)
unit, or every file's content key, grew ~40-150 bytes per file. Built, not run: what is
measured is what a launcher would submit, ``pipeline.to_runner_api().SerializeToString()``."""
import dataclasses
import os
import time

import apache_beam as beam
import pytest

from conftest import write_dataset
from titans.models.loading import ModelRef
from titans.pipeline.graphs.cascade import build_pipeline
from titans.pipeline.plan import RunConfig, plan_run

FILES = 100_000
LIMIT = 1 << 20


def _many(directory, n: int) -> list[str]:
    """``n`` real Parquet files, hard links to two written ones (an inode takes ~65,000 links):
    every name is a file a launcher lists, stats and hashes."""
    os.makedirs(directory)
    sources = [os.path.join(directory, "..", f"source-{i}.parquet") for i in (0, 1)]
    write_dataset(os.path.join(directory, "..", "one"), 10, files=1)
    for s in sources:
        os.link(os.path.join(directory, "..", "one", "part-0.parquet"), s)
    paths = [os.path.join(directory, f"part-{i:06d}-of-{n:06d}.parquet") for i in range(n)]
    for i, path in enumerate(paths):
        os.link(sources[i % 2], path)
    return paths


def _graph_bytes(plan) -> tuple[int, float]:
    started = time.perf_counter()
    p = beam.Pipeline(runner="FnApiRunner")
    build_pipeline(p, plan, 0.0)
    size = len(p.to_runner_api().SerializeToString())
    return size, time.perf_counter() - started


def _plan(tmp_path, models, files: list[str], **config):
    """A plan made on a small real input, then given ``files`` as the launch would have found
    them (one 10-row group each): the launch's footers are not what this test measures."""
    write_dataset(tmp_path / "data", 200, files=1)
    plan = plan_run(RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                              student=ModelRef(models[0]), teacher=ModelRef(models[1]), **config))
    source = dataclasses.replace(plan.input.source, files=tuple(files),
                                 file_rows=(10,) * len(files), row_groups=(1,) * len(files),
                                 num_rows=10 * len(files))
    return dataclasses.replace(plan, input=dataclasses.replace(plan.input, source=source))


def test_the_graph_for_100000_parquet_files_is_under_1_mb(tmp_path, models):
    files = [f"gs://bucket/events/dt=2026-12-07/part-{i:06d}-of-{FILES:06d}.parquet"
             for i in range(FILES)]
    size, seconds = _graph_bytes(_plan(tmp_path, models, files))
    print(f"graph of {FILES:,} Parquet files: {size:,} bytes, built in {seconds:.2f} s")
    assert size < LIMIT, f"{size:,} bytes"
    assert seconds < 30
