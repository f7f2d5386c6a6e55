import io
import os
import random
import re

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.io.tfrecordio import ReadFromTFRecord, WriteToTFRecord, _TFRecordUtil
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

import example_wire as wire
from conftest import RUNNER
from titans.transforms.io.example_codec import encode_examples
from titans.transforms.io.parquet import match_files
from titans.transforms.io.tfrecord_framing import RecordBatch, Unit, iter_unit
from titans.transforms.io.tfrecord import (
    ReadTFRecordBatches, WriteTFRecordBatches, frame_records, is_gzip, needs_record_spread,
    sample_records, split_file, tfrecord_pattern)

SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False),
                    pa.field("vec", pa.list_(pa.float32(), 3), nullable=False),
                    pa.field("tokens", pa.list_(pa.int64()), nullable=False),
                    pa.field("name", pa.binary(), nullable=False)])


def _pipeline():
    return test_pipeline.TestPipeline(options=PipelineOptions(RUNNER))


def _record(i: int) -> bytes:
    return wire.example({"id": ("int64", [i]), "vec": ("float", [i, -0.5, 2.0 ** -i]),
                         "tokens": ("int64", list(range(-1, i % 5))), "name": ("bytes", [b"r%d" % i])})


def _row(i: int) -> dict:
    return {"id": i, "vec": [float(i), -0.5, float(np.float32(2.0 ** -i))],
            "tokens": list(range(-1, i % 5)), "name": b"r%d" % i}


def _rows(read):
    return read.tables | beam.FlatMap(lambda t: t.to_pylist())


def test_hand_framed_files_read_with_exact_values_gzip_too(tmp_path):
    wire.write_tfrecord(tmp_path / "a.tfrecord", [_record(i) for i in range(0, 250)])
    wire.write_tfrecord(tmp_path / "b.tfrecord.gz", [_record(i) for i in range(250, 400)], compress=True)
    # gzip without the .gz name is recognised by its content
    wire.write_tfrecord(tmp_path / "c.tfr", [_record(i) for i in range(400, 450)], compress=True)
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(tfrecord_pattern(str(tmp_path)), 64, SCHEMA)
        assert_that(_rows(read), equal_to([_row(i) for i in range(450)]), label="rows")
        sizes = read.tables | beam.Map(lambda t: t.num_rows)
        assert_that(sizes | beam.combiners.Top.Largest(1), equal_to([[64]]), label="bounded")
        assert_that(read.dead_letter, equal_to([]), label="no dead letter")


