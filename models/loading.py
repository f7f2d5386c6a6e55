"""Load and save the models a cascade runs.

A model is a file path or URL (anything Beam's FileSystems or fsspec can open):
  * a TorchScript file (``torch.jit.save``),
  * a ``torch.export`` program (``.pt2``, ``torch.export.save``),
  * a state_dict, together with ``model_class="package.module:Class"``.
Its forward takes float32 ``[batch, features]`` and returns logits ``[batch, outputs]``.

Model files run no code unless the user opts in (``trust_code``, ``--trust-model-code``)
------------------------------------------------------------------------------------
Formats are told by content, never by the file's name. What torch 2.13 does with each, and
what we refuse without ``trust_code`` (a ModelLoadError that names the flag):

* state_dict: ``torch.load(weights_only=True)``, a restricted unpickler that builds only
  tensors and plain containers. A pickle that needs more is refused.
* torch.export: ``torch.export.load`` trusts the file completely. It unpickles in full the
  weights and constants whose config says ``use_pickle`` and "opaque" constants
  (``pickle.loads``); it retries the sample inputs (always a pickle) and legacy
  ``data/weights|constants/<model>.pt`` members with ``weights_only=False`` when the
  restricted load fails, as does its fallback to the pre-2.7 layout (members at the zip's
  root); it dlopens AOTInductor libraries (``data/aotinductor/``); it passes each shape
  expression to ``sympy.sympify``, which is Python ``eval``, and ``exec``s the program's
  ``guards_code``; a pytree spec may import any module; and the graph may call operators that
  read or write files (``aten::from_file``) or torch functions that import modules.
  So before torch reads the archive we read it with torch's own archive reader and accept only
  what ``torch.export.save`` writes for a plain program: raw weights and constants, sample
  inputs that load with ``weights_only=True``, shape expressions and guards that are
  arithmetic on sizes, tuple/list/dict pytree specs; once loaded, the graph may call only aten
  operators (not the file ones) and arithmetic on sizes. A normal ``torch.export.save`` of a
  module passes (it stores weights raw); programs with tensor subclasses, custom objects,
  higher-order ops or AOTInductor code need the flag.
* TorchScript: ``torch.jit.load`` uses TorchScript's own unpickler, which cannot reach Python
  (a ``data.pkl`` naming ``os.system`` fails to load, flag or not). But the file's TorchScript
  code runs, at load in any ``__setstate__`` and at every call, and it may call any registered
  operator: ``aten::save`` and ``aten::from_file`` write and read any path (a crafted file
  writes a file of its choosing while being loaded). PyTorch's security policy says to treat
  TorchScript as code. So we refuse a file that mentions ``__setstate__`` and, once loaded and
  before anything is called, any method that calls a file or RPC operator, an operator outside
  aten/prim, a call we cannot inline, or uses objects of TorchScript classes (their methods run
  implicitly: ``with`` runs ``__enter__``, sorting runs ``__lt__``), ``with torch.no_grad()``
  in ``forward`` included.
* Anything else (``torch.save(model)``, a plain pickle) needs full unpickling: refused.

With ``trust_code`` no check runs, and ``torch.load(weights_only=False)`` reads a pickled
``nn.Module`` (``torch.save(model)``, its class importable) or a state_dict checkpoint holding
other objects: the user has said the file is as trusted as their own code.

Limits: this covers the ways we found for torch 2.13 to run a model file's code. It does not
guard against memory-safety bugs in torch's C++ readers (PyTorch supports loading TorchScript
and export files only from trusted sources), nor bound the memory or time a model takes.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import json
import operator
import re
import zipfile

import torch

from titans.models.storage import read_bytes


class ModelLoadError(ValueError):
    """A model file could not be turned into a runnable module; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where a model lives, how to build it, and where it should run ('cpu', 'cuda' or 'auto').

    ``trust_code``: the user allows model files that can run code when loaded (pickled
    members of a torch.export archive); off by default.
    """
    path: str
    model_class: str | None = None
    model_kwargs: str | None = None  # JSON object of the class's constructor arguments
    device: str = "cpu"
    trust_code: bool = False

    def load(self, device: str) -> torch.nn.Module:
        kwargs = json.loads(self.model_kwargs) if self.model_kwargs else None
        return load_model(self.path, self.model_class, kwargs, device=device,
                          trust_code=self.trust_code)


def import_class(spec: str):
    """``"package.module:Class"`` -> the class object."""
    if ":" not in spec:
        raise ModelLoadError(f"model class {spec!r} must look like 'package.module:Class'")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import model class {spec!r}: {e}") from e
    return obj


def load_model(path: str, model_class: str | None = None, model_kwargs: dict | None = None,
               device: str = "cpu", trust_code: bool = False) -> torch.nn.Module:
    """Load a model for inference (eval mode, on ``device``). Raises ModelLoadError with the reason.

    Without ``trust_code`` a file that could run code when loaded or called is refused (see
    the module docstring)."""
    try:
        data = read_bytes(path)
    except Exception as e:  # noqa: BLE001 - any IO failure becomes one clear message
        raise ModelLoadError(f"cannot read model file {path!r}: {e}") from e
    buf = io.BytesIO(data)
    try:
        if model_class:
            model = _load_state_dict(buf, model_class, model_kwargs, device, trust_code)
        elif _is_export_archive(data):
            if not trust_code:
                _check_export_archive(data)
            program = torch.export.load(buf)
            if not trust_code:
                _check_ops(program)
            model = program.module()
        elif _is_torchscript(data):
            if not trust_code and _mentions(data, b"__setstate__"):
                raise _Unsafe("its TorchScript code has a __setstate__ method, which runs while "
                              "the file is loaded")
            model = torch.jit.load(buf, map_location=device)
            if not trust_code:
                _check_ops(model)
        elif trust_code:
            model = torch.load(buf, map_location=device, weights_only=False)
            if not isinstance(model, torch.nn.Module):
                raise ModelLoadError(f"cannot load model {path!r}: it holds a "
                                     f"{type(model).__name__}, not a module. If it is a "
                                     "state_dict, also pass its class as module:Class.")
        elif data[:1] == b"\x80" or _mentions(data, b"data.pkl"):  # a pickle, zipped or not
            raise _Unsafe("it is a pickle, not TorchScript or torch.export. If it is a state_dict, "
                          "also pass its class as module:Class. A pickled model "
                          "(torch.save(model)) loads only by full unpickling")
        else:
            raise ModelLoadError(f"cannot load model {path!r}: not a TorchScript, torch.export "
                                 "or torch.save file. If it is a state_dict, also pass its class "
                                 "as module:Class.")
    except _Unsafe as e:
        raise ModelLoadError(f"cannot load model {path!r}: {e}. Loading it could run arbitrary "
                             "code on this machine (and on every worker); pass --trust-model-code "
                             "only if you trust the file") from None
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        hint = ("" if model_class else
                " If it is a state_dict, also pass its class as module:Class.")
        raise ModelLoadError(f"cannot load model {path!r}: {type(e).__name__}: {e}.{hint}") from e
    model = model.to(device)
    if hasattr(model, "eval"):
        try:
            model.eval()
        except NotImplementedError:  # exported programs refuse .eval(); they are frozen anyway
            pass
    return model


class _Unsafe(Exception):
    """Why a model file could run code; load_model adds the --trust-model-code advice."""


def _load_state_dict(buf, model_class, model_kwargs, device, trust_code) -> torch.nn.Module:
    cls = import_class(model_class)
    try:
        state = torch.load(buf, map_location=device, weights_only=not trust_code)
    except Exception as e:  # noqa: BLE001
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if trust_code or not refused:
            raise
        raise _Unsafe(f"its pickle builds {refused.group(1)}, not just tensors") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = cls(**(model_kwargs or {}))
    model.load_state_dict(state)
    return model


def _zip_names(data: bytes) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        return []


def _is_export_archive(data: bytes) -> bool:
    """torch.export archives are zips holding a serialized ExportedProgram, unlike TorchScript."""
    return any(n.split("/")[-1] == "archive_format" for n in _zip_names(data))


def _is_torchscript(data: bytes) -> bool:
    return any(n.split("/")[-1] == "constants.pkl" for n in _zip_names(data))


def _mentions(data: bytes, word: bytes) -> bool:
    """``word`` in the raw file or in any zip member, compressed or not, duplicates included
    (a zip reader other than Python's might pick another copy of a name)."""
    if word in data:
        return True
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any(word in z.open(info).read() for info in z.infolist())
    except zipfile.BadZipFile:
        return False


# --- torch.export archives -------------------------------------------------------------

# Every member torch.export.save writes for a plain program (names inside the archive's
# folder). Others are what torch would unpickle or run: legacy weights/constants
# (data/weights/model.pt), custom_obj_/opaque_obj_ constants, data/aotinductor/, ...
_EXPORT_MEMBER = re.compile(
    r"archive_format|archive_version|byteorder|\.data/(version|serialization_id)|extra/.+"
    r"|models/\w+\.json|data/sample_inputs/\w+\.pt"
    r"|data/weights/(weight_\d+|\w+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|\w+_constants_config\.json)")


def _check_export_archive(data: bytes) -> None:
    """Refuse an archive unless torch.export.load would only read raw tensors, JSON and
    weights_only pickles from it, and evaluate only arithmetic."""
    names = _zip_names(data)
    # If the current layout fails to load, torch.export.load retries the pre-2.7 one, whose
    # members sit at the zip's root and are unpickled with a weights_only=False retry.
    if len(set(names)) != len(names) or len({n.split("/")[0] for n in names}) != 1 \
            or not all("/" in n for n in names):
        raise _Unsafe("its zip does not have torch.export.save's layout (one top folder, no "
                      "duplicate names)")
    from torch.export.pt2_archive._package import PT2ArchiveReader

    reader = PT2ArchiveReader(io.BytesIO(data))  # what torch.export.load reads, as it reads it
    for name in reader.get_file_names():
        if not _EXPORT_MEMBER.fullmatch(name):
            raise _Unsafe(f"it holds {name!r}, which is not part of a plain torch.export program "
                          "(torch would unpickle or run it)")
        content = reader.read_bytes(name)
        if name.endswith("_config.json"):
            for fqn, entry in json.loads(content)["config"].items():
                if entry.get("use_pickle") is not False or not re.fullmatch(
                        r"(weight|tensor)_\d+", str(entry.get("path_name"))):
                    raise _Unsafe(f"{name} stores {fqn!r} as a pickle, which torch.export.load "
                                  "unpickles in full")
        elif name.startswith("data/sample_inputs/"):
            try:  # torch tries exactly this first and falls back to a full unpickle
                torch.load(io.BytesIO(content), weights_only=True)
            except Exception:  # noqa: BLE001
                raise _Unsafe(f"its sample inputs ({name}) are not plain tensors, and "
                              "torch.export.load would unpickle them in full") from None
        elif name.startswith("models/"):
            _check_program_json(json.loads(content))


# Names a shape expression may use: sympy's srepr of sizes, and torch's sympy functions.
_SYMPY_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Max Min Abs Mod floor ceiling Equality Unequality "
    "StrictLessThan StrictGreaterThan LessThan GreaterThan Eq Ne Lt Le Gt Ge And Or Not "
    "Piecewise ExprCondPair oo int_oo zoo nan true false FloorDiv ModularIndexing Where PythonMod "
    "CleanDiv CeilToInt FloorToInt CeilDiv IntTrueDiv FloatTrueDiv LShift RShift "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat "
    "FloatPow PowByNatural Identity".split())
