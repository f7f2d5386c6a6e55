"""Property: whatever mix of bad rows, batch sizes and misbehaving models, every input id comes
out exactly once (labeled or dead-lettered with its reason) and no label comes from a
non-finite model output."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import DIM, RUNNER
from test_faults import NAN, RAISE, faulty_model
from titans.models.loading import ModelRef
from titans.pipeline.job import run_cascade
from titans.pipeline.plan import RunConfig, plan_run

KINDS = ("null", "nan", "inf", "short", "raise", "nan_out")


def _vector(kind: str, rng) -> list | None:
    v = rng.normal(size=DIM).astype(np.float32).tolist()
    if kind == "null":
        return None
    if kind == "nan":
        v[int(rng.integers(DIM))] = float("nan")
    elif kind == "inf":
        v[int(rng.integers(DIM))] = float("-inf") if rng.random() < 0.5 else float("inf")
    elif kind == "short":
        v = v[:-1]
    elif kind == "raise":
        v[0] = RAISE
    elif kind == "nan_out":
        v[0] = NAN
    return v


@st.composite
def datasets(draw):
    files = draw(st.lists(st.integers(0, 250), min_size=1, max_size=4))
    total = sum(files)
    bad_share = draw(st.floats(0.0, 0.2))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=total, max_size=total))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    is_bad = rng.random(total) < bad_share
    return {"files": files, "kinds": ["ok" if not b else k for b, k in zip(is_bad, kinds)],
            "fixed": draw(st.lists(st.booleans(), min_size=len(files), max_size=len(files))),
            "batch_size": draw(st.integers(1, 300)), "faulty": draw(st.sampled_from(
                ["student", "teacher", "both"])), "rate": draw(st.sampled_from([0.0, 0.3, 1.0])),
            "seed": seed}


@settings(max_examples=12, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=datasets())
def test_every_id_exactly_once_whatever_breaks(tmp_path_factory, models, case):
    tmp = tmp_path_factory.mktemp("case")
    rng = np.random.default_rng(case["seed"])
    kinds, start = case["kinds"], 0
    os.makedirs(tmp / "data")
    for i, (n, fixed) in enumerate(zip(case["files"], case["fixed"])):
        vectors = [_vector(k, rng) for k in kinds[start:start + n]]
        if fixed and all(v is not None and len(v) == DIM for v in vectors):
            column = pa.array(vectors, pa.list_(pa.float32(), DIM))
        else:
            column = pa.array(vectors, pa.list_(pa.float32()))
        pq.write_table(pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                                 "features": column}), tmp / "data" / f"part-{i}.parquet")
        start += n
    usable = [k for k in kinds if k not in ("null", "nan", "inf", "short", "raise")]
    if not usable:  # nothing a model can run on: a launch error, tested elsewhere
        return
    faulty = faulty_model(tmp / "faulty.pt")
    student = faulty if case["faulty"] in ("student", "both") else models[0]
    teacher = faulty if case["faulty"] in ("teacher", "both") else models[1]
    out = tmp / "out"
    report = run_cascade(plan_run(RunConfig(
        input=str(tmp / "data"), output=str(out), student=ModelRef(student),
        teacher=ModelRef(teacher), batch_size=case["batch_size"], teacher_batch_size=case["batch_size"],
        deferral_rate=case["rate"], max_dead_letter_rate=1.0)), RUNNER)

    labels = pq.read_table(out / "labels")
    dead = pq.read_table(out / "dead_letter")
    dead_ids = [json.loads(r)["id"] for r in dead.column("row").to_pylist()]
    ids = labels.column("id").to_pylist() + dead_ids
    assert sorted(ids) == list(range(len(kinds)))  # every id exactly once
    assert all(dead.column("reason").to_pylist()) and all(dead.column("stage").to_pylist())
    assert report["conservation_ok"] and report["rows_in"] == len(kinds)
    unreadable = ("null", "nan", "inf", "short")
    source = dict(zip(labels.column("id").to_pylist(), labels.column("source").to_pylist()))
    for i in dead_ids:  # only bad rows are dead-lettered...
        assert kinds[i] != "ok", (i, kinds[i])
    for i, s in source.items():  # ...and none is labeled by a model that cannot score it
        assert kinds[i] not in unreadable, (i, kinds[i])
        if kinds[i] in ("raise", "nan_out"):  # raises / returns NaN in the faulty model
            assert (s == "student" and student != faulty) or (s == "teacher" and teacher != faulty)
    assert np.isfinite(labels.column("confidence").to_numpy(zero_copy_only=False)).all()
