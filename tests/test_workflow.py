"""The README's worked example in miniature: unlabeled Parquet + teacher -> teacher-label ->
distill -> calibrate -> run --calibration, each step reading what the previous one wrote."""
import json

import numpy as np
import pyarrow.parquet as pq

from conftest import RUNNER, logits_of, write_dataset
from titans.models.deferral import make_rule
from titans.pipeline.cli.main import main
from titans.transforms.io.models import load_calibration, load_learned_deferral


def test_unlabeled_data_to_calibrated_cascade(tmp_path, models):
    _, teacher = models
    write_dataset(tmp_path / "pool", 3000, files=2, seed=1)
    write_dataset(tmp_path / "cal", 800, files=1, seed=2)
    x_test = write_dataset(tmp_path / "test", 1000, files=1, seed=3)
    d = str(tmp_path)

    assert main(["teacher-label", "--input", f"{d}/pool", "--teacher", teacher,
                 "--output", f"{d}/tl", *RUNNER]) == 0
    assert main(["distill", "--train", f"{d}/tl/labels", "--teacher-probs", "teacher_probs",
                 "--method", "kd", "--student-arch", "8", "--epochs", "15",
                 "--out", f"{d}/student.pt"]) == 0
    assert main(["calibrate", "--input", f"{d}/cal", "--student", f"{d}/student.pt",
                 "--teacher", teacher, "--rule", "learned", "--max-accuracy-loss", "0.05",
                 "--delta", "0.1", "--out", f"{d}/cal.json", "--plot", f"{d}/cal.png"]) == 0
    cal = load_calibration(f"{d}/cal.json")
    assert cal["rule"] == "learned" and cal["method"] == "ltt" and cal["guarantee"]
    assert (tmp_path / "cal.png").stat().st_size > 0

    assert main(["run", "--input", f"{d}/test", "--student", f"{d}/student.pt", "--teacher",
                 teacher, "--calibration", f"{d}/cal.json", "--output", f"{d}/run", *RUNNER]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["rule"] == "learned" and report["conservation_ok"] and report["rows_in"] == 1000
    # the run applied exactly the calibrated rule and threshold
    rule = make_rule("learned", load_learned_deferral(cal["deferral_model"]))
    _, score = rule(logits_of(f"{d}/student.pt", x_test))
    assert report["rows_hard"] == int((score.numpy() > float(cal["threshold"])).sum())
    labels = pq.read_table(tmp_path / "run" / "labels")
    teacher_pred = logits_of(teacher, x_test).argmax(-1).numpy()
    agreement = np.mean(labels.sort_by("id").column("label").to_numpy() == teacher_pred)
    assert agreement >= 0.9  # eps = 0.05 against the teacher, with some room for the draw