_SYMPY_FLAGS = frozenset("positive negative nonnegative nonpositive integer real finite "
                         "precision evaluate commutative zero nonzero even odd".split())
_SIZE_METHODS = frozenset({"size", "stride", "storage_offset", "dim"})
_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator,
               ast.unaryop, ast.boolop, ast.cmpop, ast.Load)


def _check_program_json(obj) -> None:
    if isinstance(obj, list):
        for value in obj:
            _check_program_json(value)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr_str":  # torch passes it to sympy.sympify, i.e. eval
                _check_arithmetic(value, "shape expression", _sympy_node_ok)
            elif key == "guards_code":  # torch exec()s each one when it calls the module
                for guard in value:
                    # pasted into generated source: no comments, quotes in quotes or newlines
                    if not re.fullmatch(r"[\w\[\]().,' <>=!+\-*/%&|~]*", guard):
                        raise _Unsafe(f"its shape guard {guard!r} is not plain arithmetic")
                    _check_arithmetic(guard, "shape guard", _guard_node_ok)
            elif key in ("in_spec", "out_spec") and isinstance(value, str):
                spec = json.loads(value)
                _check_treespec(spec[1] if isinstance(spec, list) and len(spec) == 2 else None)
            else:
                _check_program_json(value)


def _check_arithmetic(text, what: str, node_ok) -> None:
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, TypeError, ValueError):
        tree = None
    if tree is None or not all(isinstance(n, _ARITHMETIC) or node_ok(n) for n in ast.walk(tree)):
        raise _Unsafe(f"its {what} {text!r} is not plain arithmetic, and torch evaluates it as "
                      "Python")


