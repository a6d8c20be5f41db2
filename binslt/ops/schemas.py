"""The ``binslt::`` op schemas, declared once.

Every backend implements exactly these schemas:

* the pure-torch reference (``binslt.reference``) -- the oracle, and the CPU/CUDA kernel of last
  resort when a compiled extension is missing;
* the C++ CPU kernels (``csrc/cpu``), bound with ``TORCH_LIBRARY_IMPL(binslt, CPU, m)``;
* the CUDA kernels (``csrc/cuda``), bound with ``TORCH_LIBRARY_IMPL(binslt, CUDA, m)``;
* the Triton launchers (``kernels/``), registered as ``binslt::<name>_triton`` through
  ``torch.library.triton_op`` with the same signature.

Conventions shared by all ops (see docs/design.md sections 1-2):

* Spikes are packed channel-last, 32 channels per int32 word: bit ``c % 32`` of word ``c // 32``.
  Unused high bits are zero, so zero padding needs no correction.
* ``surrogate`` is an int: 0 = ATan (SpikingJelly's ``surrogate.ATan``), 1 = Sigmoid, 2 = Rect,
  3 = PiecewiseQuadratic (``SURROGATES``).
* ``v_reset=None`` is a soft reset (subtract the threshold); a number is a hard reset to it.
* The epilogue applied to the conv result ``Z`` (``Z = alpha[c] * count`` for the binary conv):
  ``bn_train``: ``Y = (Z - mean_c) / sqrt(var_c + eps) * scale_c + shift_c`` with batch
  statistics over (T, N, spatial); otherwise ``Y = Z * scale_c + shift_c`` (eval BN folded to an
  affine; scale=1, shift=0 without BN). Then ``X = Y + residual`` and the multi-step LIF over T.
"""

from __future__ import annotations

