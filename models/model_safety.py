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

The allowlist. An operator is allowed only when its name (overloads and ``out=`` variants
included) is in ``ALLOWED_ATEN_OPS`` or ``ALLOWED_PRIM_OPS``, or it is the in-place form
(``relu_``) of an allowed aten operator. The lists hold pure tensor maths (pointwise,
reductions, linear algebra, comparisons), neural-network layers (convolution, pooling,
normalisation, dropout, embedding, activations, attention, recurrent cells, upsampling,
padding), shapes, views and indexing, tensor creation from sizes and values (random included),
dtype/device conversion, and TorchScript's control flow, constants, lists, tuples, dicts,
scalar arithmetic, ``raise`` and ``warnings.warn``: what the scripted or exported
``torch.nn`` layers and this project's models (MLPs, image and token models, deferral heads)
need. Not in it, so refused without the flag: file, RPC, printing, profiling, distributed and
quantized operators, global state (``manual_seed``, ``set_grad_enabled``), uninitialised
memory (``empty``) and raw storage access (``set_``, ``as_strided``), async (``fork``), and
every operator of other namespaces. A legitimate model that needs more can be loaded with
the flag.

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


# --- the operator allowlist ------------------------------------------------------------

ALLOWED_ATEN_OPS = frozenset("""
    abs absolute acos acosh add addbmm addcdiv addcmul addmm addmv addr arccos arccosh arcsin
    arcsinh arctan arctan2 arctanh asin asinh atan atan2 atanh baddbmm bitwise_and
    bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift bitwise_xor bmm ceil clamp
    clamp_max clamp_min clip copysign cos cosh cross deg2rad digamma div divide dot einsum erf
    erfc erfinv exp exp2 expm1 fix float_power floor floor_divide floordiv fmax fmin fmod frac
    gcd ger heaviside hypot i0 inner kron lcm lerp lgamma linalg_cross log log10 log1p log2
    logaddexp logaddexp2 logical_and logical_not logical_or logical_xor logit matmul maximum
    minimum mm mul multiply mv nan_to_num neg negative nextafter outer polygamma pow rad2deg
    reciprocal remainder round rsqrt rsub sgn sign signbit sin sinc sinh sqrt square sub
    subtract tan tanh tensordot true_divide trunc vdot xlogy
    __and__ __or__ __xor__ __lshift__ __rshift__ __iand__ __ior__ __ixor__ __ilshift__
    __irshift__

    all amax amin aminmax any argmax argmin argsort bincount bucketize cdist count_nonzero
    cummax cummin cumprod cumsum diff dist frobenius_norm histc kthvalue linalg_matrix_norm
    linalg_norm linalg_vector_norm logcumsumexp logsumexp max mean median min mode msort
    nanmean nanmedian nanquantile nansum norm prod quantile renorm searchsorted sort std
    std_mean sum topk trace unique_consecutive unique_dim var var_mean _unique _unique2

    eq ne lt le gt ge greater greater_equal less less_equal not_equal equal isclose allclose
    isnan isinf isfinite isneginf isposinf isreal is_nonzero where masked_fill masked_scatter
    masked_select nonzero nonzero_static argwhere

    linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
    convolution _convolution conv_tbc
    batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    layer_norm native_layer_norm group_norm native_group_norm instance_norm rms_norm
    dropout feature_dropout alpha_dropout feature_alpha_dropout native_dropout
    embedding embedding_bag _embedding_bag _embedding_bag_forward_only one_hot
    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    relu relu6 gelu silu mish elu selu celu leaky_relu prelu _prelu_kernel rrelu hardtanh
    hardswish hardsigmoid hardshrink softshrink softplus log_sigmoid
    log_sigmoid_forward glu threshold sigmoid softmax log_softmax _softmax _log_softmax
    _masked_softmax cosine_similarity pairwise_distance _euclidean_dist
    scaled_dot_product_attention _scaled_dot_product_attention_math
    _scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu
    _scaled_dot_product_efficient_attention _fused_sdp_choice _native_multi_head_attention
    _transformer_encoder_layer_fwd
    lstm gru rnn_tanh rnn_relu lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
    upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d
    upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d _upsample_bilinear2d_aa
    _upsample_bicubic2d_aa _upsample_lanczos2d_aa __interpolate __upsample
    __upsample_bilinear __upsample_nearest
    grid_sampler grid_sampler_2d grid_sampler_3d affine_grid_generator
    pad constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
    replication_pad2d replication_pad3d _pad_circular _pad_enum
    pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle im2col col2im
    cross_entropy_loss nll_loss nll_loss2d nll_loss_nd mse_loss l1_loss smooth_l1_loss
    huber_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div

    view view_as reshape reshape_as _reshape_alias flatten unflatten squeeze unsqueeze permute
    transpose t numpy_T mT mH adjoint contiguous expand expand_as broadcast_to
    broadcast_tensors repeat repeat_interleave tile narrow select slice index_select gather
    scatter scatter_add scatter_reduce index index_put _index_put_impl index_add index_copy
    index_fill take take_along_dim chunk split split_with_sizes tensor_split unsafe_split
    unsafe_chunk unbind cat concat concatenate stack hstack vstack dstack column_stack flip
    fliplr flipud roll rot90 diagonal diag diag_embed diagflat tril triu movedim moveaxis
    swapaxes swapdims unfold alias _unsafe_view clone detach lift_fresh lift_fresh_copy
    view_copy permute_copy expand_copy slice_copy select_copy squeeze_copy unsqueeze_copy
    t_copy transpose_copy alias_copy unbind_copy split_copy split_with_sizes_copy
    diagonal_copy

    zeros ones full zeros_like ones_like full_like new_zeros new_ones new_full
    arange linspace logspace eye tensor scalar_tensor as_tensor tril_indices triu_indices
    fill zero copy rand randn randint randperm rand_like randn_like randint_like bernoulli
    multinomial normal uniform exponential

    to _to_copy type_as cpu cuda detach item _local_scalar_dense numel size dim stride
    sym_size sym_numel sym_stride is_floating_point is_complex is_contiguous result_type
    can_cast promote_types requires_grad_ _autocast_to_reduced_precision
    _autocast_to_full_precision is_grad_enabled is_autocast_enabled is_autocast_cpu_enabled
    _assert_async _assert_scalar _assert_tensor_metadata sym_constrain_range
    sym_constrain_range_for_size _functional_sym_constrain_range
    _functional_sym_constrain_range_for_size device

    Bool Int Float Complex IntImplicit FloatImplicit ComplexImplicit ScalarImplicit
    __contains__ __derive_index __getitem__ __is__ __isnot__ __not__ __range_length
    __round_to_zero_floordiv _set_item append extend insert pop remove clear reverse len list
    keys values items get dict divmod format str warn
    """.split())
ALLOWED_PRIM_OPS = frozenset("""
    Constant If Loop ListConstruct ListUnpack TupleConstruct TupleUnpack TupleIndex
    TupleSlice DictConstruct GetAttr SetAttr RaiseException Uninitialized unchecked_cast
    device dtype layout is_nested requires_grad type NumToTensor ImplicitTensorToNum shape
    min max abs isinstance is_cuda is_cpu is_meta tolist
    """.split())


def aten_op_allowed(name: str) -> bool:
    """``name`` without the ``aten::`` prefix or overload: listed, or a listed op in place."""
    return name in ALLOWED_ATEN_OPS or (
        name.endswith("_") and not name.endswith("__") and name[:-1] in ALLOWED_ATEN_OPS)


def script_op_allowed(kind: str) -> bool:
    namespace, _, name = kind.partition("::")
    if namespace == "aten":
        return aten_op_allowed(name)
    return namespace == "prim" and name in ALLOWED_PRIM_OPS


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
