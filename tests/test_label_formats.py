"""`titans label` reads every input `titans run` reads: GZIP TFRecord of tf.Example, encoded
images (PNG bytes, a small CNN teacher), labels/ written as TFRecord, and token-id sequences
(a list<int64> column, a small token teacher, a bag-of-embeddings student). Each job: every row exactly once in labels/ or dead_letter/,
_SUCCESS, and the guarantee line. TFRecords are written by tests/example_wire.py."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import RUNNER
from example_wire import example, write_tfrecord
from test_formats import _png
from test_label import (CLASSES, DIM, TEACHER_CLASS, TEACHER_KWARGS, RecordingTeacher,  # noqa: F401
                        recording, save_teacher, seen_ids, short_training, teacher_labels)
from titans.pipeline.cli.main import main
from titans.pipeline.label.sample import draw_sample, read_records
from titans.transforms.io.inputs import open_input
from titans.transforms.io.models import save_torchscript


def _dead_ids(out) -> np.ndarray:
    dead = pq.read_table(os.path.join(out, "dead_letter"))
    return np.array([json.loads(r)["id"] for r in dead.column("row").to_pylist()], int)


def _write_vectors(directory, n: int = 1500, files: int = 3, bad: int = 30) -> np.ndarray:
    """``files`` GZIP TFRecord files of Examples (id, features: feature 0 is id / 1000); ``bad``
    rows have a NaN feature. Returns x."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = np.arange(1, n + 1)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    x[:, 0] = ids / 1000
    x[rng.choice(n, bad, replace=False), 3] = np.nan
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        write_tfrecord(os.path.join(directory, f"part-{i}.tfrecord.gz"),
                       [example({"id": ("int64", [int(ids[j])]), "features": ("float", x[j].tolist())})
                        for j in part], compress=True)
    return x


def test_label_on_gzip_tfrecord(tmp_path, recording, capsys):
    x = _write_vectors(tmp_path / "data")
    teacher = save_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "out"
    assert main(["label", "--input", str(tmp_path / "data"), "--format", "tfrecord",
                 "--output", str(out), "--teacher", teacher, "--teacher-class", TEACHER_CLASS,
                 "--teacher-class-kwargs", TEACHER_KWARGS, "--id-column", "id",
                 "--sample-rows", "600", "--max-disagreement", "0.05", *RUNNER]) == 0
    printed = capsys.readouterr().out
    assert "guarantee: with probability >= 0.9" in printed
    assert (out / "_SUCCESS").exists()
    labels = pq.read_table(out / "labels").sort_by("id")
    ids, dead = labels.column("id").to_numpy(), _dead_ids(out)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids, dead])), np.arange(1, 1501))
    assert len(dead) == 30
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["conservation_ok"]
    assert report["input_format"] == "tfrecord" and report["rows_in"] == 1500
    # the sample rows keep the teacher's labels and the teacher never ran on a row twice: the
    # cascade's reader left the sampled records out by their byte offsets
    seen = seen_ids()
    assert len(np.unique(seen)) == len(seen)
    assert len(seen) == report["rows_prelabeled"] + report["rows_teacher_scored"]
    by_teacher = labels.filter(pa.compute.equal(labels.column("source"), "teacher"))
    truth = teacher_labels(teacher, x)
    np.testing.assert_array_equal(by_teacher.column("label").to_numpy(),
                                  truth[by_teacher.column("id").to_numpy() - 1])


def test_tfrecord_sample_reads_the_drawn_records_with_their_offsets(tmp_path):
    x = _write_vectors(tmp_path / "data", n=300, files=2, bad=0)
    source = open_input(str(tmp_path / "data"), "tfrecord")
    from titans.pipeline.label.launch import file_row_counts

    counts = file_row_counts(source)
    assert counts == [150, 150]
    per_file = draw_sample(counts, 40, seed=1)
    for i, (path, rows) in enumerate(zip(source.files, per_file)):
        table, bad = read_records(path, rows, i, source)
        assert bad == 0 and table.num_rows == rows.size
        np.testing.assert_array_equal(table.column("id").to_numpy(), rows + 1 + 150 * i)
        np.testing.assert_allclose(np.stack(table.column("features").to_numpy(zero_copy_only=False)),
                                   x[rows + 150 * i])
        offsets = table.column("__titans_row").to_numpy()
        assert np.all(np.diff(offsets) > 0) and set(table.column("__titans_file").to_pylist()) == {i}


