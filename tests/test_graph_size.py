"""The job graph stays small however many files the input has (issue 20, defect 6): Dataflow
refuses a job request over 10 MB, and a graph that carried one element per (file, row group)
unit, or every file's content key, grew ~40-150 bytes per file. Built, not run: what is
measured is what a launcher would submit, ``pipeline.to_runner_api().SerializeToString()``."""
import dataclasses
import os
import time

import apache_beam as beam

from conftest import DIM, write_dataset
from titans.models.loading import ModelRef
from titans.pipeline.graphs.cascade import build_pipeline
from titans.pipeline.plan import RunConfig, plan_run

FILES = 100_000
LIMIT = 1 << 20


def _distinct_files(directory, n: int) -> list[str]:
    """``n`` real Parquet files, each with its own footer (and so its own content key): one
    file written with a 6-digit footer field, copied with those digits replaced by the copy's
    number (same length, so the footer stays valid)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory)
    one = os.path.join(directory, "..", "one.parquet")
    table = pa.table({"id": [1], "features": [[0.5] * DIM]})
    with pq.ParquetWriter(one, table.schema) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({"copy": "@@@@@@"})
    data = open(one, "rb").read()
    assert data.count(b"@@@@@@") == 1
    paths = []
    for i in range(n):
        paths.append(os.path.join(directory, f"part-{i:06d}.parquet"))
        with open(paths[-1], "wb") as f:
            f.write(data.replace(b"@@@@@@", b"%06d" % i))
    return paths


def _graph_bytes(plan) -> tuple[int, float]:
    started = time.perf_counter()
    p = beam.Pipeline(runner="FnApiRunner")
    build_pipeline(p, plan, 0.0)
    size = len(p.to_runner_api().SerializeToString())
    return size, time.perf_counter() - started


def _plan(tmp_path, models, files: list[str], **config):
    """A plan made on a small real input, then given ``files`` as the launch would have found
    them (four 10-row groups each): the launch's footers are not what this test measures."""
    write_dataset(tmp_path / "data", 200, files=1)
    plan = plan_run(RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                              student=ModelRef(models[0]), teacher=ModelRef(models[1]), **config))
    source = dataclasses.replace(plan.input.source, files=tuple(files),
                                 file_rows=(40,) * len(files), row_groups=(4,) * len(files),
                                 num_rows=40 * len(files))
    return dataclasses.replace(plan, input=dataclasses.replace(plan.input, source=source))


def test_the_graph_for_100000_parquet_files_is_under_1_mb(tmp_path, models):
    files = [f"gs://bucket/events/dt=2026-12-07/part-{i:06d}-of-{FILES:06d}.parquet"
             for i in range(FILES)]
    size, seconds = _graph_bytes(_plan(tmp_path, models, files))
    print(f"graph of {FILES:,} Parquet files: {size:,} bytes, built in {seconds:.2f} s")
    assert size < LIMIT, f"{size:,} bytes"
    assert seconds < 30


def test_the_graph_keeps_no_content_keys_for_the_manifest(tmp_path, models):
    """--skip-labeled: the files' content keys (a footer hash each, here) are taken by the
    workers that read the files, not embedded in the job's last step."""
    files = _distinct_files(tmp_path / "many", FILES)
    plan = _plan(tmp_path, models, files, skip_labeled=str(tmp_path / "manifest.json"))
    size, seconds = _graph_bytes(plan)
    print(f"graph of {FILES:,} local Parquet files with a manifest: {size:,} bytes, built in "
          f"{seconds:.2f} s")
    assert size < LIMIT, f"{size:,} bytes"
    assert seconds < 30


def test_the_graph_for_100000_tfrecord_files_is_under_1_mb(tmp_path, models):
    from titans.transforms.io.tfrecord import write_table

    table = write_dataset(tmp_path / "pq", 200, files=1)
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "data")
    write_table(pq.read_table(tmp_path / "pq" / "part-0.parquet"),
                str(tmp_path / "data" / "part-0.tfrecord"))
    plan = plan_run(RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                              student=ModelRef(models[0]), teacher=ModelRef(models[1])))
    files = tuple(f"gs://bucket/events/dt=2026-12-07/part-{i:06d}-of-{FILES:06d}.tfrecord.gz"
                  for i in range(FILES))
    plan = dataclasses.replace(plan, input=dataclasses.replace(
        plan.input, source=dataclasses.replace(plan.input.source, files=files)))
    size, seconds = _graph_bytes(plan)
    print(f"graph of {FILES:,} TFRecord files: {size:,} bytes, built in {seconds:.2f} s")
    assert size < LIMIT, f"{size:,} bytes"
    assert table is not None
