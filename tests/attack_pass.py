"""The attacker's pass of issue 16, as a script: `.venv/bin/python tests/attack_pass.py` from the
repository root. Real runs of the `titans` command (in-process runner) try what broke trust
across runs before: models whose hooks or ops run code, --overwrite with a flag that fails
later, two runs into one output, kill -9 and a rerun, glob characters in paths, a symlinked
output inside a recursive input glob, a TFRecord header that lies, a model server lost mid-job
under --overwrite (issue 20). Each case prints PASS or
FAIL with what it saw; the exit code is the number of failures. The tests cover each case on
its own; this is the pass over a fresh clone, end to end (about 40 s on 2 CPUs)."""
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from titans.models.architectures import MLP
from titans.transforms.io.models import save_torchscript

W = tempfile.mkdtemp(prefix="titans-attack-")
PWNED = "/tmp/titans-attack-PWNED"  # what a model's hook would write (a literal in its code)
if os.path.exists(PWNED):
    os.remove(PWNED)
TITANS = [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING"]
RUNNER = ["--runner", "FnApiRunner"]
results = []


def check(name, ok, detail=""):
    results.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def titans(*args, **kw):
    return subprocess.run(TITANS + list(args), capture_output=True, text=True, **kw)


def tree_hash(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def write_data(d, n=3000, files=3, seed=0, start=0):
    os.makedirs(d, exist_ok=True)
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    for i, ids in enumerate(np.array_split(np.arange(start, start + n), files)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x[ids - start].reshape(-1)), 8)
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "features": vec}),
                       os.path.join(d, f"part-{i}.parquet"))


def ids_in(out):
    ids = []
    for sub in ("labels", "dead_letter"):
        for root, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                if f.endswith(".parquet") and not root.count(".titans-tmp"):
                    t = pq.read_table(os.path.join(root, f))
                    if "id" in t.column_names:
                        ids += t.column("id").to_pylist()
    return ids


torch.manual_seed(0)
student, teacher = f"{W}/student.pt", f"{W}/teacher.pt"
save_torchscript(MLP(8, 4, (6,)), student)
save_torchscript(MLP(8, 4, (32, 32)), teacher)
data = f"{W}/data"
write_data(data)
base = ["--input", data, "--student", student, "--teacher", teacher, "--id-column", "id", *RUNNER]

# 1. hooks and ops that run code, and their neighbours
class Hooked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = MLP(8, 4, (6,))

    def forward(self, x):
        return self.inner(x)


from typing import Tuple  # noqa: E402


def pre_hook(module: torch.nn.Module, args: Tuple[torch.Tensor]) -> None:
    torch.save(args[0], "/tmp/titans-attack-PWNED")


for kind in ("pre-hook on submodule", "from_file in forward", "manual_seed in submodule"):
    m = Hooked()
    if kind == "pre-hook on submodule":
        m.inner.register_forward_pre_hook(pre_hook)
        s = torch.jit.script(m)
    elif kind == "from_file in forward":
        class Reader(torch.nn.Module):
            def forward(self, x):
                y = torch.from_file("/etc/passwd", size=4, dtype=torch.uint8)
                return x[:, :4] + y.sum().float()
        s = torch.jit.script(Reader())
    else:
        class Seeder(torch.nn.Module):
            def forward(self, x):
                torch.manual_seed(1234)
                return x[:, :4]
        m.inner = Seeder()
        s = torch.jit.script(m)
    path = f"{W}/evil.pt"
    torch.jit.save(s, path)
    done = titans("run", "--input", data, "--student", path, "--teacher", teacher, *RUNNER,
                  "--output", f"{W}/evil-out")
    check(f"model with {kind} refused", done.returncode == 2 and not os.path.exists(PWNED)
          and "--trust-model-code" in done.stderr, done.stderr.strip().splitlines()[-1][:160])
    shutil.rmtree(f"{W}/evil-out", ignore_errors=True)

# 2. a finished run survives --overwrite with a bad runner / a device it cannot use
out = f"{W}/out"
done = titans("run", *base, "--output", out)
check("clean run", done.returncode == 0 and sorted(ids_in(out)) == list(range(3000)), done.stderr[-200:])
before = tree_hash(out)
for extra in (["--runner", "NoSuchRunner"], ["--teacher-device", "cuda"], ["--student-device", "cuda"]):
    done = titans("run", *base, "--output", out, "--overwrite", *extra)
    check(f"--overwrite {' '.join(extra)} deletes nothing", done.returncode == 2 and tree_hash(out) == before,
          done.stderr.strip().splitlines()[-1][:160] if done.stderr.strip() else "")

# 3. two runs into one output
out2 = f"{W}/out2"
procs = [subprocess.Popen(TITANS + ["run", *base, "--output", out2], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) for _ in range(2)]
codes = sorted(p.wait() for p in procs)
errs = " ".join(p.stderr.read() for p in procs)
check("two concurrent runs: one refused, one exact", codes == [0, 2] and sorted(ids_in(out2)) == list(range(3000)),
      f"codes {codes}; {[l for l in errs.splitlines() if 'lock' in l or 'in use' in l][:1]}")