class DigitCNN(torch.nn.Module):
    """float32 [B, 1, 8, 8] -> logits [B, 10]: a small convolutional teacher."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(8 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("fmt", ["tfrecord", "parquet"])
def test_label_on_png_digits(tmp_path, capsys, fmt):
    """PNG digits, a small CNN teacher. tfrecord: the command of the issue, --format tfrecord
    --image-column image/encoded on GZIP TFRecords (it read them as Parquet and failed
    before), writing labels/ as TFRecord; parquet: the PNG bytes in a binary column."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = 1200
    pixels = (digits.images[:n] * 255 / 16).round()
    images = [_png(p) for p in pixels]
    images[7] = b"not a png"  # dead-lettered by the image decoder
    os.makedirs(tmp_path / "data")
    for i, part in enumerate(np.array_split(np.arange(n), 2)):
        if fmt == "tfrecord":
            write_tfrecord(tmp_path / "data" / f"digits-{i}.tfrecord.gz",
                           [example({"id": ("int64", [int(j)]),
                                     "image/encoded": ("bytes", [images[j]])}) for j in part],
                           compress=True)
        else:
            pq.write_table(pa.table({"id": pa.array(part, pa.int64()), "image/encoded": pa.array(
                [images[j] for j in part], pa.binary())}), tmp_path / "data" / f"digits-{i}.parquet",
                row_group_size=200)
    torch.manual_seed(0)
    teacher = str(tmp_path / "cnn.pt")
    save_torchscript(DigitCNN(), teacher)
    out = tmp_path / "out"
    assert main(["label", "--input", str(tmp_path / "data"), "--format", fmt,
                 "--image-column", "image/encoded", "--image-mode", "L",
                 "--output", str(out), "--output-format", fmt, "--teacher", teacher,
                 "--id-column", "id", "--sample-rows", "500", "--deferral-rate", "0.3",
                 *RUNNER]) == 0
    printed = capsys.readouterr().out
    assert "guarantee: no guarantee: --deferral-rate 0.3" in printed
    assert (out / "_SUCCESS").exists()
    assert all(p.name.endswith("." + fmt) for p in (out / "labels").iterdir())
    labels = open_input(str(out / "labels"), fmt).read_all()
    ids, dead = labels.column("id").to_numpy(), _dead_ids(out)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids, dead])), np.arange(n))
    assert dead.tolist() == [7]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["conservation_ok"]
    assert report["model_input"].startswith("float32 [batch, 1, 8, 8]")
    assert report["rows_prelabeled"] == 500 - (7 in _sampled_ids(out))


def _sampled_ids(out) -> set:
    return set(pq.read_table(out / "_label" / "sample.parquet").column("id").to_pylist())


class TokenTeacher(torch.nn.Module):
    """int64 [B, L] -> logits [B, 3]: a lookup in a table of 1,000 rows (a Parameter, not an
    nn.Embedding, so the student's vocabulary comes from the sample), the mean over the
    non-pad positions, two linear layers."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1000, 32))
        self.hidden = torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != 0).unsqueeze(-1).to(torch.float32)
        e = torch.nn.functional.embedding(x.clamp(0, 999), self.table) * mask
        return self.out(torch.relu(self.hidden(e.sum(1) / mask.sum(1).clamp_min(1.0))))


def test_label_on_token_sequences(tmp_path, capsys):
    """--token-column: the sample padded like `titans run` pads a batch, token students
    distilled, calibrated and run; a row with an id above any in the sample is labeled (the
    student's out-of-vocabulary bucket), a null sequence dead-lettered."""
    n = 400
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 60, rng.integers(1, 13)).tolist() for _ in range(n)]
    drawn = draw_sample([n // 2, n // 2], 200, seed=0)  # the rows --seed 0 samples
    sampled = set(np.concatenate([rows + i * (n // 2) for i, rows in enumerate(drawn)]).tolist())
    big = [i for i in range(12, n) if i not in sampled][:3]  # an id far above the sample's
    for i in big:
        seqs[i] = seqs[i] + [900]
    seqs[11] = None
    os.makedirs(tmp_path / "data")
    for i, part in enumerate(np.array_split(np.arange(n), 2)):
        pq.write_table(pa.table({"id": pa.array(part, pa.int64()), "tokens": pa.array(
            [seqs[j] for j in part], pa.list_(pa.int64()))}), tmp_path / "data" / f"t-{i}.parquet")
    torch.manual_seed(0)
    teacher = str(tmp_path / "tokens.pt")
    save_torchscript(TokenTeacher(), teacher)
    out = tmp_path / "out"
    assert main(["label", "--input", str(tmp_path / "data"), "--token-column", "tokens",
                 "--output", str(out), "--teacher", teacher, "--id-column", "id",
                 "--sample-rows", "200", "--seed", "0", "--deferral-rate", "0.3", *RUNNER]) == 0
    printed = capsys.readouterr().out
    assert "guarantee: no guarantee: --deferral-rate 0.3" in printed
    assert "student token model emb" in printed and "student: token model emb" in printed
    assert (out / "_SUCCESS").exists()
    labels = pq.read_table(out / "labels")
    ids, dead = labels.column("id").to_numpy(), _dead_ids(out)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids, dead])), np.arange(n))
    assert dead.tolist() == [11]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["conservation_ok"]
    assert report["model_input"].startswith("int64 [batch, length]")
    assert _sampled_ids(out) == sampled - {11}
    sample_top = max(max(seqs[i]) for i in sampled if seqs[i] is not None)
    assert sample_top < 900 and set(big) <= set(ids.tolist())  # labeled (student or teacher)
    vocab = json.loads((out / "_label" / "phases.json").read_text())["phases"]["distil"][
        "token_vocab"]
    assert sample_top < vocab < 900
    from titans.transforms.io.models import load_model_file

    student = load_model_file(str(out / "student.pt"), "cpu")
    with torch.inference_mode():
        logits = student(torch.tensor([seqs[big[0]]]))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
