"""The whole cascade on the data real labeling jobs have: TFRecord tf.Example in and out,
encoded images, token sequences. TFRecords are written by tests/example_wire.py, an encoder
independent of the code under test."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import CLASSES, DIM, RUNNER, read_labels, write_dataset
from example_wire import example, write_tfrecord
from titans.models.loading import ModelRef
from titans.transforms.io.models import save_torchscript
from titans.pipeline.job import run_cascade, run_teacher_label
from titans.pipeline.plan import RunConfig, TeacherLabelConfig, plan_run, plan_teacher_label
from titans.transforms.io.example_codec import parse_examples
from titans.transforms.features import ImageSpec, TokenSpec
from titans.transforms.io.tfrecord import sample_records


def _run(data, out, student, teacher, **kw):
    config = RunConfig(input=str(data), output=str(out), student=ModelRef(student),
                       teacher=ModelRef(teacher), batch_size=kw.pop("batch_size", 256), **kw)
    return run_cascade(plan_run(config), RUNNER)


def _dead_ids(out) -> list:
    dead = pq.read_table(os.path.join(out, "dead_letter"))
    return sorted(json.loads(r).get("id") for r in dead.column("row").to_pylist())


def _write_tfrecords(directory, x: np.ndarray, files: int = 3, gzip_last: bool = True):
    """x's rows as Examples (id int64, features float_list, note bytes), over ``files`` files."""
    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for i in range(files):
        records = [example({"id": ("int64", [j]), "features": ("float", x[j].tolist()),
                            "note": ("bytes", [f"row {j}".encode()])})
                   for j in range(bounds[i], bounds[i + 1])]
        compress = gzip_last and i == files - 1
        write_tfrecord(os.path.join(directory, f"part-{i}.tfrecord" + (".gz" if compress else "")),
                       records, compress=compress)


def test_tfrecord_input_gives_the_labels_parquet_gives(tmp_path, models):
    x = write_dataset(tmp_path / "parquet", 2000, files=2)
    _write_tfrecords(tmp_path / "tfrecord", x)
    # a record that is not an Example: dead-lettered with its raw bytes, the rest labeled
    with open(tmp_path / "tfrecord" / "part-0.tfrecord", "ab") as f:
        from example_wire import frame
        f.write(frame(b"\xff\xff not an example"))
    from_parquet = _run(tmp_path / "parquet", tmp_path / "a", *models, threshold=0.6)
    from_tfrecord = _run(tmp_path / "tfrecord", tmp_path / "b", *models, threshold=0.6)
    assert from_tfrecord["input_format"] == "tfrecord" and from_tfrecord["input_files"] == 3
    a, b = read_labels(tmp_path / "a"), read_labels(tmp_path / "b")
    assert b.column("id").to_pylist() == list(range(2000))
    for column in ("label", "source"):
        assert a.column(column).to_pylist() == b.column(column).to_pylist()
    np.testing.assert_allclose(b.column("deferral_score").to_numpy(),
                               a.column("deferral_score").to_numpy(), atol=1e-6)
    assert from_tfrecord["rows_in"] == 2001 and from_tfrecord["rows_dead_letter"] == 1
    assert (from_parquet["rows_easy"], from_parquet["rows_hard"]) == (
        from_tfrecord["rows_easy"], from_tfrecord["rows_hard"])
    dead = pq.read_table(tmp_path / "b" / "dead_letter")
    row = json.loads(dead.column("row")[0].as_py())
    assert "base64" in json.dumps(row) and "part-0.tfrecord" in json.dumps(row)


def test_tfrecord_output_round_trips(tmp_path, models):
    x = write_dataset(tmp_path / "data", 700, files=1)
    _run(tmp_path / "data", tmp_path / "pq", *models, threshold=0.6)
    report = _run(tmp_path / "data", tmp_path / "tf", *models, threshold=0.6,
                  output_format="tfrecord")
    assert report["output_format"] == "tfrecord" and (tmp_path / "tf" / "_SUCCESS").exists()
    files = sorted(str(p) for p in (tmp_path / "tf" / "labels").glob("*.tfrecord"))
    records = sample_records(files, 10_000)
    schema = pq.read_schema(next((tmp_path / "pq" / "labels").glob("*.parquet")))
    table, dead = parse_examples(records, schema)
    assert dead is None
    expected = read_labels(tmp_path / "pq")
    got = table.sort_by("id")
    assert got.column_names == expected.column_names
    for column in ("id", "label", "source", "note"):
        assert got.column(column).to_pylist() == expected.column(column).to_pylist()
    np.testing.assert_allclose(np.stack(got.column("features").to_numpy(zero_copy_only=False)), x)
    np.testing.assert_allclose(got.column("confidence").to_numpy(),
                               expected.column("confidence").to_numpy())


