"""TFRecord headers that lie: a length with a valid CRC that runs past the end of the file or
over the record-size cap (--max-record-bytes) is damage, dead-lettered with the byte range it
skips, and the records after it are read (whole files, byte-range units, GZIP). A GZIP
"bomb" (a huge declared length over a long run of zeros) is read in bounded memory. Files
are framed by tests/example_wire.py, independent of the code under test."""
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

import example_wire as wire
from conftest import DIM, RUNNER
from titans.transforms.io.tfrecord_framing import RecordBatch, Unit, iter_unit
from titans.transforms.io.tfrecord import ReadTFRecordBatches

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _record(i: int, pad: int = 0) -> bytes:
    return wire.example({"id": ("int64", [i]), "features": ("float", [float(i)] * DIM),
                         "note": ("bytes", [b"x" * pad])})


def _record_of_size(i: int, size: int) -> bytes:
    pad = size - len(_record(i))
    while len(_record(i, pad)) > size:
        pad -= 1
    return _record(i, pad)


def _lying_header(length: int) -> bytes:
    """12 bytes of TFRecord header: ``length`` and its valid masked CRC, with no record."""
    raw = struct.pack("<Q", length)
    return raw + struct.pack("<I", wire.masked_crc(raw))


def _write_with_lie(path, before: int, after: int, length: int = 1 << 62, compress=False):
    """``before`` good records, a lying header, ``after`` good records; (byte offset of the
    lie, offsets of the good records) in the uncompressed bytes."""
    good = [wire.frame(_record(i)) for i in range(before + after)]
    parts = good[:before] + [_lying_header(length)] + good[before:]
    offsets, at = [], 0
    for part in parts:
        offsets.append(at)
        at += len(part)
    blob = b"".join(parts)
    with open(path, "wb") as f:
        f.write(gzip.compress(blob) if compress else blob)
    lie = offsets[before]
    return lie, offsets[:before] + offsets[before + 1:]


def _items(unit, **kw):
    good, dead = [], []
    for item in iter_unit(unit, 37, chunk=kw.pop("chunk", 3000), **kw):
        if isinstance(item, RecordBatch):
            good.extend(zip(item.offsets.tolist(), item.records))
        else:
            dead.append((item.rows.column("offset")[0].as_py(), item.reasons))
    return good, dead


@pytest.mark.parametrize("compress", [False, True])
def test_a_lying_header_is_dead_lettered_with_its_span_and_the_records_after_it_are_read(
        tmp_path, compress):
    path = tmp_path / ("lie.tfrecord" + (".gz" if compress else ""))
    lie, offsets = _write_with_lie(path, 20, 180, compress=compress)
    good, dead = _items(Unit(str(path), 0, None, compress))
    assert [o for o, _ in good] == offsets
    assert [r for _, r in good] == [_record(i) for i in range(200)]
    [(at, reason)] = dead
    assert at == lie
    assert re.search(rf"record #20 \(byte {lie}\) declares a length of {1 << 62} bytes, over "
                     rf"the record-size cap of 64 MiB \(--max-record-bytes\); bytes "
                     rf"{lie}-{lie + 12} .*were skipped, reading on", reason), reason


def test_a_length_past_the_end_of_the_file_is_damage_too(tmp_path):
    # under the cap, valid CRC, but longer than what is left of the file
    path = tmp_path / "lie.tfrecord"
    lie, offsets = _write_with_lie(path, 20, 180, length=1 << 20)
    good, dead = _items(Unit(str(path), 0, None, False))
    assert [o for o, _ in good] == offsets
    [(at, reason)] = dead
    assert at == lie and f"bytes {lie}-{lie + 12} " in reason and "past the end" in reason
    # a file truly cut inside its last record is still reported as truncated
    data = path.read_bytes()
    (tmp_path / "cut.tfrecord").write_bytes(data[:offsets[-1] + 30])
    good, dead = _items(Unit(str(tmp_path / "cut.tfrecord"), 0, None, False))
    assert len(good) == 199 and len(dead) == 2
    assert "truncated" in dead[1][1] and dead[1][0] == offsets[-1]


def test_a_lying_header_inside_byte_range_units(tmp_path):
    path = tmp_path / "lie.tfrecord"
    lie, offsets = _write_with_lie(path, 20, 180)
    size = os.path.getsize(path)
    whole_good, whole_dead = _items(Unit(str(path), 0, None, False))
    assert len(whole_good) == 200 and len(whole_dead) == 1
    cuts = [[b] for b in (lie - 5, lie, lie + 1, lie + 6, lie + 12, lie + 13)]
    cuts += [[lie - 700, lie + 3, lie + 700], list(range(997, size, 997))]
    for bounds in cuts:
        edges = [0, *bounds, None]
        units = [Unit(str(path), s, e, False) for s, e in zip(edges[:-1], edges[1:])]
        items = [_items(u) for u in units]
        good = sorted(g for got, _ in items for g in got)
        dead = sorted(d for _, lost in items for d in lost)
        assert good == whole_good, bounds
        assert [o for o, _ in dead] == [lie], bounds
        assert f"bytes {lie}-{lie + 12} " in dead[0][1], bounds
    with test_pipeline.TestPipeline(options=PipelineOptions(RUNNER)) as p:  # units on workers
        read = p | ReadTFRecordBatches(str(path), 50, _schema(), split_bytes=997)
        assert_that(read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist()),
                    equal_to(list(range(200))), label="ids")
        assert_that(read.dead_letter | beam.Map(lambda d: d.rows.column("offset").to_pylist()),
                    equal_to([[lie]]), label="dead")


