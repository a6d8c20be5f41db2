"""The ``binslt::`` library: schema definitions, the reference fallbacks where no compiled
kernel serves a dispatch key, the fake (meta) kernels for torch.compile, the lazily loaded
Triton launchers, and the op lookup per concrete backend (``get_op``)."""

from __future__ import annotations

import threading

import torch

from . import contract as C
from . import library as _ext
from . import reference as ref
from .schemas import AUX_SCHEMAS, SCHEMAS, WEIGHT_SCHEMAS

_lib = torch.library.Library("binslt", "DEF")
for _schema in (*SCHEMAS.values(), *WEIGHT_SCHEMAS.values(), *AUX_SCHEMAS.values()):
    _lib.define(_schema)

# Importing the extensions binds their kernels (TORCH_LIBRARY_IMPL) to the schemas above.
_ext.load()


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"binslt::{name}", key)


# bconv_lif_infer without a kernel of its own runs that device's pack_spikes and bconv_lif
# (compiled where they are), drops the counts, then pools and packs the spikes as asked.
def _infer_via_bconv_lif(x, w_mask, w_pos, alpha, scale, shift, residual, stride, padding, tau,
                         decay_input, v_threshold, v_reset, pool=1, packed_out=False):
    op = "bconv_lif_infer"
    T, n, h, w, cw, packed_in = C.check_infer_input(op, x)
    pack = torch.ops.binslt.pack_spikes
    xp = x.reshape(T * n, h, w, cw) if packed_in else pack(x.flatten(0, 1))
    s = torch.ops.binslt.bconv_lif(xp, w_mask, w_pos, alpha, scale, shift, residual, T,
                                   stride, padding, False, 1e-5, tau, decay_input,
                                   v_threshold, v_reset)[0]
    C.check_pool(op, pool, s.shape[3], s.shape[4])
    return ref.infer_output(s, pool, packed_out, pack)


# Whether the C++ build serves the fused weight side of the search step (read before the
# reference fallbacks below fill the CPU key; a constant, so traced code reads no dispatcher).
_CPU_SEARCH_SIGN_PACK = _has_kernel("search_sign_pack", "CPU")

# Where a compiled kernel is missing, the reference serves that dispatch key, so torch.ops.binslt
# works on every device (slowly). backends() reports what is compiled.
_FALLBACKS = dict(ref.REFERENCE_OPS, bconv_lif_infer=_infer_via_bconv_lif,
                  **ref.REFERENCE_WEIGHT_OPS, **ref.REFERENCE_AUX_OPS)
_fallback_lib = torch.library.Library("binslt", "IMPL")
for _name, _fn in _FALLBACKS.items():
    for _key in ("CPU", "CUDA"):
        if not _has_kernel(_name, _key):
            _fallback_lib.impl(_name, _fn, _key)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels, for torch.compile
# ---------------------------------------------------------------------------------------------


def _same_device(op: str, **tensors) -> None:
    """Mixed devices (e.g. CPU and meta) dispatch to the fake kernel, which would hand back
    uninitialised tensors on the first argument's device: refuse them, as aten's meta kernels do."""
    devs = {k: t.device for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise RuntimeError(f"binslt::{op}: all tensor arguments must be on one device, got "
                           f"{where}; move them with .to(device)")


@torch.library.register_fake("binslt::pack_spikes")
def _(x):
    b, c, h, w = x.shape
    return x.new_empty((b, h, w, C.channel_words(c)), dtype=torch.int32)


@torch.library.register_fake("binslt::unpack_spikes")
def _(packed, channels):
    b, h, w, _ = packed.shape
    return packed.new_empty((b, channels, h, w), dtype=torch.float32)


@torch.library.register_fake("binslt::pack_weight")
def _(weight):
    co, ci, kh, kw = weight.shape
    shape = (co, kh, kw, C.channel_words(ci))
    return weight.new_empty(shape, dtype=torch.int32), weight.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("binslt::topk_mask")
def _(scores, keep):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("binslt::sign_gain_pack")
def _sign_gain_pack_fake(weight, mask, alpha):
    co, ci, kh, kw = weight.shape
    shape = (co, kh, kw, C.channel_words(ci))
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(shape, dtype=torch.int32), weight.new_empty(shape, dtype=torch.int32),
            weight.new_empty((co,), dtype=torch.float32))


