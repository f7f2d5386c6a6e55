"""Model files run no code unless the user passes --trust-model-code (trust_code=True).

Every booby-trapped file here is real: its payload creates a marker file. Refused loads must
leave no marker, and the same file loaded with trust_code=True must create it, which proves
the trap would have gone off.
"""
import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch

from titans.models.architectures import MLP
from titans.models.loading import ModelLoadError, ModelRef, load_model
from titans.transforms.io.models import load_model_file, save_torchscript

X = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))


def load_file(path, model_class=None, model_kwargs=None, trust_code=False):
    """The file's bytes through titans.models.loading.load_model, named by their path."""
    with open(path, "rb") as f:
        data = f.read()
    return load_model(data, model_class, model_kwargs, trust_code=trust_code, name=str(path))


class Trap:
    """Unpickling this creates ``marker``, then stands in for a zero tensor (or parameter)."""

    def __init__(self, marker, shape=(), kind="zeros"):
        self.marker, self.shape, self.kind = str(marker), tuple(shape), kind

    def __reduce__(self):
        value = f"__import__('torch').zeros({self.shape!r})"
        if self.kind == "parameter":
            value = f"__import__('torch').nn.Parameter({value})"
        return eval, (f"__import__('pathlib').Path({self.marker!r}).touch() or {value}",)


