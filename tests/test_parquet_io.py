import dataclasses
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
from titans.transforms.io.parquet import ParquetInput, ReadParquetBatches, input_pattern, match_files


def _input(path) -> ParquetInput:
    return ParquetInput.from_files(match_files(input_pattern(str(path))))


def _pipeline():
    return test_pipeline.TestPipeline(options=PipelineOptions(RUNNER))


def test_batches_are_bounded_whatever_the_row_group(tmp_path):
    # one file, one 5000-row group: the read must still come in batches of <= 1024 rows
    x = np.zeros((5000, 3), np.float32)
    pq.write_table(features_table(np.arange(5000), x), tmp_path / "big.parquet",
                   row_group_size=1_000_000)
    with _pipeline() as p:
        read = p | ReadParquetBatches(_input(tmp_path / "*.parquet"), 1024)
        sizes = read.tables | beam.Map(lambda t: t.num_rows)
        assert_that(sizes | "Max" >> beam.combiners.Top.Largest(1), equal_to([[1024]]), label="max")
        assert_that(sizes | "Sum" >> beam.CombineGlobally(sum), equal_to([5000]), label="sum")


def test_every_row_is_read_once_across_files_and_row_groups(tmp_path):
    write_dataset(tmp_path, 2500, files=3, row_group_size=300)
    with _pipeline() as p:
        read = p | ReadParquetBatches(_input(tmp_path), 128)
        ids = read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist())
        assert_that(ids, equal_to(list(range(2500))))


def test_schemas_are_unified_across_files(tmp_path):
    # an extra column in the alphabetically first file, another in a later one: neither file
    # rules the schema; every row is read, with nulls where a file lacks a column
    x = np.ones((3, 2), np.float32)
    pq.write_table(features_table(np.arange(3), x).append_column("extra", pa.array([1, 2, 3])),
                   tmp_path / "a.parquet")
    pq.write_table(features_table(np.arange(3, 6), x).append_column("late", pa.array(["p", "q", "r"])),
                   tmp_path / "b.parquet")
    source = _input(tmp_path)
    assert source.schema.names == ["id", "features", "note", "extra", "late"] and not source.conflicts
    with _pipeline() as p:
        read = p | ReadParquetBatches(source, 64)
        rows = read.tables | beam.FlatMap(lambda t: zip(*[t.column(c).to_pylist()
                                                          for c in ("id", "extra", "late")]))
        assert_that(rows, equal_to([(0, 1, None), (1, 2, None), (2, 3, None),
                                    (3, None, "p"), (4, None, "q"), (5, None, "r")]), label="rows")
        assert_that(read.dead_letter, equal_to([]), label="no dead letter")


def test_a_file_whose_column_cannot_be_cast_is_dead_lettered_by_name(tmp_path):
    write_dataset(tmp_path, 100, files=2)
    pq.write_table(pa.table({"id": [1000, 1001], "features": ["a", "b"]}), tmp_path / "odd.parquet")
    source = _input(tmp_path)
    (path, why), = source.conflicts.items()
    assert path.endswith("odd.parquet") and "odd.parquet" in why and "'features'" in why
    with _pipeline() as p:
        read = p | ReadParquetBatches(source, 64)
        n_ok = read.tables | "ok" >> beam.Map(lambda t: t.num_rows) | "s1" >> beam.CombineGlobally(sum)
        bad = read.dead_letter | beam.Map(lambda d: (d.rows.column("id").to_pylist(), d.stage,
                                                     "odd.parquet" in d.reasons))
        assert_that(n_ok, equal_to([100]), label="ok")
        assert_that(bad, equal_to([([1000, 1001], "read", True)]), label="bad")


def test_unreadable_files_are_named_at_launch_one_line_each(tmp_path):
    write_dataset(tmp_path, 100, files=1)
    good = (tmp_path / "part-0.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.parquet").write_bytes(b"id,features\n1,2\n")
    with pytest.raises(ValueError) as e:
        _input(tmp_path)
    lines = str(e.value).splitlines()
    assert "cannot read 2 of 3 input file(s)" in lines[0]
    assert len(lines) == 3 and "text.parquet" in lines[1] and "truncated.parquet" in lines[2]


def test_the_input_listing_leaves_out_the_output_directory(tmp_path):
    write_dataset(tmp_path / "in", 10, files=1)
    write_dataset(tmp_path / "in" / "out" / "labels", 10, files=1)
    pattern = str(tmp_path / "in" / "**.parquet")  # Beam's recursive glob
    assert len(match_files(pattern)) == 2
    assert match_files(pattern, exclude_under=str(tmp_path / "in" / "out")) == [
        str(tmp_path / "in" / "part-0.parquet")]
    with pytest.raises(ValueError, match="no non-empty file matches"):
        match_files(str(tmp_path / "in" / "**" / "*.parquet"), exclude_under=str(tmp_path / "in"))


