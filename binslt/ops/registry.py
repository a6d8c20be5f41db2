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
_CPU_SIGN_GAIN_PACK = _has_kernel("sign_gain_pack", "CPU")

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
def _(weight, mask, alpha):
    co, ci, kh, kw = weight.shape
    shape = (co, kh, kw, C.channel_words(ci))
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(shape, dtype=torch.int32), weight.new_empty(shape, dtype=torch.int32),
            weight.new_empty((co,), dtype=torch.float32))


@torch.library.register_fake("binslt::search_score_grad")
def _(grad, weight, scores):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


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


def get_op(name: str, backend: str):
    """The callable implementing schema ``name`` on a concrete backend."""
    if backend == "torch":
        return ref.REFERENCE_OPS[name]
    if backend == "triton":
        load_triton()
        return getattr(torch.ops.binslt, f"{name}_triton")
    return getattr(torch.ops.binslt, name)  # 'cpu' / 'cuda': the dispatcher picks by device