# 4. kill -9, then rerun
big = f"{W}/big"
write_data(big, n=2000000, files=2, seed=1)
out3 = f"{W}/out3"
p = subprocess.Popen(TITANS + ["run", "--input", big, "--student", student, "--teacher", teacher,
                               "--id-column", "id", *RUNNER, "--output", out3, "--batch-size", "4096"],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.time() + 60
while not os.path.exists(f"{out3}/_titans_lock") and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # mid-processing: the lock is taken just before the pipeline runs
os.killpg(p.pid, signal.SIGKILL)
p.wait()
no_success = not os.path.exists(f"{out3}/_SUCCESS")
again = titans("run", "--input", big, "--student", student, "--teacher", teacher, "--id-column", "id",
               *RUNNER, "--output", out3)
forced = titans("run", "--input", big, "--student", student, "--teacher", teacher, "--id-column", "id",
                *RUNNER, "--output", out3, "--overwrite")
ids = ids_in(out3)
check("kill -9: no _SUCCESS; rerun refused; --overwrite exact", no_success and again.returncode == 2
      and forced.returncode == 0 and len(ids) == 2000000 and len(set(ids)) == 2000000,
      f"rerun rc {again.returncode}, overwrite rc {forced.returncode}, ids {len(ids)}/{len(set(ids))}")

# 5. literal paths: glob characters in names, locally
for name in ("in[x] *?", "in{a,b}"):
    d = f"{W}/{name}"
    write_data(d, n=300, files=1, seed=3)
    o = f"{W}/o[1Z]"
    os.makedirs(f"{W}/o1", exist_ok=True)
    open(f"{W}/o1/keep", "w").write("x")
    done = titans("run", "--input", d, "--student", student, "--teacher", teacher, "--id-column", "id",
                  *RUNNER, "--output", o, "--overwrite")
    check(f"input dir {name!r}, output 'o[1Z]': exact, neighbour o1 untouched", done.returncode == 0 and
          sorted(ids_in(o)) == list(range(300)) and os.path.exists(f"{W}/o1/keep"), done.stderr[-200:])

# 6. symlinked output inside a recursive input glob
root = f"{W}/sym"
write_data(f"{root}/in", n=500, files=1, seed=4)
os.makedirs(f"{root}/real-out")
os.symlink(f"{root}/real-out", f"{W}/link-out")
for i in range(2):
    done = titans("run", "--input", f"{root}/**/*.parquet", "--student", student, "--teacher", teacher,
                  "--id-column", "id", *RUNNER, "--output", f"{W}/link-out", "--overwrite")
check("symlinked output inside a ** input, rerun with --overwrite", done.returncode == 0 and
      sorted(ids_in(f"{W}/link-out")) == list(range(500)), done.stderr[-200:])

# 7. a TFRecord header that lies (valid length CRC), uncompressed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from example_wire import example, frame, masked_crc as masked  # noqa: E402


recs = [example({"id": ("int64", [i]), "features": ("float", [float(v) for v in np.random.default_rng(i).normal(size=8)])}) for i in range(200)]
tf = f"{W}/tf"
os.makedirs(tf)
with open(f"{tf}/a.tfrecord", "wb") as f:
    for r in recs[:20]:
        f.write(frame(r))
    hdr = struct.pack("<Q", 1 << 62)
    f.write(hdr + struct.pack("<I", masked(hdr)))
    for r in recs[20:]:
        f.write(frame(r))
done = titans("run", "--input", tf, "--student", student, "--teacher", teacher, "--id-column", "id",
              *RUNNER, "--output", f"{W}/tf-out")
labeled = [i for i in ids_in(f"{W}/tf-out") if i is not None]
check("TFRecord header declaring 2^62 bytes: 200 good records labeled, the lie dead-lettered",
      done.returncode == 0 and sorted(labeled) == list(range(200)), done.stdout.splitlines()[:1])

# 8. a model server lost mid-job (issue 20): the job fails, and --overwrite keeps the old output
from fault_models import save_class_model  # noqa: E402

flaky = save_class_model(W, "FailsAfterLaunch", 8, 4, (6,), error="connection")


def outputs_hash(d):  # the output as a reader sees it: not a later run's temporary files
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            p = os.path.join(root, f)
            if ".titans-tmp-" not in p:
                h.update(p.encode())
                h.update(open(p, "rb").read())
    return h.hexdigest()


before = outputs_hash(out)
done = titans("run", "--input", data, "--student", student, *flaky, "--id-column", "id", *RUNNER,
              "--output", out, "--overwrite", "--deferral-rate", "0.5",
              env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                  p for p in (os.path.dirname(os.path.abspath(__file__)),
                              os.environ.get("PYTHONPATH")) if p)))
last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
check("teacher losing its connection mid-job: exit 1, one line, nothing dead-lettered, "
      "the previous labels and _SUCCESS kept", done.returncode == 1 and "job failed: ConnectionError"
      in last and outputs_hash(out) == before and sorted(ids_in(out)) == list(range(3000)),
      last[:160])

print("\n".join(f"{'PASS' if ok else 'FAIL'} {n}" for n, ok in results))
print(f"{sum(ok for _, ok in results)} passed, {sum(not ok for _, ok in results)} failed")
shutil.rmtree(W, ignore_errors=True)
sys.exit(sum(not ok for _, ok in results))
