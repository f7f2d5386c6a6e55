"""titans on a real distributed engine: Beam's Dask runner on a 2-worker
``distributed.LocalCluster`` (separate worker processes over TCP, reached the way a Dask
cluster of many machines is, with ``--dask_client_address``). The labels must be those of
the default runner, every id exactly once, and both workers must have run tasks.

Beam 2.77's own DaskRunner mixes a ParDo's tagged outputs and drops finish_bundle's
outputs; titans swaps in ``pipeline/dask_runner.py`` (docs/runners.md). The first test runs
the three defects on a minimal pipeline, against Beam's runner and titans'."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.dask.dask_runner import DaskRunner as BeamDaskRunner
from apache_beam.transforms.window import GlobalWindows
from distributed import Client, LocalCluster

from conftest import RUNNER, save_models, write_dataset
from test_cascade import _bad_rows_file
from titans.pipeline.cli.main import main
from titans.pipeline.dask_runner import DaskRunner
from titans.pipeline.options import DASK_RUNNER, pipeline_options

TITANS = os.path.join(os.path.dirname(sys.executable), "titans")
# as a new user names it; two bundles of the input, so that both workers get some
DASK = ["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner", "--dask_npartitions", "2"]


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and 2 single-threaded worker processes; (address, client)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c.scheduler_address) as client:
        yield c.scheduler_address, client


def _executed(client: Client) -> dict:
    return client.run(lambda dask_worker: dask_worker.state.executed_count)


# ------------------------------------------------------------------ the runner's translation

class _Split(beam.DoFn):
    def process(self, x):
        yield beam.pvalue.TaggedOutput("odd" if x % 2 else "even", x)


class _CountAtEnd(beam.DoFn):
    """Emits only from finish_bundle, as BatchElements' last batch and titans' writers do."""

    def start_bundle(self):
        self.n = 0

    def process(self, x):
        self.n += 1

    def finish_bundle(self):
        yield GlobalWindows.windowed_value(self.n)


def _probe(runner, address: str, calls_dir) -> dict:
    """Three side inputs of one upstream step: (its outputs per tag, finish_bundle's, how
    many times the upstream step ran per element)."""
    def upstream(x):
        with open(os.path.join(calls_dir, f"{x}-{uuid.uuid4().hex}"), "w"):
            pass
        return x

    def collect(_, odd, even, ends, spread):
        with open(os.path.join(calls_dir, "result.json"), "w") as f:
            json.dump({"odd": sorted(odd), "even": sorted(even), "ends": sorted(ends),
                       "spread": sorted(spread)}, f)

    p = beam.Pipeline(runner=runner, options=PipelineOptions(
        ["--dask_client_address", address, "--dask_npartitions", "2"]))
    nums = p | beam.Create(range(10)) | "Upstream" >> beam.Map(upstream)
    parts = nums | beam.ParDo(_Split()).with_outputs("odd", "even")
    ends = nums | beam.ParDo(_CountAtEnd())  # per bundle: Create made 2
    spread = (p | "OneElement" >> beam.Create([list(range(10))]) | beam.FlatMap(lambda x: x)
              | beam.Reshuffle() | "CountSpread" >> beam.ParDo(_CountAtEnd()))
    _ = (p | "Once" >> beam.Create([None]) | beam.Map(
        collect, beam.pvalue.AsList(parts.odd), beam.pvalue.AsList(parts.even),
        beam.pvalue.AsList(ends), beam.pvalue.AsList(spread)))
    result = p.run()
    result.wait_until_finish()
    result.client.close()  # the runner's own client, before the cluster goes
    with open(os.path.join(calls_dir, "result.json")) as f:
        result = json.load(f)
    result["upstream_runs"] = len(os.listdir(calls_dir)) - 1
    return result


def test_beam_dask_runner_defects_and_titans_fix(cluster, tmp_path):
    address, _ = cluster
    beam_dir, titans_dir = tmp_path / "beam", tmp_path / "titans"
    beam_dir.mkdir(), titans_dir.mkdir()
    broken = _probe(BeamDaskRunner(), address, str(beam_dir))
    # Beam 2.77: each tagged output holds every tag's elements, finish_bundle's outputs are
    # lost (no bundle counts at all), and the upstream step runs once per side input (if
    # this fails, Beam fixed some: see docs/runners.md). titans' runner also spreads a
    # Reshuffle's one bundle over --dask_npartitions (Beam's Reshuffle is a no-op).
    assert broken["odd"] == broken["even"] == list(range(10))
    assert broken["ends"] == broken["spread"] == [] and broken["upstream_runs"] == 30
    fixed = _probe(DaskRunner(), address, str(titans_dir))
    assert fixed == {"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6, 8], "ends": [5, 5],
                     "spread": [5, 5], "upstream_runs": 10}


def test_only_a_dask_runner_is_swapped():
    for name in ("DaskRunner", "Dask", "apache_beam.runners.dask.dask_runner.DaskRunner"):
        assert pipeline_options(["--runner", name]).view_as(StandardOptions).runner == DASK_RUNNER
    for args, runner in (([], "FnApiRunner"), (["--runner", "DirectRunner"], "DirectRunner"),
                         (["--runner", "FnApiRunner"], "FnApiRunner")):
        assert pipeline_options(args).view_as(StandardOptions).runner == runner
    # the default runners' jobs never import dask
    code = ("import sys\nfrom titans.pipeline.options import pipeline_options\n"
            "pipeline_options(['--runner', 'FnApiRunner'])\nprint('dask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# ------------------------------------------------------------------ titans end to end

def _titans(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TITANS, *args], capture_output=True, text=True, timeout=400)


def _dead(out) -> list[tuple[int, str]]:
    dead = pq.read_table(os.path.join(out, "dead_letter"))
    return sorted((json.loads(r)["id"], reason) for r, reason in
                  zip(dead.column("row").to_pylist(), dead.column("reason").to_pylist()))


def _assert_same_labels(a: pa.Table, b: pa.Table) -> None:
    """Row for row; model outputs to float32 rounding (batches are cut differently)."""
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type) or name.endswith("probs"):
            np.testing.assert_allclose(np.stack(x.to_numpy(zero_copy_only=False)).astype(float),
                                       np.stack(y.to_numpy(zero_copy_only=False)).astype(float),
                                       rtol=1e-5, atol=1e-6)
        else:
            assert x.equals(y), name


def _labels(out) -> pa.Table:
    return pq.read_table(os.path.join(out, "labels")).sort_by("id")


ROWS = ("rows_in", "rows_easy", "rows_hard", "rows_dead_letter", "rows_deferred",
        "rows_teacher_scored", "conservation_ok", "status", "threshold")


def test_titans_run_on_dask_matches_the_default_runner(cluster, tmp_path):
    address, client = cluster
    data = tmp_path / "data"
    write_dataset(data, 3000, files=2, row_group_size=500)
    _bad_rows_file(data, 3000)  # dead-letter rows: the step Beam's runner fed Arrow tables
    student, teacher = save_models(tmp_path)
    common = ["--input", str(data), "--student", student, "--teacher", teacher,
              "--deferral-rate", "0.25", "--audit-rate", "0.1", "--batch-size", "500"]
    assert main(["run", *common, "--output", str(tmp_path / "fn"), *RUNNER]) == 0
    before = _executed(client)
    done = _titans("run", *common, "--output", str(tmp_path / "dask"), *DASK,
                   "--dask_client_address", address)
    assert done.returncode == 0, done.stderr[-4000:]
    after = _executed(client)
    assert all(after[w] > before.get(w, 0) for w in after) and len(after) == 2  # both ran tasks

    fn, dask = (json.load(open(tmp_path / d / "report.json")) for d in ("fn", "dask"))
    assert {k: dask[k] for k in ROWS} == {k: fn[k] for k in ROWS}
    assert dask["runner"] == DASK_RUNNER and os.path.exists(tmp_path / "dask" / "_SUCCESS")
    _assert_same_labels(_labels(tmp_path / "dask"), _labels(tmp_path / "fn"))
    dead = _dead(tmp_path / "dask")
    assert dead == _dead(tmp_path / "fn") and [i for i, _ in dead] == [3000, 3001, 3002]
    ids = _labels(tmp_path / "dask").column("id").to_pylist() + [i for i, _ in dead]
    assert sorted(ids) == list(range(3004))  # each input row exactly once
    # two bundles of the input: the student's writer left one file per bundle
    assert len([f for f in os.listdir(tmp_path / "dask" / "labels") if f.startswith("student")]) == 2


def test_titans_label_on_dask_matches_the_default_runner(cluster, tmp_path):
    address, _ = cluster
    data = tmp_path / "data"
    write_dataset(data, 2000, files=2, row_group_size=400)
    _, teacher = save_models(tmp_path)
    common = ["--input", str(data), "--teacher", teacher, "--id-column", "id",
              "--sample-rows", "600"]
    assert main(["label", *common, "--output", str(tmp_path / "fn"), *RUNNER]) == 0
    done = _titans("label", *common, "--output", str(tmp_path / "dask"), *DASK,
                   "--dask_client_address", address)
    assert done.returncode == 0, done.stderr[-4000:]
    fn, dask = (json.load(open(tmp_path / d / "report.json")) for d in ("fn", "dask"))
    assert {k: dask[k] for k in ROWS} == {k: fn[k] for k in ROWS}
    _assert_same_labels(_labels(tmp_path / "dask"), _labels(tmp_path / "fn"))
    assert sorted(_labels(tmp_path / "dask").column("id").to_pylist()) == list(range(2000))