def _sympy_node_ok(node) -> bool:
    """``Add(Mul(Integer(2), Symbol('s77', positive=True, integer=True)), Integer(1))``."""
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and all(
            k.arg in _SYMPY_FLAGS and isinstance(k.value, ast.Constant) for k in node.keywords)
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_NAMES
    if isinstance(node, ast.Constant):  # strings are sympified again: symbol names, numbers
        return (isinstance(node.value, (int, float)) or isinstance(node.value, str)
                and re.fullmatch(r"[a-z]+\d+|[-+]?[\d.]+(e[-+]?\d+)?", node.value) is not None)
    return isinstance(node, ast.keyword)


def _guard_node_ok(node) -> bool:
    """``L['x'].size()[0] > 4``: sizes of the inputs, compared and combined."""
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Attribute) and not node.keywords
    if isinstance(node, ast.Attribute):
        return node.attr in _SIZE_METHODS
    if isinstance(node, ast.Name):
        return node.id == "L"
    if isinstance(node, ast.Constant):
        return (isinstance(node.value, (int, float)) or isinstance(node.value, str)
                and re.fullmatch(r"[A-Za-z_]\w*", node.value) is not None)
    return isinstance(node, ast.Subscript)


def _check_treespec(spec) -> None:
    """Inputs and outputs nest in tuples, lists and dicts; other pytree types, and dict keys
    that are not plain (torch reads them with a hook that imports modules), are refused."""
    ok = isinstance(spec, dict) and spec.get("type") in (None, "builtins.tuple", "builtins.list",
                                                           "builtins.dict")
    if ok and spec.get("context") is not None:
        context = json.loads(spec["context"])
        ok = context is None or isinstance(context, list) and all(
            isinstance(k, (str, int)) for k in context)
    if not ok:
        raise _Unsafe("its input or output structure is not made of tuples, lists and dicts")
    for child in spec.get("children_spec", []):
        _check_treespec(child)