def test_damage_is_named_and_every_record_is_counted(tmp_path):
    records = [_record(i) for i in range(300)]
    offsets = wire.write_tfrecord(tmp_path / "bad.tfrecord", records)
    data = bytearray((tmp_path / "bad.tfrecord").read_bytes())
    data[offsets[10] + 12 + 5] ^= 0x01       # record 10: its data no longer matches its CRC
    data[offsets[100] + 3] ^= 0x01           # record 100: its length no longer matches its CRC
    (tmp_path / "bad.tfrecord").write_bytes(bytes(data[:offsets[299] + 30]))  # 299 cut short
    undecodable = wire.example({"id": ("float", [1.0])})
    wire.write_tfrecord(tmp_path / "odd.tfrecord", [_record(1000), undecodable])
    wire.write_tfrecord(tmp_path / "cut.tfrecord.gz", [_record(i) for i in range(2000, 2400)],
                        compress=True)
    gz = (tmp_path / "cut.tfrecord.gz").read_bytes()
    (tmp_path / "cut.tfrecord.gz").write_bytes(gz[:len(gz) // 2])
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(str(tmp_path / "*"), 50, SCHEMA)
        ids = read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist())
        dead = read.dead_letter | beam.FlatMap(
            lambda d: [(r, d.rows.column("path")[0].as_py().rsplit("/", 1)[1],
                        d.rows.column("offset")[0].as_py())
                       for r in ([d.reasons] if isinstance(d.reasons, str) else d.reasons)])
        def check_dead(items):
            reasons = sorted(items)
            assert len(reasons) == 5, reasons
            by_file = {(f, o): r for r, f, o in reasons}
            assert re.search(rf"bad.tfrecord: record #10 \(byte {offsets[10]}\) fails its data CRC",
                             by_file["bad.tfrecord", offsets[10]])
            assert re.search(rf"record #100 \(byte {offsets[100]}\) has a bad length CRC; bytes "
                             rf"{offsets[100]}-{offsets[101]} are not TFRecord framing",
                             by_file["bad.tfrecord", offsets[100]])
            assert re.search(rf"truncated: the record at byte {offsets[299]} needs \d+ bytes but the "
                             r"file ends after 30", by_file["bad.tfrecord", offsets[299]])
            assert by_file["odd.tfrecord", len(wire.frame(_record(1000)))] == (
                "feature 'id' is float_list, expected int64_list; feature 'vec' is missing; "
                "feature 'tokens' is missing; feature 'name' is missing")
            gz_reason = [r for r, f, _ in reasons if f == "cut.tfrecord.gz"][0]
            assert "cut.tfrecord.gz: " in gz_reason and "GZIP stream breaks off" in gz_reason

        assert_that(dead, check_dead, label="reasons")

        def check_ids(got):
            # everything before (and after) the damage is kept; the damaged records are the
            # three dead letters of bad.tfrecord, so 297 + 3 = 300 records written there, and
            # odd.tfrecord's 1 + 1 = 2; the GZIP file keeps the records before its break
            got = sorted(got)
            assert got[:298] == [i for i in range(300) if i not in (10, 100, 299)] + [1000]
            kept = got[298:]
            assert 0 < len(kept) < 400 and kept == list(range(2000, 2000 + len(kept)))

        assert_that(ids, check_ids, label="kept")


def test_every_record_once_across_byte_ranges_even_with_damage(tmp_path):
    rng = random.Random(5)
    records = [_record(i) for i in range(600)]
    path = tmp_path / "big.tfrecord"
    offsets = wire.write_tfrecord(path, records)
    data = bytearray(path.read_bytes())
    for k in rng.sample(range(1, 599), 12):  # flip a bit in the length or the data
        data[offsets[k] + rng.choice([0, 1, 12, 20])] ^= 0x04
    path.write_bytes(bytes(data))
    good_whole, dead_whole = _read_unit_items(Unit(str(path), 0, None, False))
    for split in (997, 4096, 20000):
        units = split_file(str(path), len(data), split)
        assert len(units) > 1
        items = [_read_unit_items(u) for u in units]
        assert sorted(g for good, _ in items for g in good) == good_whole, split
        assert sorted(d for _, dead in items for d in dead)[0][0] == dead_whole[0][0]
        assert sorted(o for _, dead in items for o, _ in dead) == [o for o, _ in dead_whole]
    # the damaged records are exactly the ones not read back, and the rest are intact
    assert len(good_whole) + len(dead_whole) == 600
    assert all(r == records[offsets.index(o)] for o, r in good_whole)


def _read_unit_items(unit):
    good, dead = [], []
    for item in iter_unit(unit, 37, chunk=3000):
        if isinstance(item, RecordBatch):
            good.extend(zip(item.offsets.tolist(), item.records))
        else:
            dead.append((item.rows.column("offset")[0].as_py(), item.reasons))
    return good, dead


def test_one_big_file_spreads_over_byte_ranges_in_a_pipeline(tmp_path):
    wire.write_tfrecord(tmp_path / "big.tfrecord", [_record(i) for i in range(500)])
    size = os.path.getsize(tmp_path / "big.tfrecord")
    assert len(split_file(str(tmp_path / "big.tfrecord"), size, 5000)) > 5
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(str(tmp_path / "big.tfrecord"), 64, SCHEMA, split_bytes=5000)
        assert_that(_rows(read), equal_to([_row(i) for i in range(500)]))


def test_spread_records_mode_reads_the_same_rows(tmp_path):
    wire.write_tfrecord(tmp_path / "a.tfrecord.gz", [_record(i) for i in range(300)], compress=True)
    wire.write_tfrecord(tmp_path / "b.tfrecord", [_record(i) for i in range(300, 320)]
                        + [b"\x01\x02"])
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(str(tmp_path / "*"), 50, SCHEMA, spread_records=True)
        assert_that(_rows(read), equal_to([_row(i) for i in range(320)]), label="rows")
        assert_that(read.dead_letter | beam.Map(lambda d: d.rows.num_rows), equal_to([1]),
                    label="dead")


def test_titans_output_round_trips_through_the_sink(tmp_path):
    n = 1000
    rng = np.random.default_rng(0)
    table = pa.table({
        "id": pa.array(np.arange(n), pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 4).astype(np.float32)), 4),
        "note": pa.array([f"row {i}" if i % 7 else None for i in range(n)]),
        "label": pa.array(rng.integers(0, 10, n), pa.int64()),
        "confidence": pa.array(rng.random(n).astype(np.float32)),
        "deferral_score": pa.array(rng.random(n).astype(np.float32)),
        "source": pa.array(np.where(rng.random(n) < 0.2, "teacher", "student")),
    })
    batches = [table.slice(i, 128) for i in range(0, n, 128)]
    out = tmp_path / "out"
    with _pipeline() as p:
        _ = p | beam.Create(batches).with_output_types(pa.Table) | WriteTFRecordBatches(
            str(out), table.schema, prefix="labels", finalize=True)
    files = sorted(os.listdir(out))
    assert files and all(re.fullmatch(r"labels-\d{5}-of-\d{5}\.tfrecord", f) for f in files)
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(str(out), 100, table.schema)
        assert_that(read.tables | beam.FlatMap(lambda t: t.to_pylist()), equal_to(table.to_pylist()))