def test_input_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="no non-empty file matches"):
        match_files(str(tmp_path / "missing" / "*.parquet"))
    os.makedirs(tmp_path / "d")
    assert input_pattern(str(tmp_path / "d")).endswith(os.path.join("d", "*.parquet"))


def test_rows_to_skip_are_left_out_across_batches_and_row_groups(tmp_path):
    write_dataset(tmp_path, 1000, files=2, row_group_size=130)  # part-0: ids 0-499, part-1: 500-999
    source = _input(tmp_path)
    part0, part1 = source.files
    skip = {part0: ((0, 5), (120, 270), (499, 500)), part1: ((10, 11),)}
    source = dataclasses.replace(source, skip=skip)
    expected = sorted(set(range(1000)) - set(range(5)) - set(range(120, 270)) - {499} - {510})
    with _pipeline() as p:
        read = p | ReadParquetBatches(source, 64)
        assert_that(read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist()),
                    equal_to(expected))


def test_globs_match_as_beams_do_and_escaped_names_literally(tmp_path):
    """storage.match (what match_files lists with) agrees with Beam's FileSystems.match on
    ordinary globs, and takes glob_escape'd names as themselves."""
    from apache_beam.io.filesystems import FileSystems

    from titans.transforms.io import storage

    for rel in ("a/x1.parquet", "a/x2.parquet", "a/y.parquet", "a/b/x3.parquet",
                "a/b/c/x4.parquet", "ab/x5.parquet", "a/.hidden.parquet", "a/x[1].parquet"):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"PAR1")
    for glob in ("a/*.parquet", "a/**/*.parquet", "a/**", "a*/x?.parquet", "a/x[12].parquet",
                 "a/x[!1].parquet", "**/x*.parquet", "a/b/*", "a/x1.parquet", "a/nothing*"):
        pattern = str(tmp_path / glob)
        beam = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        assert [p for p, _ in storage.match(pattern)] == beam, glob
    weird = str(tmp_path / "a" / "x[1].parquet")
    assert storage.match(storage.glob_escape(weird)) == [(weird, 4)]
    assert [p for p, _ in storage.match(storage.glob_escape(str(tmp_path / "a")) + "/x[[]*")] \
        == [weird]


def test_many_small_files_reach_the_models_as_full_batches(tmp_path):
    """Issue 19.1: 40 files of 25 rows (and row groups of 10) are read in groups of about
    ``batch_size`` rows and merged: 8 tables of 125 rows, not 120 tables of 10 or less."""
    write_dataset(tmp_path, 1000, files=40, row_group_size=10)
    with _pipeline() as p:
        read = p | ReadParquetBatches(_input(tmp_path), 128)
        ids = read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist())
        assert_that(ids, equal_to(list(range(1000))), label="every row once")
        sizes = read.tables | beam.Map(lambda t: t.num_rows)
        assert_that(sizes | beam.combiners.ToList(), equal_to([[125] * 8]), label="sizes")
        chunks = read.tables | beam.Map(lambda t: t.column("features").num_chunks)
        assert_that(chunks | "Most" >> beam.combiners.Top.Largest(1), equal_to([[1]]),
                    label="one contiguous array per column")


def test_a_file_broken_after_launch_is_dead_lettered_on_the_worker(tmp_path):
    """The launch read every footer; a file truncated before the job opens it costs its rows
    (as many as its footer said at launch) to the dead letter, with the file and the reason,
    and the other files of its read group are still read."""
    write_dataset(tmp_path, 300, files=3, row_group_size=50)
    source = _input(tmp_path)
    broken = source.files[1]
    data = open(broken, "rb").read()
    open(broken, "wb").write(data[: len(data) // 2])
    with _pipeline() as p:
        read = p | ReadParquetBatches(source, 1000)  # one read group for all three files
        ids = read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist())
        assert_that(ids, equal_to(list(range(100)) + list(range(200, 300))), label="rows")
        dead = read.dead_letter | beam.Map(lambda d: (d.rows.num_rows, d.stage,
                                                      "part-1.parquet: cannot open" in d.reasons,
                                                      set(d.rows.column("file").to_pylist())))
        assert_that(dead, equal_to([(100, "read", True, {broken})]), label="dead")


def test_the_readers_take_each_files_key_before_reading_it(tmp_path):
    """With file_keys, every file of every read group gets its content key on ``keys``; a big
    file read in several groups gets one per group."""
    write_dataset(tmp_path, 400, files=2, row_group_size=100)
    source = _input(tmp_path)
    asked = lambda paths: {p: {"size": os.path.getsize(p)} for p in paths}  # noqa: E731
    with _pipeline() as p:
        read = p | ReadParquetBatches(source, 128, file_keys=asked)
        paths = read.keys | beam.Map(lambda kv: kv[0])
        # 200 rows a file in 100-row groups: one read group per row group
        assert_that(paths, equal_to([source.files[0]] * 2 + [source.files[1]] * 2))