def saved(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def export_bytes(model=None, batch=torch.export.Dim("batch")) -> bytes:
    model = model or MLP(5, 3, (4,)).eval()
    program = torch.export.export(model, (X,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def rezip(data: bytes, edit=lambda name, content: content, add=(), top=(),
          compression=zipfile.ZIP_STORED) -> bytes:
    """The archive with each member (name inside its folder) passed through ``edit`` (None
    drops it), plus ``add`` members in the folder and ``top`` members at the zip's root."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", compression) as dst:
        root = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            inner = info.filename.split("/", 1)[1]
            content = edit(inner, src.read(info))
            if content is not None:
                dst.writestr(f"{root}/{inner}", content)
        for name, content in dict(add).items():
            dst.writestr(f"{root}/{name}", content)
        for name, content in dict(top).items():
            dst.writestr(name, content)
    return out.getvalue()


def edit_json(member: str, change):
    def edit(name, content):
        if name != member:
            return content
        obj = json.loads(content)
        change(obj)
        return json.dumps(obj).encode()
    return edit


def assert_refused(path, marker=None, **kw):
    with pytest.raises(ModelLoadError) as refused:
        load_file(path, **kw)
    message = str(refused.value)
    assert "--trust-model-code" in message and "arbitrary code" in message, message
    assert marker is None or not marker.exists()
    return message


def load_trusted_and_call(path, **kw):
    """What the trap does with trust_code=True: load, then call the model once. Either may
    fail after the payload ran (the traps do not all make a working model)."""
    try:
        load_file(path, trust_code=True, **kw)(X)
    except Exception:  # noqa: BLE001
        pass


# --- torch.export archives ------------------------------------------------------------

WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def pickled_weight(data, marker):
    def edit(name, content):
        if name == "data/weights/weight_0":
            return saved(Trap(marker, (4, 5), "parameter"))
        return edit_json(WEIGHTS, lambda c: c["config"]["net.0.weight"].update(use_pickle=True))(
            name, content)
    return rezip(data, edit)


def pickled_constant(data, marker):
    entry = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    return rezip(data, edit_json(CONSTANTS, lambda c: c["config"].update(c=entry)),
                 add={"data/constants/tensor_0": saved(Trap(marker))})


def opaque_constant(data, marker):
    """torch reads opaque_obj_ constants with pickle.loads, whatever use_pickle says; with
    use_pickle false and a tensor_meta, the payload also passes as raw float32 storage."""
    payload = pickle.dumps(Trap(marker))
    payload += b"\0" * (-len(payload) % 4)  # pickle ignores bytes after its STOP
    meta = {"dtype": 7, "sizes": [{"as_int": len(payload) // 4}], "requires_grad": False,
            "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}],
            "storage_offset": {"as_int": 0}, "layout": 7}
    entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
             "tensor_meta": meta}
    return rezip(data, edit_json(CONSTANTS, lambda c: c["config"].update(c=entry)),
                 add={"data/constants/opaque_obj_0": payload})


def pickled_sample_inputs(data, marker):  # weights_only=True fails, then torch unpickles in full
    return rezip(data, lambda name, content: saved(((Trap(marker),), {}))
                 if name == "data/sample_inputs/model.pt" else content)


def legacy_weights_member(data, marker):  # data/weights/<model>.pt wins over the config
    return rezip(data, add={"data/weights/model.pt": saved({"w": Trap(marker)})})


def shape_expression(data, marker):  # torch passes expr_str to sympy.sympify, i.e. eval
    def change(program):
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
        size["expr_str"] = (f"__import__('pathlib').Path({str(marker)!r}).touch() or "
                            + size["expr_str"])
    return rezip(data, edit_json(PROGRAM, change))


def guards_code(data, marker):  # torch exec()s guards when the module is called
    guard = f"__import__('pathlib').Path({str(marker)!r}).touch() or True"
    return rezip(data, edit_json(PROGRAM, lambda p: p.update(guards_code=[guard])))


def pre_2_7_layout(data, marker):
    """No archive_version: the new reader fails, and torch.export.load retries the old layout
    from members at the zip's root, unpickling them in full when weights_only=True fails."""
    from torch._export.serde.schema import SCHEMA_VERSION

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        program = z.read(next(n for n in z.namelist() if n.endswith(PROGRAM)))
    return rezip(data, lambda name, content: None if name == "archive_version" else content,
                 top={"version": ".".join(map(str, SCHEMA_VERSION)),
                      "serialized_exported_program.json": program,
                      "serialized_state_dict.pt": saved({}),
                      "serialized_constants.pt": saved({"c": Trap(marker)}),
                      "serialized_example_inputs.pt": saved(((), {}))})


EXPORT_TRAPS = [pickled_weight, pickled_constant, opaque_constant, pickled_sample_inputs,
                legacy_weights_member, shape_expression, guards_code, pre_2_7_layout]


@pytest.mark.parametrize("trap", EXPORT_TRAPS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", ["model.pt2", "model.pt"])
def test_booby_trapped_export_archive_is_refused_whatever_its_name(tmp_path, trap, name):
    marker = tmp_path / "ran"
    path = tmp_path / name
    path.write_bytes(trap(export_bytes(), marker))
    assert_refused(path, marker)
    with pytest.raises(ModelLoadError, match="--trust-model-code"):
        load_model_file(ModelRef(str(path)), "cpu")
    assert not marker.exists()


@pytest.mark.parametrize("trap", EXPORT_TRAPS, ids=lambda t: t.__name__)
def test_the_same_archive_with_trust_code_runs_its_payload(tmp_path, trap):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt2"
    path.write_bytes(trap(export_bytes(), marker))
    load_trusted_and_call(path)
    assert marker.exists()


def test_trusted_archive_with_a_pickled_weight_loads_and_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickled_weight(export_bytes(), marker))
    model = load_model_file(ModelRef(str(path), trust_code=True), "cpu")
    assert marker.exists() and model(X).shape == (7, 3)


def test_export_archive_holding_a_shared_library_is_refused(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(rezip(export_bytes(), add={"data/aotinductor/model/model.so": b"\x7fELF"}))
    assert "data/aotinductor/model/model.so" in assert_refused(path)


def test_export_graph_that_reads_a_file_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"key!")

    def read_secret(program):
        graph = program["graph_module"]["graph"]
        graph["nodes"].insert(0, {
            "target": "torch.ops.aten.from_file.default", "name": "leak", "metadata": {},
            "inputs": [{"name": "filename", "arg": {"as_string": str(secret)}, "kind": 1},
                       {"name": "shared", "arg": {"as_none": True}, "kind": 1},
                       {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                       {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}],
            "outputs": [{"as_tensor": {"name": "leak"}}], "is_hop_single_tensor_return": None})
        graph["tensor_values"]["leak"] = {
            "dtype": 1, "sizes": [{"as_int": 4}], "requires_grad": False, "layout": 7,
            "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}],
            "storage_offset": {"as_int": 0}}
        graph["outputs"].append({"as_tensor": {"name": "leak"}})
        program["graph_module"]["signature"]["output_specs"].append(
            {"user_output": {"arg": {"as_tensor": {"name": "leak"}}}})
        leaf = {"type": None, "context": None, "children_spec": []}
        program["graph_module"]["module_call_graph"][0]["signature"]["out_spec"] = json.dumps(
            [1, {"type": "builtins.tuple", "context": "null", "children_spec": [leaf, leaf]}])

    path = tmp_path / "model.pt2"
    path.write_bytes(rezip(export_bytes(), edit_json(PROGRAM, read_secret)))
    assert "aten.from_file" in assert_refused(path)
    _, leaked = load_file(path, trust_code=True)(X)  # the trap is real
    assert bytes(leaked.tolist()) == b"key!"


def test_plain_exports_load_without_the_flag(tmp_path):
    """torch.export.save writes weights raw (use_pickle false); sample inputs are a pickle of
    tensors that weights_only=True reads. Shape guards from a branch on a size also pass."""
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 4 else x

    data = export_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        config = json.loads(z.read(next(n for n in z.namelist() if n.endswith(WEIGHTS))))
    assert not any(entry["use_pickle"] for entry in config["config"].values())
    for name in ("m.pt2", "m.pt"):
        (tmp_path / name).write_bytes(data)
        assert load_file(tmp_path / name)(X).shape == (7, 3)

    branchy = tmp_path / "branchy.pt2"
    branchy.write_bytes(export_bytes(Branchy(), torch.export.Dim.AUTO))
    with zipfile.ZipFile(branchy) as z:
        program = json.loads(z.read(next(n for n in z.namelist() if n.endswith(PROGRAM))))
    assert program["guards_code"]  # e.g. "L['x'].size()[0] > 4"
    torch.testing.assert_close(load_file(branchy)(X), X * 2)


def test_input_structure_that_imports_a_module_is_refused(tmp_path, monkeypatch):
    """pytree reads dict keys with a JSON hook that imports any module an "__enum__" names."""
    marker = tmp_path / "ran"
    (tmp_path / "trap_module.py").write_text(
        f"import enum, pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "class E(enum.Enum):\n    A = 'a'\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def import_trap(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        version, spec = json.loads(signature["in_spec"])
        spec["children_spec"][1]["context"] = json.dumps(
            [{"__enum__": True, "fqn": "trap_module:E", "name": "A"}])
        signature["in_spec"] = json.dumps([version, spec])

    path = tmp_path / "model.pt2"
    path.write_bytes(rezip(export_bytes(), edit_json(PROGRAM, import_trap)))
    assert_refused(path, marker)
    load_trusted_and_call(path)
    assert marker.exists()


# --- TorchScript ----------------------------------------------------------------------

class WritesOnLoad(torch.nn.Module):
    """TorchScript runs __setstate__ while loading; aten::save writes any path."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.zeros(3, 5)

    def forward(self, x):
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, torch.Tensor]:
        return self.marker, self.training, self.weight

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, torch.Tensor]) -> None:
        self.marker, self.training, self.weight = state
        torch.save("written by the model file", self.marker)


class WritesOnCall(torch.nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        torch.save("written by the model file", self.marker)
        return x[:, :3]


class ReadsOnCall(torch.nn.Module):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def forward(self, x):
        return x[:, :3] + torch.from_file(self.secret, size=3, dtype=torch.uint8)


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file")
def test_torchscript_that_runs_code_on_load_or_call_is_refused(tmp_path):
    marker = tmp_path / "ran"
    on_load, on_call, reads = (str(tmp_path / n) for n in ("load.pt", "call.bin", "read.pt2"))
    torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), on_load)
    torch.jit.save(torch.jit.script(WritesOnCall(str(marker))), on_call)
    (tmp_path / "secret").write_bytes(b"abc")
    torch.jit.save(torch.jit.script(ReadsOnCall(str(tmp_path / "secret"))), reads)
    assert not marker.exists()

    assert "__setstate__" in assert_refused(on_load, marker)
    deflated = tmp_path / "deflated.pt"  # torch reads compressed members too
    deflated.write_bytes(rezip(open(on_load, "rb").read(), compression=zipfile.ZIP_DEFLATED))
    assert b"__setstate__" not in deflated.read_bytes()
    assert "__setstate__" in assert_refused(deflated, marker)
    with pytest.raises(ModelLoadError, match="TorchScript"):  # torch.load refuses it too
        load_file(on_load, "titans.models.architectures:MLP")
    assert not marker.exists()
    assert "aten::save" in assert_refused(on_call, marker)
    assert "aten::from_file" in assert_refused(reads)

    for trap in (on_load, deflated):  # the traps are real
        load_file(trap, trust_code=True)
        assert marker.exists()
        marker.unlink()
    load_file(on_call, trust_code=True)(X)
    assert marker.exists()


def test_torchscript_unpickler_does_not_reach_python(tmp_path):
    """A data.pkl naming os.system fails in TorchScript's own unpickler, even with trust."""
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    save_torchscript(MLP(5, 3, (4,)), str(path))

    class System:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path.write_bytes(rezip(path.read_bytes(), lambda name, content: pickle.dumps(
        System(), protocol=2) if name == "data.pkl" else content))
    for trust_code in (False, True):
        with pytest.raises(ModelLoadError):
            load_file(path, trust_code=trust_code)
    assert not marker.exists()


class Plain(torch.nn.Module):
    """A legitimate model; the traps below are hooks added to it."""

    def __init__(self, path: str = ""):
        super().__init__()
        self.path = path
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def write_before_each_call(module: Plain, inputs: tuple[torch.Tensor]) -> None:
    torch.save("written by a hook of the model file", module.path)


def leak_after_each_call(module: Plain, inputs: tuple[torch.Tensor],
                         output: torch.Tensor) -> torch.Tensor:
    return output * 0 + torch.from_file(module.path, size=3, dtype=torch.uint8)


def scripted_file(tmp_path, model, name="model.pt"):
    path = tmp_path / name
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def test_torchscript_forward_pre_hook_that_writes_a_file_is_refused(tmp_path):
    """torch.jit.load restores hooks and every call runs them; the old check saw only the
    methods (forward), not the hooks."""
    marker = tmp_path / "ran"
    model = Plain(str(marker))
    model.register_forward_pre_hook(write_before_each_call)
    path = scripted_file(tmp_path, model)
    message = assert_refused(path, marker)
    assert "forward pre-hook (write_before_each_call)" in message and "\n" not in message
    trusted = load_file(path, trust_code=True)  # the trap is real
    assert not marker.exists()
    trusted(X)
    assert marker.exists()


def test_torchscript_forward_hook_that_reads_a_file_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"key")
    model = Plain(str(secret))
    model.register_forward_hook(leak_after_each_call)
    path = scripted_file(tmp_path, model)
    assert "forward hook (leak_after_each_call)" in assert_refused(path)
    leaked = load_file(path, trust_code=True)(X)  # the trap is real
    assert bytes(leaked[0].int().tolist()) == b"key"


class Helper(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def record(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.path)
        return x


class CallsHelper(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.helper = Helper(path)
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.helper.record(x))


def test_exported_method_of_a_submodule_that_writes_a_file_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = scripted_file(tmp_path, CallsHelper(str(marker)))
    assert "aten::save" in assert_refused(path, marker)
    load_file(path, trust_code=True)(X)  # the trap is real
    assert marker.exists()


class Reseeds(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1234)
        return x


class CallsReseeds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Reseeds()
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.inner(x))


def test_operator_outside_the_allowlist_in_a_submodule_is_refused(tmp_path):
    """An aten operator that is neither a file nor an RPC one, but not tensor maths either:
    it reseeds the worker's random generator. Refused because it is not on the list."""
    path = scripted_file(tmp_path, CallsReseeds())
    message = assert_refused(path)
    assert "Reseeds.forward calls aten::manual_seed" in message, message
    with torch.random.fork_rng():
        torch.manual_seed(7)
        assert load_file(path, trust_code=True)(X).shape == (7, 3)
        assert torch.initial_seed() == 1234  # the trap is real


def test_torchscript_pickle_naming_a_cpp_class_is_refused_before_loading(tmp_path):
    """torch.classes objects run their C++ __setstate__ while the file loads."""
    path = tmp_path / "model.pt"
    save_torchscript(MLP(5, 3, (4,)), str(path))
    path.write_bytes(rezip(path.read_bytes(), lambda name, content: content.replace(
        b"__torch__.torch.nn.modules.activation\nReLU\n",
        b"__torch__.torch.classes.quantized\nLinearPackedParamsBase\n")
        if name == "data.pkl" else content))
    assert "torch.classes.quantized LinearPackedParamsBase" in assert_refused(path)


def test_export_graph_with_an_operator_outside_the_allowlist_is_refused(tmp_path, capfd):
    class Prints(torch.nn.Module):
        def forward(self, x):
            torch.ops.aten._print("printed by the model file")
            return x[:, :3] * 2

    path = tmp_path / "model.pt2"
    path.write_bytes(export_bytes(Prints()))
    assert "aten._print" in assert_refused(path)
    assert "printed by the model file" not in capfd.readouterr().out
    torch.testing.assert_close(load_file(path, trust_code=True)(X), X[:, :3] * 2)
    assert "printed by the model file" in capfd.readouterr().out  # the trap is real


# --- zips that declare more than they hold ----------------------------------------------

MIB = 1 << 20


def with_deflated_zeros(data: bytes, name: str, mib: int) -> bytes:
    """``data`` (a zip) plus a real deflated member of ``mib`` MiB of zeros, about 1 KiB per
    MiB: a deflate segment for 1 MiB, repeated (a full flush makes each one independent)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = comp.compress(bytes(MIB)) + comp.flush(zlib.Z_FULL_FLUSH)
    stream = segment * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(bytes(MIB), crc)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(zipfile.ZipInfo(name), stream)  # written stored, then marked deflated
        local = dst.infolist()[-1].header_offset
    raw = bytearray(out.getvalue())
    central = raw.rindex(b"PK\x01\x02")  # the last member's central directory entry
    for method, crc_at, size_at in ((local + 8, local + 14, local + 22),
                                    (central + 10, central + 16, central + 24)):
        struct.pack_into("<H", raw, method, zipfile.ZIP_DEFLATED)
        struct.pack_into("<I", raw, crc_at, crc)
        struct.pack_into("<I", raw, size_at, mib * MIB)
    return bytes(raw)


# this process's own high-water mark, in KiB: VmHWM starts afresh at exec, while ru_maxrss
# keeps the forking parent's (a pytest process of ~1 GB late in the suite)
PEAK_MEMORY = """
import sys
from titans.models.loading import ModelLoadError
from titans.transforms.io.models import load_model_file
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = peak()
try:
    load_model_file(sys.argv[1])
    print("loaded")
except ModelLoadError as e:
    print(e)
print(peak() - before)
"""


def test_zip_member_declaring_a_huge_size_is_refused_without_unpacking_it(tmp_path):
    """A 1 MiB model file whose extra member unpacks to 1 GiB (the old scan read each member
    whole). The declared size is checked before anything is read: peak memory stays small."""
    path = tmp_path / "model.pt"
    save_torchscript(MLP(5, 3, (4,)), str(path))
    path.write_bytes(with_deflated_zeros(path.read_bytes(), "model/extra/blob", 1024))
    assert path.stat().st_size < 2 * MIB
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("model/extra/blob").file_size == 1024 * MIB  # a real zip ...
        with z.open("model/extra/blob") as member:
            assert member.read(MIB) == bytes(MIB)  # ... of zeros
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], capture_output=True,
                         text=True, timeout=300)
    *lines, grown_kib = run.stdout.strip().splitlines()
    assert int(grown_kib) < 64 * 1024, f"loading grew the process by {grown_kib} KiB: {lines}"
    message = lines[-1]
    assert "'model/extra/blob': 1024.0 MiB" in message and "--trust-model-code" in message, \
        run.stdout + run.stderr
    # trusted, the file is what it looks like: a model torch loads (it never reads extra/)
    assert load_file(path, trust_code=True)(X).shape == (7, 3)


# --- pickles --------------------------------------------------------------------------

def test_pickled_module_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    model = MLP(5, 3, (4,)).eval()
    model.payload = Trap(marker)
    for name, data in [("zip.pt", saved(model)),
                       ("legacy.pt", saved(model, _use_new_zipfile_serialization=False)),
                       ("model.pt2", saved(model))]:
        (tmp_path / name).write_bytes(data)
        assert "module:Class" in assert_refused(tmp_path / name, marker)
    trusted = load_file(tmp_path / "zip.pt", trust_code=True)
    assert marker.exists()
    torch.testing.assert_close(trusted(X), model(X))


def test_state_dict_whose_pickle_holds_a_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    model = MLP(5, 3, (4,)).eval()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(saved({"state_dict": model.state_dict(), "extra": Trap(marker)}))
    spec = ("titans.models.architectures:MLP", {"in_features": 5, "out_features": 3, "hidden": [4]})
    assert "builds eval" in assert_refused(path, marker, model_class=spec[0],
                                             model_kwargs=spec[1])
    trusted = load_file(path, *spec, trust_code=True)
    assert marker.exists()
    torch.testing.assert_close(trusted(X), model(X))
