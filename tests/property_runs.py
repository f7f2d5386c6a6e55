"""Helpers of test_property_across_runs.py: a small dataset whose files can be rewritten, added
and removed; tiny TorchScript models written with torch directly; what an output directory
holds, read from its files (never from titans' own report of itself); and a driver that runs
one `titans` command in a subprocess with short student training (for the kills).

Run as a script (``python tests/property_runs.py label --input ...``) it is that driver: the
same ``main()`` as ``python -m titans.pipeline.cli.main``, with ``student_search.TRAIN_STEPS``
lowered so that a `titans label` in a subprocess takes seconds, not minutes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

DIM, CLASSES = 8, 4
TRAIN_STEPS = 100          # per candidate student in `titans label` (the command's default: 10,000)
LOCK = "_titans_lock"
SUCCESS = "_SUCCESS"


# ------------------------------------------------------------------ models

def save_mlp(path: str, hidden: int, seed: int) -> str:
    """A TorchScript MLP DIM -> hidden -> CLASSES with weights from ``seed``, written in place
    (the same path: a replaced model is the same file name with other bytes)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, CLASSES)).eval()
    torch.jit.save(torch.jit.script(model), path)
    return path


def argmax_of(path: str, x: np.ndarray) -> np.ndarray:
    """The class the TorchScript model at ``path`` gives each row of ``x`` (NaN read as 0: those
    rows are never labeled anyway)."""
    import torch

    with torch.inference_mode():
        model = torch.jit.load(path)
        return model(torch.from_numpy(np.nan_to_num(x).astype(np.float32))).argmax(-1).numpy()


# ------------------------------------------------------------------ data

@dataclasses.dataclass
class InputFile:
    ids: np.ndarray
    x: np.ndarray
    bad: np.ndarray  # bool per row: a NaN feature, so the row can only be dead-lettered


class Dataset:
    """Parquet files part-N.parquet in ``directory``; ids unique over the dataset's whole
    history (a rewritten file gets new ids), ~1% of rows with a NaN feature."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files: dict[str, InputFile] = {}
        self.next_id = 1
        self.next_name = 0
        os.makedirs(directory, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _write(self, name: str, n: int, seed: int, keep_mtime: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = np.random.default_rng(seed)
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        bad = rng.random(n) < 0.01
        x[bad, 3] = np.nan
        path = self.path(name)
        before = os.stat(path) if keep_mtime and os.path.exists(path) else None
        values = pa.array(x.reshape(-1))
        table = pa.table({"id": pa.array(ids), "features": pa.FixedSizeListArray.from_arrays(
            values, DIM), "note": pa.array([f"row {i}" for i in ids])})
        pq.write_table(table, path + ".tmp", row_group_size=100)
        os.replace(path + ".tmp", path)
        if before is not None:  # the same modification time: only the contents tell
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.files[name] = InputFile(ids, x, bad)

    def add(self, n: int, seed: int) -> str:
        name = f"part-{self.next_name}.parquet"
        self.next_name += 1
        self._write(name, n, seed)
        return name

    def rewrite(self, name: str, seed: int, keep_mtime: bool) -> None:
        """The same row count, other ids and features."""
        self._write(name, len(self.files[name].ids), seed, keep_mtime)

    def remove(self, name: str) -> None:
        os.remove(self.path(name))
        del self.files[name]

    def rows(self) -> int:
        return sum(len(f.ids) for f in self.files.values())

    def snapshot(self, teacher: str) -> "Snapshot":
        """The input as it is now, and the current teacher's label of every row."""
        ids = np.concatenate([f.ids for f in self.files.values()])
        x = np.concatenate([f.x for f in self.files.values()])
        bad = np.concatenate([f.bad for f in self.files.values()])
        return Snapshot({n: frozenset(f.ids.tolist()) for n, f in self.files.items()},
                        dict(zip(ids.tolist(), argmax_of(teacher, x).tolist())),
                        frozenset(ids[bad].tolist()))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    files: dict          # {file name: frozenset of its ids}
    teacher: dict        # {id: the teacher's class}, teacher as it was then
    bad: frozenset       # ids that can only be dead-lettered

    def ids(self, names=None) -> frozenset:
        names = self.files if names is None else names
        return frozenset().union(*(self.files[n] for n in names)) if names else frozenset()


# ------------------------------------------------------------------ what an output holds

def listing(out: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``out``."""
    found = {}
    for d, _, names in os.walk(out):
        for f in names:
            p = os.path.join(d, f)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            found[os.path.relpath(p, out)] = (st.st_size, st.st_mtime_ns)
    return found


def success_sig(out: str):
    """(mtime_ns, bytes) of ``out``/_SUCCESS, or None."""
    p = os.path.join(out, SUCCESS)
    try:
        return os.stat(p).st_mtime_ns, open(p, "rb").read()
    except FileNotFoundError:
        return None


@dataclasses.dataclass
class Held:
    """What an output's labels/ and dead_letter/ hold, read file by file."""
    label_ids: list
    label: dict      # {id: label}
    source: dict     # {id: 'student' | 'teacher'}
    dead_ids: list
    sample_files: int


def read_output(out: str) -> Held:
    """Every file under labels/ and dead_letter/ must be a Parquet file of the job (a leftover
    of a killed run there fails the read, which is the point), but for a later run's temporary
    directories, which readers skip (a killed --overwrite run leaves the previous job whole)."""
    import pyarrow.parquet as pq

    label_ids, label, source, dead, samples = [], {}, {}, [], 0
    for sub in ("labels", "dead_letter"):
        root = os.path.join(out, sub)
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".titans-tmp-")]
            for f in sorted(names):
                path = os.path.join(d, f)
                assert f.endswith(".parquet") and d == root, f"not an output shard: {path}"
                t = pq.read_table(path)
                if sub == "labels":
                    samples += f.startswith("sample-")
                    ids = t.column("id").to_pylist()
                    label_ids += ids
                    label.update(zip(ids, t.column("label").to_pylist()))
                    source.update(zip(ids, t.column("source").to_pylist()))
                else:
                    dead += [json.loads(r)["id"] for r in t.column("row").to_pylist()]
    return Held(label_ids, label, source, dead, samples)


# ------------------------------------------------------------------ the subprocess driver

def driver_command(argv: list[str]) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *argv]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from titans.models import student_search
    from titans.pipeline.cli.main import main

    student_search.TRAIN_STEPS = TRAIN_STEPS
    sys.exit(main(sys.argv[1:]))