SCHEMAS: dict[str, str] = {
    # x: [B, C, H, W] float, values in {0, 1} -> [B, H, W, ceil(C/32)] int32
    "pack_spikes": "pack_spikes(Tensor x) -> Tensor",
    # packed: [B, H, W, Cw] int32 -> [B, channels, H, W] float32
    "unpack_spikes": "unpack_spikes(Tensor packed, int channels) -> Tensor",
    # weight: [Co, Ci, kh, kw] float, ternary up to a per-channel gain (0 = pruned)
    #   -> (mask bits, positive bits), each [Co, kh, kw, ceil(Ci/32)] int32
    "pack_weight": "pack_weight(Tensor weight) -> (Tensor, Tensor)",
    # Fused binary conv + epilogue + multi-step LIF.
    #   x_packed: [T*N, H, W, Cw] int32; w_mask, w_pos: [Co, kh, kw, Cw] int32
    #   alpha, scale, shift: [Co] float32; residual: [T, N, Co, Ho, Wo] float32 or None
    # -> spikes [T, N, Co, Ho, Wo] float32,
    #    counts [T, N, Co, Ho, Wo] int16 (int32 when Ci*kh*kw > 32767): Z / alpha exactly,
    #    mean, var [Co] float32: batch statistics of Z (biased var) when bn_train, else zeros.
    "bconv_lif": (
        "bconv_lif(Tensor x_packed, Tensor w_mask, Tensor w_pos, Tensor alpha, Tensor scale, "
        "Tensor shift, Tensor? residual, int T, int stride, int padding, bool bn_train, "
        "float bn_eps, float tau, bool decay_input, float v_threshold, float? v_reset) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # Inference form of bconv_lif (eval epilogue, nothing saved for a backward), straight from
    # float spikes: x [T, N, C, H, W] float, values in {0, 1} (the CPU kernel raises ValueError
    # otherwise; the layers check before the other backends), or packed words
    # x [T, N, H, W, Cw] int32 (pack_spikes' layout with the batch split into T, N: a previous
    # layer's packed_out)
    # -> spikes [T, N, Co, Ho, Wo] float32, those of bconv_lif(pack_spikes(x), ...);
    #    pool=2: max_pool2d(spikes, 2) (2x2, stride 2; a max of spikes is their OR), output
    #    [T, N, Co, Ho // 2, Wo // 2] (Ho, Wo >= 2);
    #    packed_out: those spikes as packed words [T, N, Ho', Wo', ceil(Co/32)] int32.
    # The CPU kernel packs each tile's input rows itself, keeps its counts in a per-thread
    # buffer and pools / packs the tile's spikes there: neither a packed copy of the input, nor
    # the counts, nor the unpooled spikes are written out.
    "bconv_lif_infer": (
        "bconv_lif_infer(Tensor x, Tensor w_mask, Tensor w_pos, Tensor alpha, Tensor scale, "
        "Tensor shift, Tensor? residual, int stride, int padding, float tau, bool decay_input, "
        "float v_threshold, float? v_reset, int pool=1, bool packed_out=False) -> Tensor"
    ),
    # Backward of bconv_lif, recomputing H from the saved integer counts (bconv_lif's dtype; the
    # CPU kernel also takes them as int8, the autograd path's copy where every count fits).
    #   grad_spikes: [T, N, Co, Ho, Wo] float32; residual: like it, or a residual of spikes as
    #   pack_spikes words [T, N, Ho, Wo, ceil(Co/32)] int32 (what ConvLIF saves)
    # -> grad_x [T, N, Ci, H, W] float32 (empty [0] when not need_grad_x),
    #    grad_weight [Co, Ci, kh, kw] float32 = dL/dW_eff (W_eff = alpha * sign * mask),
    #    grad_current [T, N, Co, Ho, Wo] float32 = dL/dX (the LIF input; also dL/dresidual;
    #    empty [0] when not need_grad_current: the autograd path asks for it only where there is a
    #    residual, and the CPU kernel then turns dL/dX into dL/dZ in place, one float tensor the
    #    size of the output less at the backward's peak),
    #    grad_scale, grad_shift [Co] float32.
    "bconv_lif_bwd": (
        "bconv_lif_bwd(Tensor grad_spikes, Tensor counts, Tensor x_packed, Tensor w_mask, "
        "Tensor w_pos, Tensor alpha, Tensor scale, Tensor shift, Tensor mean, Tensor var, "
        "Tensor? residual, int in_channels, int stride, int padding, bool bn_train, "
        "float bn_eps, float tau, bool decay_input, float v_threshold, float? v_reset, "
        "bool detach_reset, int surrogate, float surrogate_alpha, bool need_grad_x, "
        "bool need_grad_current=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # Epilogue + multi-step LIF over a real current (dense first layer, linear layers, LIF).
    #   z: [T, N, C, *] float32; scale, shift: [C]; residual: like z or None
    # -> spikes like z, mean [C], var [C]
    "bn_lif": (
        "bn_lif(Tensor z, Tensor scale, Tensor shift, Tensor? residual, bool bn_train, "
        "float bn_eps, float tau, bool decay_input, float v_threshold, float? v_reset) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    # -> grad_z like z, grad_current like z (dL/dX, also dL/dresidual; empty [0] when not
    #    need_grad_current: the autograd path asks for it only where there is a residual, and the
    #    CPU kernel then turns dL/dX into dL/dz in its buffer), grad_scale, grad_shift [C]
    "bn_lif_bwd": (
        "bn_lif_bwd(Tensor grad_spikes, Tensor z, Tensor scale, Tensor shift, Tensor mean, "
        "Tensor var, Tensor? residual, bool bn_train, float bn_eps, float tau, bool decay_input, "
        "float v_threshold, float? v_reset, bool detach_reset, int surrogate, "
        "float surrogate_alpha, bool need_grad_current=True) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

#: Surrogate name -> id, and SpikingJelly's default alpha of each (surrogate.ATan, .Sigmoid,
#: .Rect, .PiecewiseQuadratic).
SURROGATES = {"atan": 0, "sigmoid": 1, "rect": 2, "piecewise_quadratic": 3}
DEFAULT_SURROGATE_ALPHA = {"atan": 2.0, "sigmoid": 4.0, "rect": 1.0, "piecewise_quadratic": 1.0}

# Weight-side ops of the search step: a CPU kernel where it pays, the reference on every other
# device (no Triton or CUDA form: the scores are small next to the activations).
WEIGHT_SCHEMAS: dict[str, str] = {
    # scores: any shape, float32 or float64; keep: how many entries to keep
    # -> {0, 1} mask like scores: the keep largest |s|, ties to the lower flat index (the rule of
    #    binslt.reference.topk_mask, bit for bit)
    "topk_mask": "topk_mask(Tensor scores, int keep) -> Tensor",
    # weight, mask: [Co, Ci, kh, kw] float32; alpha: 0-d or [Co] float32 (the search's gain)
    # -> W_eff = (alpha * sign(weight)) * mask (the reference's float32 expression, bit for bit),
    #    and what pack_weight(W_eff) and max_abs_gain(W_eff) give: mask bits, positive bits
    #    [Co, kh, kw, ceil(Ci/32)] int32, kernel gain [Co] float32
    "sign_gain_pack": (
        "sign_gain_pack(Tensor weight, Tensor mask, Tensor alpha) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # weight, scores: [Co, Ci, kh, kw] float32; keep: how many weights to keep; per_channel:
    # one gain per output channel
    # -> what sign_gain_pack(weight, topk_mask(scores, keep), mean_abs_gain(weight, mask,
    #    per_channel)) gives, in one op without the float mask (the search step's weight side)
    "search_sign_pack": (
        "search_sign_pack(Tensor weight, Tensor scores, int keep, bool per_channel) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # grad (dL/dW_eff), weight, scores: one shape, float32 -> dL/ds = (grad * weight) * sign(scores)
    "search_score_grad": "search_score_grad(Tensor grad, Tensor weight, Tensor scores) -> Tensor",
}

# Helper ops of the network's layout (the training pool's backward, the first layer's eval path):
# a CPU kernel where it pays, the reference on every other device (like the weight side).
AUX_SCHEMAS: dict[str, str] = {
    # The saved counts of a training layer narrowed (ops.ConvLIF keeps them as int8 where every
    # one fits: the CPU backward reads them so).
    #   counts: int16 or int32, any shape
    # -> (int8 like counts: each count clamped to [-128, 127], 0-d bool: whether none was out of
    #    that range), one pass
    "narrow_int8": "narrow_int8(Tensor counts) -> (Tensor, Tensor)",
    # The training 2x2 spike max-pool (ops.SpikePool, ops.ConvLIF with pool=2).
    #   spikes: [B, C, H, W] float32, exactly 0/1 (else ValueError), H, W >= 2
    # -> (pooled [B, C, H // 2, W // 2] float32: each window's max (the OR of its spikes; an odd
    #    last row / column is left out), packed [B, H, W, ceil(C/32)] int32: pack_spikes(spikes),
    #    what the backward routes by)
    "spike_pool2": "spike_pool2(Tensor spikes) -> (Tensor, Tensor)",
    # Backward of the training 2x2 spike max-pool (ops.SpikePool).
    #   packed: [B, H, W, Cw] int32, pack_spikes of the unpooled spikes [B, channels, H, W];
    #   grad: [B, channels, H // 2, W // 2] float32
    # -> grad_x [B, channels, H, W] float32: each window's gradient at its first 1 in row-major
    #    order (its first position when all four are 0), 0 elsewhere and on an odd last
    #    row / column.
    "spike_pool2_bwd": "spike_pool2_bwd(Tensor packed, Tensor grad, int channels) -> Tensor",
    # bconv_lif_bwd of a layer whose spikes were 2x2 max-pooled in training (ops.ConvLIF with
    # pool=2): bconv_lif_bwd(spike_pool2_bwd(pool_packed, grad_pooled), ...) with the same
    # outputs.
    #   grad_pooled: [T, N, Co, Ho // 2, Wo // 2] float32;
    #   pool_packed: [T*N, Ho, Wo, ceil(Co/32)] int32, pack_spikes of the unpooled spikes
    # The CPU kernel routes the pooled gradient inside the LIF backward, a row at a time: the
    # unpooled gradient (one float per output spike) is never stored whole.
    "bconv_lif_bwd_pool2": (
        "bconv_lif_bwd_pool2(Tensor grad_pooled, Tensor pool_packed, Tensor counts, "
        "Tensor x_packed, Tensor w_mask, Tensor w_pos, Tensor alpha, Tensor scale, Tensor shift, "
        "Tensor mean, Tensor var, Tensor? residual, int in_channels, int stride, int padding, "
        "bool bn_train, float bn_eps, float tau, bool decay_input, float v_threshold, "
        "float? v_reset, bool detach_reset, int surrogate, float surrogate_alpha, "
        "bool need_grad_x, bool need_grad_current=True) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor)"
    ),
    # The no-grad eval path of a real-input conv layer (the first layer of direct encoding).
    #   z: [T, N, C, H, W] float32 conv currents (the time stride may be 0: one current expanded
    #   over T); scale, shift: [C] (the eval epilogue z * scale + shift); pool: 1 or 2
    # -> bn_lif's spikes (no residual, eval epilogue), 2x2 max-pooled when pool = 2:
    #    [T, N, C, H/pool, W/pool] float32, or with packed_out pack_spikes words
    #    [T, N, H/pool, W/pool, ceil(C/32)] int32
    "bn_lif_infer": (
        "bn_lif_infer(Tensor z, Tensor scale, Tensor shift, float tau, bool decay_input, "
        "float v_threshold, float? v_reset, int pool, bool packed_out) -> Tensor"
    ),
    # The no-grad eval path of a masked sign-weight conv without a neuron (BinConv2d: ResNet's
    # 1x1 shortcuts) on spikes.
    #   x: float 0/1 spikes [B, C, H, W], or pack_spikes words [B, H, W, ceil(C/32)] int32;
    #   w_mask, w_pos: [Co, kh, kw, Cw]; alpha, scale, shift: [Co]
    # -> [B, Co, Ho, Wo] float32 = (count * alpha) * scale + shift, count = the exact integer
    #    sum(x * sign * M) (the eval BN folded into scale / shift)
    "bconv_affine_infer": (
        "bconv_affine_infer(Tensor x, Tensor w_mask, Tensor w_pos, Tensor alpha, Tensor scale, "
        "Tensor shift, int stride, int padding) -> Tensor"
    ),
    # bconv_lif_infer with the residual a masked sign-weight conv's current (a ResNet block's
    # shortcut in eval): residual = bconv_affine_infer(block_x, sc_mask, sc_pos, sc_alpha,
    # sc_scale, sc_shift, sc_stride, sc_padding) viewed as [T, N, Co, Ho, Wo], the same spikes.
    #   block_x: the block's input, float 0/1 spikes [T, N, C, H, W] or pack_spikes words
    #   [T, N, H, W, ceil(C/32)] int32; the shortcut's output must be the layer's [Co, Ho, Wo].
    # The CPU kernel's onednn route computes the shortcut a chunk of images at a time beside its
    # own counts: its float map is never written whole.
    "bconv_lif_infer_shortcut": (
        "bconv_lif_infer_shortcut(Tensor x, Tensor w_mask, Tensor w_pos, Tensor alpha, "
        "Tensor scale, Tensor shift, Tensor block_x, Tensor sc_mask, Tensor sc_pos, "
        "Tensor sc_alpha, Tensor sc_scale, Tensor sc_shift, int sc_stride, int sc_padding, "
        "int stride, int padding, float tau, bool decay_input, float v_threshold, "
        "float? v_reset, int pool=1, bool packed_out=False) -> Tensor"
    ),
}