# --- operators a loaded model may call ------------------------------------------------

_FILE_OPS = frozenset({"aten::save", "aten::from_file"})  # write / read any path
_SCRIPT_OPS_REFUSED = _FILE_OPS | {
    "prim::rpc_async", "prim::rpc_sync", "prim::rpc_remote", "prim::PythonOp",
    "prim::IgnoredPythonOp",
    "prim::CallMethod", "prim::CallFunction"}  # left after inlining: calls we cannot see into


def _check_ops(model) -> None:
    """Before anything is called: every operator the model can reach is a plain tensor op."""
    if isinstance(model, torch.export.ExportedProgram):
        from torch._export.serde.serialize import _SYM_OPS  # arithmetic on sizes

        for module in model.graph_module.modules():
            for node in getattr(getattr(module, "graph", None), "nodes", ()):
                target = node.target
                if node.op == "call_function" and not (
                        target in _SYM_OPS or target is operator.getitem
                        or isinstance(target, torch._ops.OpOverload)
                        and target.namespace == "aten" and target.name() not in _FILE_OPS):
                    raise _Unsafe(f"its graph calls {target}, which is not a plain aten operator")
        return
    # Objects of TorchScript classes (and torchbind objects) have methods that run without a
    # call in the graph (with-statements run __enter__, sorting runs __lt__, ...): refused.
    modules = {m._c._type().qualified_name() for m in model.modules()}
    for module in model.modules():
        for name in module._c._method_names():
            _check_script_graph(module._c._get_method(name).inlined_graph, name, modules)


def _check_script_graph(graph, method: str, modules: set[str]) -> None:
    for node in graph.nodes():
        kind = node.kind()
        if kind in _SCRIPT_OPS_REFUSED or kind.split("::")[0] not in ("aten", "prim"):
            raise _Unsafe(f"its TorchScript method {method} calls {kind}")
        for value in [*node.inputs(), *node.outputs()]:
            if _is_object_type(value.type(), modules):
                raise _Unsafe(f"its TorchScript method {method} uses {value.type()} objects, "
                              "whose methods we do not check")
        for block in node.blocks():
            _check_script_graph(block, method, modules)
        if node.hasAttribute("Subgraph"):  # prim::fork and fused groups
            _check_script_graph(node.g("Subgraph"), method, modules)


def _is_object_type(t, modules: set[str]) -> bool:
    if t.kind() in ("ClassType", "InterfaceType"):
        return t.qualified_name() not in modules
    return any(_is_object_type(c, modules) for c in t.containedTypes())


def save_torchscript(model: torch.nn.Module, path: str, metadata: dict | None = None) -> None:
    """Save a module as TorchScript (what the pipeline reads), with optional JSON metadata."""
    model = model.eval()
    scripted = torch.jit.script(model)
    extra = {"titans.json": json.dumps(metadata or {})}
    torch.jit.save(scripted, path, _extra_files=extra)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a usable GPU is present, else 'cpu'; 'gpu' is an alias of 'cuda'."""
    device = device.lower()
    if device == "gpu":
        device = "cuda"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but torch sees no usable CUDA GPU "
                             f"(torch {torch.__version__}, cuda build: {torch.version.cuda})")
    return device


def count_parameters(model) -> int:
    """Number of parameters: our proxy for compute per row (an MLP costs ~2 FLOPs per weight)."""
    try:
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - an exported module without parameters()
        return 0
