"""`titans teacher-label`, audit sampling in `titans run`, and `titans run --calibration`."""
import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import beta

from conftest import CLASSES, RUNNER, logits_of, read_labels, write_dataset
from titans.transforms.io.models import save_calibration
from titans.models.deferral import make_rule
from titans.pipeline.job import run_cascade, run_teacher_label
from titans.pipeline.plan import RunConfig, TeacherLabelConfig, plan_run, plan_teacher_label
from titans.models.loading import ModelRef


def _run(data, out, student, teacher, **kw):
    common = dict(input=str(data), output=str(out), teacher=ModelRef(teacher),
                  batch_size=kw.pop("batch_size", 256), **kw)
    if student is None:
        return run_teacher_label(plan_teacher_label(TeacherLabelConfig(**common)), RUNNER)
    return run_cascade(plan_run(RunConfig(student=ModelRef(student), **common)), RUNNER)


def test_teacher_label_writes_the_teachers_probabilities(tmp_path, models):
    x = write_dataset(tmp_path / "data", 1200)
    report = _run(tmp_path / "data", tmp_path / "out", None, models[1])
    labels = read_labels(tmp_path / "out")
    probs = np.stack(labels.column("teacher_probs").to_numpy(zero_copy_only=False))
    expected = logits_of(models[1], x).softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert probs.shape == (1200, CLASSES)
    np.testing.assert_array_equal(labels.column("label").to_numpy(), expected.argmax(-1))
    assert labels.column_names[:3] == ["id", "features", "note"]
    probs_type = labels.schema.field("teacher_probs").type  # what `titans distill` reads
    assert pa.types.is_fixed_size_list(probs_type) and probs_type.list_size == CLASSES
    assert report["rows_in"] == report["rows_labeled"] == 1200 and report["conservation_ok"]
    assert report["mode"] == "teacher-label" and report["metrics"]["teacher_rows"] == 1200


def test_audit_is_seeded_counted_once_and_leaves_labels_alone(tmp_path, models):
    student, teacher = models
    write_dataset(tmp_path / "data", 3000, files=2, row_group_size=500)
    plain = _run(tmp_path / "data", tmp_path / "plain", student, teacher, deferral_rate=0.2)
    a = _run(tmp_path / "data", tmp_path / "a", student, teacher, deferral_rate=0.2, audit_rate=0.3)
    b = _run(tmp_path / "data", tmp_path / "b", student, teacher, deferral_rate=0.2, audit_rate=0.3)
    # audited rows keep the student's label: the output is the same as without auditing
    assert read_labels(tmp_path / "a").equals(read_labels(tmp_path / "plain"))
    assert a["rows_easy"] == plain["rows_easy"] and a["conservation_ok"]
    # about 30% of the easy rows, the same ones on every run (seeded)
    assert abs(a["rows_audited"] - 0.3 * a["rows_easy"]) < 4 * np.sqrt(0.21 * a["rows_easy"])
    assert (a["rows_audited"], a["audit_agreement"]) == (b["rows_audited"], b["audit_agreement"])
    assert a["metrics"]["teacher_rows"] == a["rows_hard"] + a["rows_audited"]
    lo, hi = a["audit_agreement_ci95"]
    assert lo <= a["audit_agreement"] <= hi
    # Clopper-Pearson from its beta-quantile form: B(.025; k, n-k+1), B(.975; k+1, n-k)
    n = a["rows_audited"]
    k = round(a["audit_agreement"] * n)
    assert 0 < k < n  # the closed form below needs both shape parameters positive
    assert (lo, hi) == pytest.approx((beta.ppf(0.025, k, n - k + 1), beta.ppf(0.975, k + 1, n - k)),
                                     rel=1e-9)
    other_seed = _run(tmp_path / "data", tmp_path / "c", student, teacher, deferral_rate=0.2,
                      audit_rate=0.3, seed=7)
    assert other_seed["rows_audited"] != a["rows_audited"] or \
        other_seed["audit_agreement"] != a["audit_agreement"]


def test_audit_agreement_is_exact_when_the_teacher_is_the_student(tmp_path, models):
    student, _ = models
    write_dataset(tmp_path / "data", 1000)
    report = _run(tmp_path / "data", tmp_path / "out", student, student, deferral_rate=0.1,
                  audit_rate=0.5)
    assert report["rows_audited"] > 300
    assert report["audit_agreement"] == 1.0 and report["audit_agreement_ci95"][1] == 1.0


def test_run_takes_rule_and_threshold_from_a_calibration_file(tmp_path, models):
    student, teacher = models
    x = write_dataset(tmp_path / "data", 1500)
    cal = str(tmp_path / "cal.json")
    save_calibration(cal, {"rule": "entropy", "threshold": 0.8, "method": "budget",
                           "deferral_rate": 0.25, "guarantee": None, "curves": {}})
    report = _run(tmp_path / "data", tmp_path / "out", student, teacher, calibration=cal)
    assert report["rule"] == "entropy" and report["threshold"] == 0.8
    assert "calibration file" in report["threshold_source"]
    _, score = make_rule("entropy")(logits_of(student, x))
    assert report["rows_hard"] == int((score.numpy() > 0.8).sum())
    with pytest.raises(ValueError, match="drop --threshold"):
        _run(tmp_path / "data", tmp_path / "out2", student, teacher, calibration=cal, threshold=0.5)

