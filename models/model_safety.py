"""Vetting untrusted model files: nothing in a file may run unless the user opts in.

``titans.models.loading.load_model`` calls these checks unless ``trust_code``
(``--trust-model-code``) is given. Each raises ``Unsafe`` with one line saying what it found;
``load_model`` adds that ``--trust-model-code`` allows it.

Formats are told by content, never by the file's name. What torch 2.13 does with each:

* Every zip (TorchScript, torch.export, ``torch.save``): torch allocates what a member
  *declares* it unpacks to. torch writes members uncompressed (TorchScript code is deflated,
  and small), so a model file unpacks to about its own size; ``check_zip`` refuses a file
  whose members declare more than ``MAX_EXPANSION`` times the file's size plus
  ``EXPANSION_SLACK`` in all, or a stored member whose two sizes differ, before anything
  is unpacked. Members are then only ever read as a stream, ``CHUNK`` bytes at a time, or
  whole when small (JSON program descriptions: ``MAX_JSON_MEMBER``).
* state_dict: ``torch.load(weights_only=True)``, a restricted unpickler that builds only
  tensors and plain containers. A pickle that needs more is refused.
* torch.export: ``torch.export.load`` trusts the file completely. It unpickles in full the
  weights and constants whose config says ``use_pickle`` and "opaque" constants
  (``pickle.loads``); it retries the sample inputs (always a pickle) and legacy
  ``data/weights|constants/<model>.pt`` members with ``weights_only=False`` when the
  restricted load fails, as does its fallback to the pre-2.7 layout (members at the zip's
  root); it dlopens AOTInductor libraries (``data/aotinductor/``); it passes each shape
  expression to ``sympy.sympify``, which is Python ``eval``, and ``exec``s the program's
  ``guards_code``; a pytree spec may import any module; a node's target is looked up as any
  attribute path under ``torch``/``operator``/``math`` (``torch.load``, ...). So before torch
  reads the archive we read it with torch's own archive reader and accept only what
  ``torch.export.save`` writes for a plain program: raw weights and constants, sample inputs
  that load with ``weights_only=True``, shape expressions and guards that are arithmetic on
  sizes, tuple/list/dict pytree specs, and nodes (in every graph, nested ones included) whose
  target is an ``ALLOWED_ATEN_OPS`` operator or arithmetic on sizes. Once loaded, and before
  ``.module()``, every node of every graph module is checked again, as an object.
  A normal ``torch.export.save`` of a module passes (it stores weights raw); programs with
  tensor subclasses, custom objects, higher-order ops or AOTInductor code need the flag.
* TorchScript: ``torch.jit.load`` uses TorchScript's own unpickler, which cannot reach Python
  (a ``data.pkl`` naming ``os.system`` fails to load, flag or not), but it runs the file's
  TorchScript ``__setstate__`` methods (and the C++ ones of ``torch.classes`` objects) while
  loading, and the file's code runs at every call: ``forward``, every method it calls,
  forward hooks and pre-hooks (which ``torch.jit.load`` restores and ``__call__`` runs);
  PyTorch's security policy says to treat TorchScript as code. That code may call any
  registered operator: ``aten::save`` and ``aten::from_file`` write and read any path,
  ``aten::manual_seed`` reseeds the worker's generator, ``prim::Print`` writes to
  stdout. So, before loading, we refuse a file that mentions ``__setstate__`` anywhere (any
  member, compressed or not) or whose pickles name anything but TorchScript module classes,
  tensors and plain containers (``SCRIPT_PICKLE_GLOBALS``); after loading, before anything is
  called: any forward hook or pre-hook, and any method of any module of the file (every
  method, called from ``forward`` or not; inlined, so the code of what it calls is checked
  where it is called) that calls an operator outside ``ALLOWED_ATEN_OPS`` and
  ``ALLOWED_PRIM_OPS``, a call left after inlining (interfaces), or uses objects of
  TorchScript classes (their methods run implicitly: ``with`` runs ``__enter__``, sorting runs
  ``__lt__``), ``with torch.no_grad()`` in ``forward`` included.
* Anything else (``torch.save(model)``, a plain pickle) needs full unpickling: refused.

The operator allowlist (``ALLOWED_ATEN_OPS``, ``ALLOWED_PRIM_OPS``) and what it holds are in
``titans.models.safe_ops``; an operator outside it is refused without the flag.

With ``trust_code`` no check runs: the user has said the file is as trusted as their own code.

Limits: this covers the ways we found for torch 2.13 to run a model file's code. It does not
guard against memory-safety bugs in torch's C++ readers or kernels (PyTorch supports loading
TorchScript and export files only from trusted sources), nor bound the memory or time a
model's own computation takes, nor the size of a non-zip (legacy) ``torch.save`` pickle.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import io
import json
import operator
import pickletools
import re
import zipfile
import zlib

import torch

# the allowlist, its own module; re-exported here, where the checks use it
from titans.models.safe_ops import (ALLOWED_ATEN_OPS, ALLOWED_PRIM_OPS,  # noqa: F401
                                    aten_op_allowed, script_op_allowed)


class Unsafe(Exception):
    """Why a model file could run code; load_model adds the --trust-model-code advice."""

    advice = ("Loading it could run arbitrary code on this machine (and on every worker); pass "
              "--trust-model-code only if you trust the file")


class Oversized(Unsafe):
    """A zip declares more than a model file unpacks to."""

    advice = ("Unpacking it could exhaust this machine's memory; pass --trust-model-code only "
              "if you trust the file")


# --- zips -----------------------------------------------------------------------------

MAX_EXPANSION = 4  # declared uncompressed bytes, in all, per byte of the file ...
EXPANSION_SLACK = 64 << 20  # ... plus this (small files with deflated TorchScript code)
MAX_JSON_MEMBER = 64 << 20  # a torch.export program description read whole
CHUNK = 1 << 20  # members are scanned this many bytes at a time


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def zip_infos(data: bytes) -> list[zipfile.ZipInfo] | None:
    """The members of a zip (duplicates included), or None if ``data`` is not one."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return z.infolist()
    except zipfile.BadZipFile:
        return None


