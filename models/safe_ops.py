"""The operator allowlist: what a model file's code may call without ``--trust-model-code``.

``titans.models.model_safety`` checks every operator a TorchScript or torch.export model can
reach against these lists (before loading for torch.export's serialized graph, and again on the
loaded graphs); anything else is refused unless the user trusts the file.

An operator is allowed only when its name (overloads and ``out=`` variants
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
"""
from __future__ import annotations

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
