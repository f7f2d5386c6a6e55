import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import RUNNER, features_table, write_dataset
from titans.transforms.parquet_io import ReadParquetBatches, input_pattern, match_files


def _pipeline():
    return test_pipeline.TestPipeline(options=PipelineOptions(RUNNER))


def test_batches_are_bounded_whatever_the_row_group(tmp_path):
    # one file, one 5000-row group: the read must still come in batches of <= 1024 rows
    x = np.zeros((5000, 3), np.float32)
    pq.write_table(features_table(np.arange(5000), x), tmp_path / "big.parquet",
                   row_group_size=1_000_000)
    schema = pq.read_schema(tmp_path / "big.parquet")
    with _pipeline() as p:
        read = p | ReadParquetBatches(str(tmp_path / "*.parquet"), 1024, schema)
        sizes = read.tables | beam.Map(lambda t: t.num_rows)
        assert_that(sizes | "Max" >> beam.combiners.Top.Largest(1), equal_to([[1024]]), label="max")
        assert_that(sizes | "Sum" >> beam.CombineGlobally(sum), equal_to([5000]), label="sum")


def test_every_row_is_read_once_across_files_and_row_groups(tmp_path):
    write_dataset(tmp_path, 2500, files=3, row_group_size=300)
    schema = pq.read_schema(tmp_path / "part-0.parquet")
    with _pipeline() as p:
        read = p | ReadParquetBatches(input_pattern(str(tmp_path)), 128, schema)
        ids = read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist())
        assert_that(ids, equal_to(list(range(2500))))


def test_a_file_with_another_schema_goes_to_the_dead_letter(tmp_path):
    write_dataset(tmp_path, 100, files=1)
    pq.write_table(pa.table({"id": [1000, 1001], "other": [1.0, 2.0]}), tmp_path / "odd.parquet")
    schema = pq.read_schema(tmp_path / "part-0.parquet")
    with _pipeline() as p:
        read = p | ReadParquetBatches(str(tmp_path / "*.parquet"), 64, schema)
        n_ok = read.tables | "ok" >> beam.Map(lambda t: t.num_rows) | "s1" >> beam.CombineGlobally(sum)
        bad = read.dead_letter | beam.Map(lambda d: (d.rows.num_rows, d.stage,
                                                              "missing column" in d.reasons))
        assert_that(n_ok, equal_to([100]), label="ok")
        assert_that(bad, equal_to([(2, "read", True)]), label="bad")


def test_input_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="no non-empty file matches"):
        match_files(str(tmp_path / "missing" / "*.parquet"))
    os.makedirs(tmp_path / "d")
    assert input_pattern(str(tmp_path / "d")).endswith(os.path.join("d", "*.parquet"))