def check_zip(data: bytes) -> None:
    """Refuse a zip whose members declare more than a model file unpacks to, before reading
    any: torch (and a scan) would allocate what they declare."""
    infos = zip_infos(data)
    if infos is None:
        return
    cap = MAX_EXPANSION * len(data) + EXPANSION_SLACK
    total = 0
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise Oversized(f"its zip member {info.filename!r} is stored uncompressed but declares "
                            f"{info.file_size} bytes in {info.compress_size}")
        total += info.file_size
        if total > cap:
            raise Oversized(f"its zip members declare {_mib(total)} or more unpacked (member "
                            f"{info.filename!r}: {_mib(info.file_size)}) in a {_mib(len(data))} "
                            f"file, over the cap of {MAX_EXPANSION}x the file size + "
                            f"{_mib(EXPANSION_SLACK)}")


def _chunks(z: zipfile.ZipFile, info: zipfile.ZipInfo):
    try:
        with z.open(info) as stream:
            while chunk := stream.read(CHUNK):
                yield chunk
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError,
            zlib.error) as e:
        raise Unsafe(f"its zip member {info.filename!r} cannot be read ({e})") from None


def mentions(data: bytes, word: bytes) -> bool:
    """``word`` in the raw file or in any zip member, compressed or not, duplicates included
    (a zip reader other than Python's might pick another copy of a name). Streams members."""
    if word in data:
        return True
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return False
    with z:
        for info in z.infolist():
            tail = b""
            for chunk in _chunks(z, info):
                window = tail + chunk
                if word in window:
                    return True
                tail = window[-(len(word) - 1):] if len(word) > 1 else b""
    return False


# --- TorchScript archives, before loading ------------------------------------------------

# What TorchScript's pickles name: the file's module classes (whose code we check once
# loaded), tensors and their storages, and TorchScript's own list/tensor helpers. Not
# ``__torch__.torch.classes.*``: C++ objects whose __setstate__ runs while loading.
SCRIPT_PICKLE_GLOBALS = re.compile(
    r"__torch__(\.(?!torch\.classes(\.|$))[\w.]+)? \w+"
    r"|collections OrderedDict|builtins complex|torch device|torch \w+Storage"
    r"|torch\._utils _rebuild_tensor_v2"
    r"|torch\.jit\._pickle (build_intlist|build_doublelist|build_boollist|build_tensorlist"
    r"|build_tensor_from_id|restore_type_tag)")
