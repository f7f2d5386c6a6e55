"""What the `titans` command does to start faster, checked for what it must not break: Beam
imported without the modules it hides, report.png drawn by a helper process exactly as
in-process, and the default runner."""
import json
import os
import subprocess
import sys

from titans.pipeline import report_plot

REPORT = {"deferral_score_histogram": {"bin_edges": [i / 50 for i in range(51)],
                                       "easy": [1000 - 20 * i for i in range(50)],
                                       "hard": [10 * i for i in range(50)]},
          "threshold": 0.8, "rule": "margin", "rows_easy": 25500, "rows_deferred": 12250,
          "deferral_rate": 0.3245}


def test_beam_imported_by_the_command_leaves_out_what_it_hides_and_can_still_load_it():
    code = ("import sys\n"
            "from titans.pipeline.cli.startup import HIDDEN, import_beam\n"
            "import_beam()\n"
            "import apache_beam\n"
            "print(sorted(m for m in HIDDEN if m in sys.modules))\n"
            "assert not any(sys.modules.get(m, 1) is None for m in HIDDEN)\n"
            "from apache_beam.io.gcp.bigquery import ReadFromBigQuery\n"
            "from apache_beam.io.filesystems import FileSystems\n"
            "FileSystems.get_filesystem('gs://bucket/x')  # gs:// still known\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "ok"]


def _imported_by(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


LOCAL_ONLY = "from titans.pipeline.cli.startup import HIDDEN_LOCAL\n"
SHOW = ("import sys\n"
        "print(','.join(sorted(m.rsplit('.', 1)[-1] for m in HIDDEN_LOCAL if m in sys.modules))"
        " or '-')\n")


def test_a_local_job_leaves_out_the_url_filesystems_and_loads_them_on_a_url():
    out = _imported_by(
        LOCAL_ONLY + "from titans.pipeline.cli.startup import import_beam\n"
        "import_beam(local=True)\n" + SHOW +
        "from apache_beam.runners.dataflow import dataflow_runner\n"
        "print(dataflow_runner.dataflow_api is None)\n"
        "from titans.transforms.io import storage\n"
        "fs = storage.filesystems().get_filesystem('gs://bucket/x')\n"
        "print(type(fs).__name__)\n" + SHOW)
    assert out == ["-", "True", "GCSFileSystem", "blobstoragefilesystem,gcsfilesystem,s3filesystem"]


def test_the_command_hides_them_only_for_an_in_process_job_that_names_no_url(tmp_path):
    def parsed(*flags):
        return _imported_by(
            LOCAL_ONLY + "from titans.pipeline.cli.main import parse\n"
            f"parse({['run', '--student', 's.pt', '--teacher', 't.pt', *flags]!r})\n" + SHOW)

    every = ["blobstoragefilesystem,dataflow,gcsfilesystem,s3filesystem"]
    assert parsed("--input", "in", "--output", "out") == ["-"]
    assert parsed("--input", "gs://b/in", "--output", "out") == every
    assert parsed("--input", "in", "--output", "out", "--temp_location", "gs://b/t") == every
    assert parsed("--input", "in", "--output", "out", "--runner", "DataflowRunner") == every


def test_dofn_specs_are_asked_once_per_dofn_and_answered_as_beam_would():
    out = _imported_by(
        "import apache_beam as beam\n"
        "from apache_beam.coders import VarIntCoder\n"
        "from apache_beam.transforms import userstate\n"
        "from titans.pipeline.cli.startup import memoize_dofn_specs\n"
        "beams, calls = userstate.get_dofn_specs, []\n"
        "userstate.get_dofn_specs = lambda fn: calls.append(fn) or beams(fn)\n"
        "memoize_dofn_specs()\n"
        "class Plain(beam.DoFn):\n"
        "    def process(self, x):\n"
        "        yield x\n"
        "class Stateful(beam.DoFn):\n"
        "    SUM = userstate.ReadModifyWriteStateSpec('sum', VarIntCoder())\n"
        "    def process(self, kv, s=beam.DoFn.StateParam(SUM)):\n"
        "        yield kv\n"
        "for fn in (Plain(), Stateful()):\n"
        "    memo = [userstate.get_dofn_specs(fn) for _ in range(3)]\n"
        "    assert all(m == beams(fn) for m in memo), (memo, beams(fn))\n"
        "    memo[0][0].add('x')  # a caller's change is its own\n"
        "    assert userstate.get_dofn_specs(fn) == beams(fn)\n"
        "    print(userstate.is_stateful_dofn(fn), len([c for c in calls if c is fn]))\n"
        "p = beam.Pipeline(runner='FnApiRunner')\n"
        "_ = p | beam.Create([('a', 1), ('a', 2)]) | beam.ParDo(Stateful())\n"
        "p.run().wait_until_finish()\n"
        "print('ran')\n")
    assert out == ["False", "1", "True", "1", "ran"]


def test_the_command_takes_arrow_buffers_from_jemalloc_unless_told_otherwise():
    code = ("import os, sys\n"
            "from titans.pipeline.cli.main import main\n"
            "try:\n"
            "    main(['run', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "import pyarrow as pa\n"
            "print(pa.default_memory_pool().backend_name)\n")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    for pool, expected in ((None, "jemalloc"), ("system", "system")):
        if pool:
            env["ARROW_DEFAULT_MEMORY_POOL"] = pool
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == expected


def test_the_helper_draws_the_same_png_as_the_command_would(tmp_path):
    report_plot.start_helper()
    try:
        report_plot.plot_scores(REPORT, str(tmp_path / "helper.png"))
        assert report_plot._helper is None  # used once
    finally:
        report_plot.stop_helper()
    drawn_here = report_plot.scores_png(REPORT)
    assert drawn_here.startswith(b"\x89PNG") and len(drawn_here) > 5_000
    assert (tmp_path / "helper.png").read_bytes() == drawn_here


def test_a_dead_helper_means_drawing_in_process(tmp_path):
    report_plot.start_helper()
    report_plot._helper.kill()
    report_plot._helper.wait()
    report_plot.plot_scores(REPORT, str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes() == report_plot.scores_png(REPORT)
    assert report_plot._helper is None


def test_an_unused_helper_exits_when_stopped():
    report_plot.start_helper()
    helper = report_plot._helper
    report_plot.stop_helper()
    assert helper.returncode == 0 and report_plot._helper is None


def test_no_histogram_no_plot_and_the_helper_is_kept(tmp_path):
    report_plot.start_helper()
    try:
        report_plot.plot_scores({"mode": "teacher-label"}, str(tmp_path / "report.png"))
        assert not (tmp_path / "report.png").exists() and report_plot._helper is not None
    finally:
        report_plot.stop_helper()


def test_the_titans_command_runs_on_the_in_process_runner_and_draws_its_plot(tmp_path, dataset, models):
    (data, _), (student, teacher) = dataset, models
    script = os.path.join(os.path.dirname(sys.executable), "titans")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "titans.pipeline.cli.main"]
    out = tmp_path / "out"
    done = subprocess.run(cmd + ["run", "--input", data, "--output", str(out), "--student",
                                 student, "--teacher", teacher, "--deferral-rate", "0.3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["runner"] == "FnApiRunner" and report["status"] == "complete"
    png = (out / "report.png").read_bytes()
    assert png == report_plot.scores_png(report)
    assert (out / "_SUCCESS").stat().st_mtime_ns >= (out / "report.png").stat().st_mtime_ns


def test_a_job_turns_the_collector_back_on_with_start_up_frozen(tmp_path, dataset, models):
    """The command line runs start-up without the cyclic collector; the job must not run
    without it (a long job's cycles would pile up)."""
    import gc

    from titans.pipeline.cli import startup
    from titans.pipeline.cli.main import main

    (data, _), (student, teacher) = dataset, models
    run = ["run", "--input", data, "--student", student, "--teacher", teacher,
           "--runner", "FnApiRunner"]
    startup.pause_gc()
    try:
        assert not gc.isenabled()
        assert main(run + ["--output", str(tmp_path / "out")]) == 0
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()
    # a collector the caller turned off itself stays off: only the command's pause is resumed
    gc.disable()
    try:
        assert main(run + ["--output", str(tmp_path / "again")]) == 0
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_a_helper_that_cannot_start_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(report_plot.sys, "executable", str(tmp_path / "no-such-python"))
    report_plot.start_helper()
    assert report_plot._helper is None
    report_plot.plot_scores(REPORT, str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes() == report_plot.scores_png(REPORT)


def test_the_command_samples_beams_step_states_every_few_ms_and_plain_beam_keeps_its_own():
    code = ("import sys\n"
            "from titans.pipeline.cli.startup import SAMPLING_MS, import_beam\n"
            "if sys.argv[1] == 'command':\n"
            "    import_beam()\n"
            "from apache_beam.runners.worker import statesampler\n"
            "from apache_beam.utils.counters import CounterFactory\n"
            "print(statesampler.StateSampler('step', CounterFactory()).sampling_period_ms,"
            " SAMPLING_MS)\n")
    periods = {}
    for how in ("command", "plain"):
        done = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        periods[how] = [int(v) for v in done.stdout.split()]
    assert periods["command"][0] == periods["command"][1] <= 20
    assert periods["plain"][0] == 200  # Beam's default, what a worker or a library user gets