class ImageNet(torch.nn.Module):
    """float32 [B, 1, 8, 8] -> logits [B, CLASSES]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden),
                                       torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_decoded_and_undecodable_ones_dead_lettered(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(600, 8, 8))
    images = [_png(p) for p in pixels]
    images[17] = b"not a png"
    images[401] = None
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"id": np.arange(600), "image": pa.array(images, pa.binary())}),
                   tmp_path / "data" / "a.parquet", row_group_size=250)
    torch.manual_seed(0)
    student, teacher = str(tmp_path / "s.pt"), str(tmp_path / "t.pt")
    save_torchscript(ImageNet(4), student)
    save_torchscript(ImageNet(64), teacher)
    spec = ImageSpec("image", mode="L", mean=(0.5,), std=(0.25,))
    report = _run(tmp_path / "data", tmp_path / "out", student, teacher, image=spec,
                  deferral_rate=0.3)
    assert report["model_input"].startswith("float32 [batch, 1, 8, 8]")
    assert report["conservation_ok"] and report["rows_dead_letter"] == 2
    assert _dead_ids(tmp_path / "out") == [17, 401]
    labels = read_labels(tmp_path / "out")
    # the student's label of an easy row is its argmax on the normalised image
    easy = labels.filter(pa.compute.equal(labels.column("source"), "student"))
    ids = easy.column("id").to_numpy()
    x = ((pixels[ids] / 255.0 - 0.5) / 0.25).astype(np.float32)[:, None]
    with torch.inference_mode():
        expected = torch.jit.load(student)(torch.from_numpy(x)).argmax(-1).numpy()
    np.testing.assert_array_equal(easy.column("label").to_numpy(), expected)


class TokenNet(torch.nn.Module):
    """int64 token ids [B, L] (0 = padding) -> logits: mean of the embeddings of real tokens."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(50, width, padding_idx=0)
        self.out = torch.nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).float().unsqueeze(-1)
        pooled = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.out(pooled)


@pytest.mark.parametrize("overflow", ["dead_letter", "truncate"])
def test_token_sequences_are_padded_and_overlong_rows_handled(tmp_path, overflow):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 50, size=rng.integers(1, 12)).tolist() for _ in range(500)]
    seqs[7] = list(range(1, 31))  # longer than --max-length
    seqs[9] = None
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"id": np.arange(500), "tokens": pa.array(seqs, pa.list_(pa.int64()))}),
                   tmp_path / "data" / "a.parquet")
    torch.manual_seed(0)
    student, teacher = str(tmp_path / "s.pt"), str(tmp_path / "t.pt")
    save_torchscript(TokenNet(3), student)
    save_torchscript(TokenNet(32), teacher)
    spec = TokenSpec("tokens", pad_id=0, max_length=20, overflow=overflow)
    report = _run(tmp_path / "data", tmp_path / "out", student, teacher, tokens=spec,
                  deferral_rate=0.2, batch_size=64)
    assert report["conservation_ok"]
    assert _dead_ids(tmp_path / "out") == ([7, 9] if overflow == "dead_letter" else [9])
    labels = read_labels(tmp_path / "out")
    assert len(labels) == (498 if overflow == "dead_letter" else 499)


def test_teacher_label_reads_tfrecord_and_writes_tfrecord(tmp_path, models):
    x = np.random.default_rng(2).normal(size=(300, DIM)).astype(np.float32)
    _write_tfrecords(tmp_path / "data", x, files=2)
    report = run_teacher_label(plan_teacher_label(TeacherLabelConfig(
        input=str(tmp_path / "data"), output=str(tmp_path / "out"), teacher=ModelRef(models[1]),
        output_format="tfrecord")), RUNNER)
    assert report["rows_labeled"] == 300 and report["input_format"] == "tfrecord"
    files = sorted(str(p) for p in (tmp_path / "out" / "labels").glob("*.tfrecord"))
    assert len(sample_records(files, 10_000)) == 300


def test_distill_calibrate_and_run_on_tfrecord_images(tmp_path, one_torch_thread):
    from titans.pipeline.cli.main import main

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(400, 8, 8))
    os.makedirs(tmp_path / "data")
    write_tfrecord(tmp_path / "data" / "part-0.tfrecord",
                   [example({"id": ("int64", [i]), "image": ("bytes", [_png(p)])})
                    for i, p in enumerate(pixels)])
    torch.manual_seed(0)
    teacher = str(tmp_path / "t.pt")
    save_torchscript(ImageNet(64), teacher)
    images = ["--image-column", "image", "--image-mode", "L"]
    student, cal = str(tmp_path / "s.pt"), str(tmp_path / "cal.json")
    assert main(["distill", "--train", str(tmp_path / "data"), *images, "--teacher", teacher,
                 "--out", student, "--method", "kd", "--epochs", "2"]) == 0
    assert main(["calibrate", "--input", str(tmp_path / "data"), *images, "--student", student,
                 "--teacher", teacher, "--deferral-rate", "0.25", "--out", cal]) == 0
    assert main(["run", "--input", str(tmp_path / "data"), *images, "--student", student,
                 "--teacher", teacher, "--calibration", cal, "--output", str(tmp_path / "out"),
                 "--output-format", "tfrecord", *RUNNER]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows_in"] == 400 and report["conservation_ok"]
    assert 0.1 < report["deferral_rate"] < 0.4