def test_framing_matches_beams_tfrecord_both_ways(tmp_path):
    records = [_record(i) for i in range(100)]
    buf = io.BytesIO()
    for r in records:
        _TFRecordUtil.write_record(buf, r)
    assert bytes(frame_records(pa.array(records, pa.binary()))) == buf.getvalue()
    with _pipeline() as p:  # Beam writes, we read
        _ = p | beam.Create(records) | WriteToTFRecord(str(tmp_path / "beam"), file_name_suffix=".tfrecord")
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(str(tmp_path / "beam*"), 30, SCHEMA)
        assert_that(_rows(read), equal_to([_row(i) for i in range(100)]))
    table = pa.Table.from_pylist([_row(i) for i in range(100)], schema=SCHEMA)
    with _pipeline() as p:  # we write, Beam reads
        _ = p | beam.Create([table]).with_output_types(pa.Table) | WriteTFRecordBatches(
            str(tmp_path / "ours"), SCHEMA, finalize=True)
    with _pipeline() as p:
        got = p | ReadFromTFRecord(str(tmp_path / "ours" / "*.tfrecord"))
        assert_that(got | beam.Map(len), equal_to([len(r) for r in encode_examples(table)]))


def test_files_patterns_and_samples(tmp_path):
    wire.write_tfrecord(tmp_path / "a.tfrecord", [_record(i) for i in range(100)])
    wire.write_tfrecord(tmp_path / "b.tfrecords.gz", [_record(i) for i in range(100, 200)], compress=True)
    (tmp_path / "notes.txt").write_text("not a record")
    files = match_files(tfrecord_pattern(str(tmp_path)))
    assert [os.path.basename(f) for f in files] == ["a.tfrecord", "b.tfrecords.gz"]
    assert [is_gzip(f) for f in files] == [False, True]
    sizes = [(f, os.path.getsize(f)) for f in files]
    assert needs_record_spread(sizes, split_bytes=100) and not needs_record_spread(sizes[:1], 100)
    sample = sample_records(files, 50, seed=1)
    assert len(sample) == 50 and set(sample) <= {_record(i) for i in range(200)}
    assert tfrecord_pattern(str(tmp_path / "x*.tfrecord")) == str(tmp_path / "x*.tfrecord")
    with pytest.raises(ValueError, match="cannot be a tf.train.Feature"):
        ReadTFRecordBatches("x", 10, pa.schema([("s", pa.struct([("a", pa.int64())]))]))


def test_gcs_paths_split_gzip_and_sink(tmp_path, gcs_bucket):
    # through Beam's GCS filesystem, on a local GCS API: byte ranges (seek), GZIP, the sink
    import uuid

    from conftest import upload

    local = tmp_path / "in"
    local.mkdir()
    wire.write_tfrecord(local / "a.tfrecord", [_record(i) for i in range(200)])
    wire.write_tfrecord(local / "b.tfrecord.gz", [_record(i) for i in range(200, 260)], compress=True)
    url = upload(local, f"{gcs_bucket}/tfr-{uuid.uuid4().hex}/in")
    out = url.rsplit("/", 1)[0] + "/out"
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(url + "/", 64, SCHEMA, split_bytes=3000)
        assert_that(_rows(read), equal_to([_row(i) for i in range(260)]), label="rows")
        _ = read.tables | WriteTFRecordBatches(out, SCHEMA, finalize=True)
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(out + "/*.tfrecord", 1000, SCHEMA)
        assert_that(_rows(read), equal_to([_row(i) for i in range(260)]))


def test_separate_worker_processes_read_every_record_once(tmp_path):
    # the DoFns and units pickle, and byte ranges of one file go to different workers
    wire.write_tfrecord(tmp_path / "a.tfrecord", [_record(i) for i in range(400)])
    options = PipelineOptions(RUNNER + ["--direct_running_mode", "multi_processing",
                                        "--direct_num_workers", "2"])
    here = os.getpid()
    with beam.Pipeline(options=options) as p:
        read = p | ReadTFRecordBatches([str(tmp_path / "a.tfrecord")], 50, SCHEMA, split_bytes=4000)
        assert_that(read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist()),
                    equal_to(list(range(400))), label="ids")
        pids = read.tables | beam.Map(lambda t: os.getpid() != here) | beam.Distinct()
        assert_that(pids, equal_to([True]), label="elsewhere")


def test_small_files_are_merged_into_full_batches(tmp_path):
    """30 files of 20 records, listed at launch (the graph carries them compressed): every
    record once, and the tables of a bundle merged, not one 20-row table per file."""
    files = []
    for f in range(30):
        files.append(str(tmp_path / f"part-{f:02d}.tfrecord"))
        wire.write_tfrecord(files[-1], [_record(i) for i in range(f * 20, f * 20 + 20)])
    keys = lambda paths: {p: {"size": os.path.getsize(p)} for p in paths}  # noqa: E731
    with _pipeline() as p:
        read = p | ReadTFRecordBatches(files, 256, SCHEMA, file_keys=keys)
        ids = read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist())
        assert_that(ids, equal_to(list(range(600))), label="every record once")
        sizes = read.tables | beam.Map(lambda t: t.num_rows) | beam.combiners.ToList()
        assert_that(sizes, lambda s: _check(len(s[0]) < 30 and max(s[0]) == 256, s),
                    label="merged")
        assert_that(read.keys | beam.Map(lambda kv: kv[0]), equal_to(files), label="keys")


def _check(ok: bool, seen):
    assert ok, seen