@torch.library.register_fake("binslt::search_sign_pack")
def _(weight, scores, keep, per_channel):
    return _sign_gain_pack_fake(weight, scores, None)


@torch.library.register_fake("binslt::search_score_grad")
def _(grad, weight, scores):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("binslt::narrow_int8")
def _(counts):
    return (counts.new_empty(counts.shape, dtype=torch.int8),
            counts.new_empty((), dtype=torch.bool))


@torch.library.register_fake("binslt::spike_pool2")
def _(spikes):
    b, c, h, w = spikes.shape
    return (spikes.new_empty((b, c, h // 2, w // 2), dtype=torch.float32),
            spikes.new_empty((b, h, w, C.channel_words(c)), dtype=torch.int32))


@torch.library.register_fake("binslt::spike_pool2_bwd")
def _(packed, grad, channels):
    b, h, w, _ = packed.shape
    return grad.new_empty((b, channels, h, w), dtype=torch.float32)


@torch.library.register_fake("binslt::bn_lif_infer")
def _(z, scale, shift, tau, decay_input, v_threshold, v_reset, pool, packed_out):
    _same_device("bn_lif_infer", z=z, scale=scale, shift=shift)
    T, n, c, h, w = z.shape
    hq, wq = C.check_pool("bn_lif_infer", pool, h, w)
    if packed_out:
        return z.new_empty((T, n, hq, wq, C.channel_words(c)), dtype=torch.int32)
    return z.new_empty((T, n, c, hq, wq), dtype=torch.float32)


@torch.library.register_fake("binslt::bconv_lif")
def _(x_packed, w_mask, w_pos, alpha, scale, shift, residual, T, stride, padding, bn_train,
      bn_eps, tau, decay_input, v_threshold, v_reset):
    _same_device("bconv_lif", x_packed=x_packed, w_mask=w_mask, w_pos=w_pos, alpha=alpha,
                 scale=scale, shift=shift, residual=residual)
    b, h, w, _ = x_packed.shape
    co, kh, kw, _ = w_mask.shape
    ho, wo = C.out_hw(h, w, kh, kw, stride, padding)
    shape = (T, b // T, co, ho, wo)
    return (
        x_packed.new_empty(shape, dtype=torch.float32),
        x_packed.new_empty(shape, dtype=C.counts_dtype(w_mask)),
        x_packed.new_empty((co,), dtype=torch.float32),
        x_packed.new_empty((co,), dtype=torch.float32),
    )


@torch.library.register_fake("binslt::bconv_lif_infer")
def _(x, w_mask, w_pos, alpha, scale, shift, residual, stride, padding, tau, decay_input,
      v_threshold, v_reset, pool=1, packed_out=False):
    _same_device("bconv_lif_infer", x=x, w_mask=w_mask, w_pos=w_pos, alpha=alpha, scale=scale,
                 shift=shift, residual=residual)
    T, n, h, w, _, _ = C.check_infer_input("bconv_lif_infer", x)
    co, kh, kw, _ = w_mask.shape
    ho, wo = C.check_pool("bconv_lif_infer", pool, *C.out_hw(h, w, kh, kw, stride, padding))
    if packed_out:
        return x.new_empty((T, n, ho, wo, C.channel_words(co)), dtype=torch.int32)
    return x.new_empty((T, n, co, ho, wo), dtype=torch.float32)


@torch.library.register_fake("binslt::bconv_lif_infer_shortcut")
def _(x, w_mask, w_pos, alpha, scale, shift, block_x, sc_mask, sc_pos, sc_alpha, sc_scale,
      sc_shift, sc_stride, sc_padding, stride, padding, tau, decay_input, v_threshold, v_reset,
      pool=1, packed_out=False):
    _same_device("bconv_lif_infer_shortcut", x=x, w_mask=w_mask, w_pos=w_pos, alpha=alpha,
                 scale=scale, shift=shift, block_x=block_x, sc_mask=sc_mask, sc_pos=sc_pos,
                 sc_alpha=sc_alpha, sc_scale=sc_scale, sc_shift=sc_shift)
    T, n, h, w, _, _ = C.check_infer_input("bconv_lif_infer_shortcut", x)
    co, kh, kw, _ = w_mask.shape
    ho, wo = C.check_pool("bconv_lif_infer_shortcut", pool,
                          *C.out_hw(h, w, kh, kw, stride, padding))
    if packed_out:
        return x.new_empty((T, n, ho, wo, C.channel_words(co)), dtype=torch.int32)
    return x.new_empty((T, n, co, ho, wo), dtype=torch.float32)


@torch.library.register_fake("binslt::bconv_lif_bwd")
def _fake_bconv_lif_bwd(grad_spikes, counts, x_packed, w_mask, w_pos, alpha, scale, shift, mean,
                        var, residual, in_channels, stride, padding, bn_train, bn_eps, tau,
                        decay_input, v_threshold, v_reset, detach_reset, surrogate,
                        surrogate_alpha, need_grad_x, need_grad_current=True):
    _same_device("bconv_lif_bwd", grad_spikes=grad_spikes, counts=counts, x_packed=x_packed,
                 w_mask=w_mask, w_pos=w_pos, alpha=alpha, scale=scale, shift=shift, mean=mean,
                 var=var, residual=residual)
    T, n, co = counts.shape[:3]
    _, h, w, _ = x_packed.shape
    kh, kw = w_mask.shape[1], w_mask.shape[2]
    gx_shape = (T, n, in_channels, h, w) if need_grad_x else (0,)
    f32 = torch.float32
    return (
        counts.new_empty(gx_shape, dtype=f32),
        counts.new_empty((co, in_channels, kh, kw), dtype=f32),
        counts.new_empty(counts.shape if need_grad_current else (0,), dtype=f32),
        counts.new_empty((co,), dtype=f32),
        counts.new_empty((co,), dtype=f32),
    )


@torch.library.register_fake("binslt::bconv_affine_infer")
def _(x, w_mask, w_pos, alpha, scale, shift, stride, padding):
    _same_device("bconv_affine_infer", x=x, w_mask=w_mask, w_pos=w_pos, alpha=alpha,
                 scale=scale, shift=shift)
    h, w = (x.shape[1], x.shape[2]) if x.dtype == torch.int32 else (x.shape[2], x.shape[3])
    co, kh, kw, _ = w_mask.shape
    return x.new_empty((x.shape[0], co, *C.out_hw(h, w, kh, kw, stride, padding)),
                       dtype=torch.float32)


@torch.library.register_fake("binslt::bconv_lif_bwd_pool2")
def _(grad_pooled, pool_packed, counts, *args):
    _same_device("bconv_lif_bwd_pool2", grad_pooled=grad_pooled, pool_packed=pool_packed,
                 counts=counts)
    return _fake_bconv_lif_bwd(counts.new_empty(counts.shape, dtype=torch.float32), counts, *args)


@torch.library.register_fake("binslt::bn_lif")
def _(z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset):
    _same_device("bn_lif", z=z, scale=scale, shift=shift, residual=residual)
    c = z.shape[2]
    return torch.empty_like(z), z.new_empty((c,), dtype=torch.float32), z.new_empty(
        (c,), dtype=torch.float32)


@torch.library.register_fake("binslt::bn_lif_bwd")
def _(grad_spikes, z, scale, shift, mean, var, residual, bn_train, bn_eps, tau, decay_input,
      v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha, need_grad_current=True):
    _same_device("bn_lif_bwd", grad_spikes=grad_spikes, z=z, scale=scale, shift=shift,
                 mean=mean, var=var, residual=residual)
    c = z.shape[2]
    g_cur = torch.empty_like(z) if need_grad_current else z.new_empty((0,))
    return (torch.empty_like(z), g_cur, z.new_empty((c,), dtype=torch.float32),
            z.new_empty((c,), dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# vmap rules, for torch.func.vmap
# ---------------------------------------------------------------------------------------------
# A vmapped batch of inputs folds into the ops' own batch (N, or the packed T*N) where that is
# exact: the epilogue has no batch statistics and the weights and per-channel vectors are not
# vmapped. Everything else (batch statistics, vmapped weights, the backward kernels, i.e.
# per-sample gradients) runs the op once per vmapped entry and stacks the results, which is what
# vmap means there; the kernels have no batched form of those.


def _vmap_per_entry(name: str):
    op = getattr(torch.ops.binslt, name).default

    def rule(info, in_dims, *args):
        outs = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)])
                for i in range(info.batch_size)]
        if isinstance(outs[0], (tuple, list)):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def _fold_dim0(op, x, d, *rest):
    """op over x [vmap, B, ...] with the vmapped entries folded into B (op's dim 0)."""
    x = x.movedim(d, 0)
    vb, b = x.shape[:2]
    return op(x.flatten(0, 1), *rest).unflatten(0, (vb, b)), 0


def _fold_n(t, d, size):
    """[T, N, ...] with a vmapped dim d (or None: the same for every entry) -> [T, size*N, ...],
    contiguous, vmapped entries outermost in the new N."""
    if d is None:
        return t.unsqueeze(1).expand(t.shape[0], size, *t.shape[1:]).flatten(1, 2).contiguous()
    return t.movedim(d, 1).flatten(1, 2).contiguous()


def _register_vmap_rules() -> None:
    names = [*SCHEMAS, *WEIGHT_SCHEMAS, *AUX_SCHEMAS]
    rules = {n: _vmap_per_entry(n) for n in names}
    loop = dict(rules)
    ops = torch.ops.binslt

    def fold_only(*dims):
        return all(d is None for d in dims)

    def pack_spikes(info, in_dims, x):
        return _fold_dim0(ops.pack_spikes.default, x, in_dims[0])

    def unpack_spikes(info, in_dims, packed, channels):
        return _fold_dim0(ops.unpack_spikes.default, packed, in_dims[0], channels)

    def bconv_lif(info, in_dims, x_packed, w_mask, w_pos, alpha, scale, shift, residual, T,
                  *rest):
        bn_train = rest[2]
        if bn_train or not fold_only(*in_dims[1:6]):
            return loop["bconv_lif"](info, in_dims, x_packed, w_mask, w_pos, alpha, scale, shift,
                                     residual, T, *rest)
        vb, d = info.batch_size, in_dims[0]
        if d is None:
            x_packed = x_packed.unsqueeze(0).expand(vb, *x_packed.shape)
        else:
            x_packed = x_packed.movedim(d, 0)
        b = x_packed.shape[1]
        # [vmap, T*N, ...] -> [T, vmap*N, ...] -> [T*vmap*N, ...]
        xp = x_packed.unflatten(1, (T, b // T)).transpose(0, 1).flatten(0, 2).contiguous()
        res = None if residual is None else _fold_n(residual, in_dims[6], vb)
        s, counts, mean, var = ops.bconv_lif.default(xp, w_mask, w_pos, alpha, scale, shift, res,
                                                     T, *rest)
        return (s.unflatten(1, (vb, b // T)), counts.unflatten(1, (vb, b // T)), mean, var), \
            (1, 1, None, None)

    def bn_lif(info, in_dims, z, scale, shift, residual, bn_train, *rest):
        if bn_train or not fold_only(in_dims[1], in_dims[2]):
            return loop["bn_lif"](info, in_dims, z, scale, shift, residual, bn_train, *rest)
        vb = info.batch_size
        zf = _fold_n(z, in_dims[0], vb)
        n = zf.shape[1] // vb
        res = None if residual is None else _fold_n(residual, in_dims[3], vb)
        s, mean, var = ops.bn_lif.default(zf, scale, shift, res, bn_train, *rest)
        return (s.unflatten(1, (vb, n)), mean, var), (1, None, None)

    def bconv_lif_infer(info, in_dims, x, w_mask, w_pos, alpha, scale, shift, residual=None,
                        *rest):
        if not fold_only(*in_dims[1:6]):
            return loop["bconv_lif_infer"](info, in_dims, x, w_mask, w_pos, alpha, scale, shift,
                                           residual, *rest)
        vb = info.batch_size
        xf = _fold_n(x, in_dims[0], vb)
        res = None if residual is None else _fold_n(residual, in_dims[6], vb)
        out = ops.bconv_lif_infer.default(xf, w_mask, w_pos, alpha, scale, shift, res, *rest)
        return out.unflatten(1, (vb, xf.shape[1] // vb)), 1

    def bn_lif_infer(info, in_dims, z, scale, shift, *rest):
        if not fold_only(in_dims[1], in_dims[2]):
            return loop["bn_lif_infer"](info, in_dims, z, scale, shift, *rest)
        vb = info.batch_size
        zf = _fold_n(z, in_dims[0], vb)
        out = ops.bn_lif_infer.default(zf, scale, shift, *rest)
        return out.unflatten(1, (vb, zf.shape[1] // vb)), 1

    rules.update(pack_spikes=pack_spikes, unpack_spikes=unpack_spikes, bconv_lif=bconv_lif,
                 bn_lif=bn_lif, bconv_lif_infer=bconv_lif_infer, bn_lif_infer=bn_lif_infer)
    for name, rule in rules.items():
        torch.library.register_vmap(f"binslt::{name}", rule, lib=_vmap_lib)


_vmap_lib = torch.library.Library("binslt", "FRAGMENT")
_register_vmap_rules()


# The Triton launchers (binslt.ops.triton) register binslt::<op>_triton when first needed:
# importing them pulls in torch._inductor (about a second), which a CPU run never uses.
_TRITON_LOCK = threading.Lock()
_TRITON_STATE = {"loaded": False, "error": ""}


def load_triton() -> str:
    """Import the Triton launchers once, registering ``binslt::<op>_triton``; returns '' or the
    import error (then the backend is marked unusable in :func:`binslt.backends`). Resolving the
    'triton' backend calls it; call it yourself before using ``torch.ops.binslt.*_triton``."""
    if _TRITON_STATE["loaded"]:  # every triton layer call comes here: no lock once loaded
        return _TRITON_STATE["error"]
    with _TRITON_LOCK:
        if not _TRITON_STATE["loaded"]:
            _TRITON_STATE["loaded"] = True
            try:
                from . import triton  # noqa: F401
            except Exception as exc:  # pragma: no cover - depends on the machine
                _TRITON_STATE["error"] = f"{type(exc).__name__}: {exc}"
                st = _ext.load()
                if st["triton"]["built"]:
                    st["triton"].update(usable=False, reason=f"Triton ops failed to load: {exc}")
        return _TRITON_STATE["error"]


_REFERENCE_ALL = {**ref.REFERENCE_OPS, **ref.REFERENCE_WEIGHT_OPS, **ref.REFERENCE_AUX_OPS}


def get_op(name: str, backend: str):
    """The callable implementing schema ``name`` on a concrete backend."""
    if backend == "torch":  # the reference of every schema, the helper ops' too
        return _REFERENCE_ALL[name]
    if backend == "triton":
        load_triton()
        return getattr(torch.ops.binslt, f"{name}_triton")
    return getattr(torch.ops.binslt, name)  # 'cpu' / 'cuda': the dispatcher picks by device