def test_a_record_at_the_cap_is_read_one_byte_over_is_dead_lettered(tmp_path):
    cap = 4096
    at_cap, over = _record_of_size(1, cap), _record_of_size(2, cap + 1)
    assert (len(at_cap), len(over)) == (cap, cap + 1)
    records = [_record(0), at_cap, over, _record(3)]
    offsets = wire.write_tfrecord(tmp_path / "a.tfrecord", records)
    good, dead = _items(Unit(str(tmp_path / "a.tfrecord"), 0, None, False), max_record_bytes=cap)
    assert good == [(offsets[k], records[k]) for k in (0, 1, 3)]
    [(at, reason)] = dead
    assert at == offsets[2] and f"over the record-size cap of {cap} bytes" in reason
    assert f"bytes {offsets[2]}-{offsets[3]} " in reason
    with test_pipeline.TestPipeline(options=PipelineOptions(RUNNER)) as p:
        read = p | ReadTFRecordBatches(str(tmp_path / "a.tfrecord"), 10, _schema(),
                                       max_record_bytes=cap)
        assert_that(read.tables | beam.FlatMap(lambda t: t.column("id").to_pylist()),
                    equal_to([0, 1, 3]), label="ids")
        assert_that(read.dead_letter | beam.Map(lambda d: d.rows.column("offset").to_pylist()),
                    equal_to([[offsets[2]]]), label="dead")


def _schema():
    import pyarrow as pa

    return pa.schema([pa.field("id", pa.int64(), nullable=False),
                      pa.field("features", pa.list_(pa.float32(), DIM), nullable=False),
                      pa.field("note", pa.binary(), nullable=False)])


# the reader's own high-water mark: VmHWM starts afresh at exec, while ru_maxrss keeps the
# forking parent's (a pytest process of ~1 GB late in the suite)
BOMB_READER = textwrap.dedent("""
    import json, sys
    def peak_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    from titans.transforms.io.tfrecord_framing import RecordBatch, Unit, iter_unit
    good, dead = [], []
    for item in iter_unit(Unit(sys.argv[1], 0, None, True), 65536):
        if isinstance(item, RecordBatch):
            good.extend(item.offsets.tolist())
        else:
            dead.append([item.rows.column("offset")[0].as_py(), item.reasons,
                         len(item.rows.column("record")[0].as_py())])
    print(json.dumps({"good": len(good), "dead": dead,
                      "peak_mb": peak_kib() / 1024}))
""")


def test_a_gzip_bomb_is_dead_lettered_in_bounded_memory(tmp_path):
    # 10 records, then a header declaring 16 GiB over 1 GiB of zeros: about 1 MB on disk
    path = tmp_path / "bomb.tfrecord.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        for i in range(10):
            f.write(wire.frame(_record(i)))
        lie = f.tell()
        f.write(_lying_header(16 << 30))
        zeros = bytes(4 << 20)
        for _ in range(256):
            f.write(zeros)
        end = f.tell()
    assert os.path.getsize(path) < 8 << 20
    done = subprocess.run([sys.executable, "-c", BOMB_READER, str(path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["peak_mb"] < 600, got["peak_mb"]
    assert got["good"] == 10
    [(at, reason, kept)] = got["dead"]
    assert at == lie and kept <= 64 << 10
    assert f"declares a length of {16 << 30} bytes, over the record-size cap of 64 MiB" in reason
    assert f"bytes {lie}-{end} " in reason


def test_titans_run_labels_every_good_record_around_a_lying_header(tmp_path, models):
    from titans.models.loading import ModelRef
    from titans.pipeline.job import run_cascade
    from titans.pipeline.plan import RunConfig, plan_run

    os.makedirs(tmp_path / "data")
    lie, _ = _write_with_lie(tmp_path / "data" / "part-0.tfrecord", 20, 180)
    config = RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                       student=ModelRef(models[0]), teacher=ModelRef(models[1]),
                       batch_size=64, threshold=0.6, max_record_bytes=1 << 20)
    report = run_cascade(plan_run(config), RUNNER)
    assert report["status"] == "complete" and report["conservation_ok"]
    assert (report["rows_in"], report["rows_dead_letter"]) == (201, 1)
    labels = pq.read_table(tmp_path / "out" / "labels")
    assert sorted(labels.column("id").to_pylist()) == list(range(200))
    dead = pq.read_table(tmp_path / "out" / "dead_letter").to_pylist()
    assert len(dead) == 1 and f"bytes {lie}-{lie + 12} " in json.dumps(dead[0])
    assert "--max-record-bytes" in json.dumps(dead[0]) and "1 MiB" in json.dumps(dead[0])


def test_max_record_bytes_flag_reaches_the_job_config_with_a_documented_default(capsys):
    from titans.pipeline import defaults
    from titans.pipeline.cli.main import job_config, main, parse
    from titans.transforms.io import tfrecord_framing

    assert defaults.MAX_RECORD_BYTES == tfrecord_framing.MAX_RECORD_BYTES == 64 << 20
    base = ["--input", "i", "--output", "o", "--teacher", "t"]
    assert job_config(parse(["run", *base, "--student", "s"])[0]).max_record_bytes == 64 << 20
    for text, value in (("1MiB", 1 << 20), ("4096", 4096), ("2G", 2 << 30)):
        config = job_config(parse(["teacher-label", *base, "--max-record-bytes", text])[0])
        assert config.max_record_bytes == value
    with pytest.raises(SystemExit):
        parse(["run", *base, "--student", "s", "--max-record-bytes", "0"])
    assert "must be at least 1 byte" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["teacher-label", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-record-bytes SIZE" in text and "(default: 67108864, 64 MiB)" in text