# Opcodes that name or build a class other than through a GLOBAL we can check.
_PICKLE_OPS_REFUSED = {"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}


def check_torchscript_archive(data: bytes) -> None:
    """Before torch.jit.load: nothing in the file runs while it is loaded."""
    if mentions(data, b"__setstate__"):
        raise Unsafe("its TorchScript code has a __setstate__ method, which runs while the file "
                     "is loaded")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            if info.filename.endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl
                _check_script_pickle(z, info)


def _check_script_pickle(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    buffered = io.BufferedReader(_ChunkReader(_chunks(z, info)), CHUNK)
    stream = _NoTell(buffered.read, buffered.readline)  # genops asks tell() when it can
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "GLOBAL" and not SCRIPT_PICKLE_GLOBALS.fullmatch(str(arg)):
                raise Unsafe(f"its pickle {info.filename!r} names {arg!r}, not a TorchScript "
                             "module, tensor or plain container")
            if op.name in _PICKLE_OPS_REFUSED:
                raise Unsafe(f"its pickle {info.filename!r} uses the {op.name} opcode")
    except ValueError as e:  # pickletools on bytes that are not a pickle
        raise Unsafe(f"its pickle {info.filename!r} cannot be parsed ({e})") from None


@dataclasses.dataclass
class _NoTell:
    read: object
    readline: object


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of chunks (a zip member, read as a stream)."""

    def __init__(self, chunks):
        self._chunks, self._pending = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending:
            self._pending = next(self._chunks, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


# --- torch.export archives, before loading -----------------------------------------------

# Every member torch.export.save writes for a plain program (names inside the archive's
# folder). Others are what torch would unpickle or run: legacy weights/constants
# (data/weights/model.pt), custom_obj_/opaque_obj_ constants, data/aotinductor/, ...
_EXPORT_MEMBER = re.compile(
    r"archive_format|archive_version|byteorder|\.data/(version|serialization_id)|extra/.+"
    r"|models/\w+\.json|data/sample_inputs/\w+\.pt"
    r"|data/weights/(weight_\d+|\w+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|\w+_constants_config\.json)")


def check_export_archive(data: bytes) -> None:
    """Refuse an archive unless torch.export.load would only read raw tensors, JSON and
    weights_only pickles from it, evaluate only arithmetic, and build a graph of allowed
    operators."""
    infos = zip_infos(data) or []
    names = [i.filename for i in infos]
    # If the current layout fails to load, torch.export.load retries the pre-2.7 one, whose
    # members sit at the zip's root and are unpickled with a weights_only=False retry.
    if len(set(names)) != len(names) or len({n.split("/")[0] for n in names}) != 1 \
            or not all("/" in n for n in names):
        raise Unsafe("its zip does not have torch.export.save's layout (one top folder, no "
                     "duplicate names)")
    declared = {i.filename.split("/", 1)[1]: i.file_size for i in infos}
    from torch.export.pt2_archive._package import PT2ArchiveReader

    reader = PT2ArchiveReader(io.BytesIO(data))  # what torch.export.load reads, as it reads it
    for name in reader.get_file_names():
        if not _EXPORT_MEMBER.fullmatch(name):
            raise Unsafe(f"it holds {name!r}, which is not part of a plain torch.export program "
                         "(torch would unpickle or run it)")
        is_json = name.endswith(".json")
        if is_json and declared.get(name, MAX_JSON_MEMBER + 1) > MAX_JSON_MEMBER:
            raise Oversized(f"its program description {name!r} is over {_mib(MAX_JSON_MEMBER)}")
        if not (is_json or name.startswith("data/sample_inputs/")):
            continue  # raw tensors, read by torch as raw bytes
        content = reader.read_bytes(name)  # size checked by check_zip (and above for JSON)
        if name.endswith("_config.json"):
            for fqn, entry in json.loads(content)["config"].items():
                if entry.get("use_pickle") is not False or not re.fullmatch(
                        r"(weight|tensor)_\d+", str(entry.get("path_name"))):
                    raise Unsafe(f"{name} stores {fqn!r} as a pickle, which torch.export.load "
                                 "unpickles in full")
        elif name.startswith("data/sample_inputs/"):
            try:  # torch tries exactly this first and falls back to a full unpickle
                torch.load(io.BytesIO(content), weights_only=True)
            except Exception:  # noqa: BLE001
                raise Unsafe(f"its sample inputs ({name}) are not plain tensors, and "
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
                        raise Unsafe(f"its shape guard {guard!r} is not plain arithmetic")
                    _check_arithmetic(guard, "shape guard", _guard_node_ok)
            elif key in ("in_spec", "out_spec") and isinstance(value, str):
                spec = json.loads(value)
                _check_treespec(spec[1] if isinstance(spec, list) and len(spec) == 2 else None)
            else:
                if key == "nodes" and isinstance(value, list):  # a graph, nested ones too
                    for node in value:
                        _check_serialized_target(node.get("target") if isinstance(node, dict)
                                                 else None)
                _check_program_json(value)


def _check_serialized_target(target) -> None:
    """``torch.ops.aten.linear.default`` or size arithmetic (``_operator.mul``): torch looks
    a target up as any attribute path under torch, operator or math."""
    match = re.fullmatch(r"torch\.ops\.aten\.(\w+)\.(\w+)", str(target))
    if match and aten_op_allowed(match.group(1)) or target in _serialized_sym_ops():
        return
    raise Unsafe(f"its graph calls {target}, which is not on the list of plain tensor operators")


@functools.cache
def _serialized_sym_ops() -> frozenset[str]:
    from torch._export.serde.serialize import _SYM_OPS

    return frozenset(f"{op.__module__}.{op.__name__}" for op in _SYM_OPS)


def _check_arithmetic(text, what: str, node_ok) -> None:
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, TypeError, ValueError):
        tree = None
    if tree is None or not all(isinstance(n, _ARITHMETIC) or node_ok(n) for n in ast.walk(tree)):
        raise Unsafe(f"its {what} {text!r} is not plain arithmetic, and torch evaluates it as "
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
        raise Unsafe("its input or output structure is not made of tuples, lists and dicts")
    for child in spec.get("children_spec", []):
        _check_treespec(child)


# --- loaded models, before anything is called -------------------------------------------

def check_ops(model) -> None:
    """Every operator the model can reach is on the allowlist, and a TorchScript model has no
    hooks (see the module docstring)."""
    if isinstance(model, torch.export.ExportedProgram):
        _check_export_graphs(model)
        return
    # Objects of TorchScript classes (and torchbind objects) have methods that run without a
    # call in the graph (with-statements run __enter__, sorting runs __lt__, ...): refused.
    modules = {m._c._type().qualified_name() for m in model.modules()}
    for module in model.modules():
        kind = module._c._type().qualified_name()
        for what, hooks in (("forward pre-hook", module._c._get_forward_pre_hooks()),
                            ("forward hook", module._c._get_forward_hooks())):
            for hook in hooks:
                raise Unsafe(f"its TorchScript module {kind} has a {what} ({hook.name}), which "
                             "runs on every call; hooks are refused")
        for name in module._c._method_names():
            _check_script_graph(module._c._get_method(name).inlined_graph,
                                f"{kind}.{name}", modules)


def _check_export_graphs(program) -> None:
    from torch._export.serde.serialize import _SYM_OPS  # arithmetic on sizes

    for module in program.graph_module.modules():
        for node in getattr(getattr(module, "graph", None), "nodes", ()):
            target = node.target
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op == "call_function" and (
                    target in _SYM_OPS or target is operator.getitem
                    or isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
                    and aten_op_allowed(target._schema.name.partition("::")[2])):
                continue
            raise Unsafe(f"its graph calls {target} ({node.op}), which is not on the list of "
                         "plain tensor operators")


def _check_script_graph(graph, method: str, modules: set[str]) -> None:
    for node in graph.nodes():
        kind = node.kind()
        if not script_op_allowed(kind):
            raise Unsafe(f"its TorchScript method {method} calls {kind}, which is not on the "
                         "list of plain tensor operators")
        for value in [*node.inputs(), *node.outputs()]:
            if _is_object_type(value.type(), modules):
                raise Unsafe(f"its TorchScript method {method} uses {value.type()} objects, "
                             "whose methods we do not check")
        for block in node.blocks():
            _check_script_graph(block, method, modules)
        if node.hasAttribute("Subgraph"):  # fused groups (their kinds are refused anyway)
            _check_script_graph(node.g("Subgraph"), method, modules)


def _is_object_type(t, modules: set[str]) -> bool:
    if t.kind() in ("ClassType", "InterfaceType"):
        return t.qualified_name() not in modules
    return any(_is_object_type(c, modules) for c in t.containedTypes())
