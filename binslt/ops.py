"""``binslt::`` ops: schemas, fake kernels, backend selection and autograd.

Layering: raw kernels (``csrc/``, ``kernels/``) -> this module (typed wrappers, fake
kernels, autograd) -> modules (``binslt.layers``), which call only this module, once per layer
call (``spiking_layer``). What the ops accept is decided in one place, ``binslt._contract``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import _contract as C
from . import _ext
from . import _fallback as _fb
from . import reference as ref
from ._contract import BACKENDS, counts_dtype  # noqa: F401  (part of the ops API)
from ._schemas import AUX_SCHEMAS, SCHEMAS, SURROGATES, WEIGHT_SCHEMAS

# Backends whose pack_spikes kernel rejects non-binary input as it packs (for free), so the layers
# skip their separate full-tensor check there.
PACK_VALIDATES = frozenset({"cpu"})

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


# The Triton launchers (binslt._triton_ops) register binslt::<op>_triton when first needed:
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
                from . import _triton_ops  # noqa: F401
            except Exception as exc:  # pragma: no cover - depends on the machine
                _TRITON_STATE["error"] = f"{type(exc).__name__}: {exc}"
                st = _ext.load()
                if st["triton"]["built"]:
                    st["triton"].update(usable=False, reason=f"Triton ops failed to load: {exc}")
        return _TRITON_STATE["error"]


def backends() -> dict[str, dict]:
    """{'torch'|'cpu'|'triton'|'cuda': {'built': bool, 'usable': bool, 'reason': str}}, after
    trying the Triton launchers (so that 'usable' is what a layer would find: a backend
    ``BINSLT_DISABLE_BACKENDS`` names, or whose first call failed here, is not)."""
    if _ext.load()["triton"]["built"]:
        load_triton()
    out = _ext.backends()
    env = _fb.settings()
    for be, st in out.items():
        if be in env["disabled"]:
            st.update(usable=False, reason=f"disabled by {_fb.ENV_DISABLE}; {st['reason']}")
        elif be in _fb.FAILED:
            st.update(usable=False, reason=f"failed its first call here ({_fb.FAILED[be]})")
    return out


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------

_override = threading.local()


@contextlib.contextmanager
def use_backend(backend: str):
    """Within the block, layers whose ``backend`` is 'auto' use ``backend`` instead."""
    C.check_backend(backend)
    prev = getattr(_override, "backend", None)
    _override.backend = backend
    try:
        yield
    finally:
        _override.backend = prev


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map 'auto' (or a use_backend override, or ``BINSLT_BACKEND``) to a concrete backend usable
    for ``device``. auto's order (binslt._fallback) skips the backends ``BINSLT_DISABLE_BACKENDS``
    names, those found failing (their first call, or ``binslt check``'s verdict) and the
    unusable ones; a disabled backend asked for by name raises."""
    C.check_backend(backend)
    if backend == "auto":
        backend = getattr(_override, "backend", None) or _fb.settings()["forced"] or "auto"
    if backend == "auto":
        be = _AUTO.get(device)  # one dict lookup per layer call once chosen
        if be is None:
            if torch.compiler.is_compiling():  # tracing reads no file: the verdict waits for
                return _choose_auto(device, verdict=False)  # the first eager call
            be = _AUTO[device] = _choose_auto(device)
        return be
    _fb.check_enabled(backend)
    st = _ext.load()  # read only (backends() copies it; this runs on every layer call)
    if backend == "torch":
        return backend
    if not st[backend]["built"]:
        raise RuntimeError(f"backend {backend!r} is not available: {st[backend]['reason']}")
    if backend == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' needs CPU tensors, got a tensor on {device}; use "
                           "backend='auto', 'cuda' or 'triton' for GPU tensors")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got a tensor on {device}")
    if backend == "triton":
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interp:
            raise RuntimeError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                               "(set before triton is imported) to run on the CPU")
        err = load_triton()
        if err:
            raise RuntimeError(f"backend 'triton' failed to load: {err}")
    return backend


_AUTO: dict[torch.device, str] = {}  # auto's choice per device (cleared when one fails)


def _choose_auto(device: torch.device, verdict: bool = True) -> str:
    st = _ext.load()
    env = _fb.settings()
    order = _fb.AUTO_ORDER.get(device.type, ("torch",))
    skipped = {}
    for be in order:
        if be in env["disabled"]:
            skipped[be] = f"disabled by {_fb.ENV_DISABLE}"
        elif be in _fb.FAILED:
            skipped[be] = f"failed its first call ({_fb.FAILED[be]})"
        elif be != "torch" and not st[be]["usable"]:
            skipped[be] = st[be]["reason"]
        elif be != "torch" and verdict and be in _fb.verdict_skips(device):
            skipped[be] = _fb.verdict_skips(device)[be]
        elif be == "triton" and load_triton():  # a failed import marks it unusable
            skipped[be] = st[be]["reason"]
        else:
            return be
    why = "; ".join(f"{b}: {r}" for b, r in skipped.items())
    raise RuntimeError(f"backend 'auto' has no backend left for {device} ({why})")


def _is_auto(backend: str) -> bool:
    """Whether ``backend`` resolves by auto's order (no use_backend block, no BINSLT_BACKEND)."""
    return (backend == "auto" and getattr(_override, "backend", None) is None
            and _fb.settings()["forced"] is None)


_FIRST = threading.local()  # .auto: inside an auto-chosen backend's first call


def _run_auto(backend: str, device: torch.device, run):
    """``run(be)`` on the backend ``backend`` resolves to. A backend auto chose whose first call
    fails recoverably (binslt._fallback.recoverable) is marked failed, with one warning, and the
    call runs again on the next backend of auto's order; after a backend's first successful
    call (and for explicit backends) errors are raised as usual. The per-call cost once proven:
    one set lookup."""
    be = resolve_backend(backend, device)
    if be in _fb.PROVEN or not _is_auto(backend) or torch.compiler.is_compiling():
        return run(be)
    while True:
        _FIRST.auto = True
        try:
            out = run(be)
        except Exception as exc:
            if not _fb.recoverable(exc):
                raise
            _fb.mark_failed(be, exc, device)
            _AUTO.clear()
            be = resolve_backend(backend, device)
            continue
        finally:
            _FIRST.auto = False
        _fb.PROVEN.add(be)
        return out


def _backward_op(name: str, ctx, *args):
    """The backward op ``name`` of ``ctx.backend``. Where auto chose the backend and its first
    backward fails recoverably, the backend is marked failed and the same schema runs on the
    next backend of auto's order (every backend implements every schema)."""
    be = ctx.backend
    if not ctx.auto or be in _fb.PROVEN_BWD or torch.compiler.is_compiling():
        return get_op(name, be)(*args)
    device = args[0].device
    while True:
        try:
            out = get_op(name, be)(*args)
        except Exception as exc:
            if not _fb.recoverable(exc) or be == "torch":
                raise
            _fb.mark_failed(be, exc, device)
            _AUTO.clear()
            be = _choose_auto(device)
            continue
        _fb.PROVEN_BWD.add(be)
        return out


def reset_backend_state() -> None:
    """Read ``BINSLT_BACKEND``, ``BINSLT_DISABLE_BACKENDS`` and ``binslt check``'s verdict again
    and forget the backends found failing in this process."""
    _fb.reset()
    _AUTO.clear()


def get_op(name: str, backend: str):
    """The callable implementing schema ``name`` on a concrete backend."""
    if backend == "torch":
        return ref.REFERENCE_OPS[name]
    if backend == "triton":
        load_triton()
        return getattr(torch.ops.binslt, f"{name}_triton")
    return getattr(torch.ops.binslt, name)  # 'cpu' / 'cuda': the dispatcher picks by device


# ---------------------------------------------------------------------------------------------
# Validation helpers (clear errors instead of crashes deep in C++)
# ---------------------------------------------------------------------------------------------


def check_spikes(x: torch.Tensor, name: str = "input") -> None:
    """Raise ValueError unless every element of ``x`` is exactly 0 or 1 (skipped when tracing)."""
    if torch.compiler.is_compiling() or x.numel() == 0 or x.is_meta:
        return
    if not bool(((x == 0) | (x == 1)).all()):
        bad = x[(x != 0) & (x != 1)].flatten()[:3].tolist()
        raise ValueError(
            f"{name} must be binary spikes (every element 0. or 1.), found values such as {bad}. "
            "For real-valued input (e.g. images in the first layer) construct the layer with "
            "input='real'.")


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    if torch.compiler.is_compiling() or x.numel() == 0 or x.is_meta:
        return
    if not x.is_floating_point():  # integers are finite
        return
    # min and max propagate NaN and show +-inf: one reading pass, no bool tensor (isfinite().all()
    # is three passes and two allocations; 30x slower on a ResNet-19 residual on the CPU).
    lo, hi = torch.aminmax(x.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf; binslt layers need finite input")


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------



def max_abs_gain(w_eff: torch.Tensor) -> torch.Tensor:
    """The gain the kernels take, read back from a ternary-times-gain weight: max |W_eff| per
    output channel (``reference.mean_abs_gain`` is how the search computes it)."""
    return w_eff.detach().abs().flatten(1).amax(1).to(torch.float32)


_KEEP = threading.local()


@contextlib.contextmanager
def keep_counts(enabled: bool = True):
    """Whether the fused spike-input conv layers save their int16/int32 conv counts for the
    backward (the default) or, inside ``with keep_counts(False):`` (this thread), recompute them
    there with the forward kernel: 2 bytes less per output neuron and time step (VGG-11, N=32,
    T=4: 44 MiB of saved counts; peak training memory 250 -> 218 MiB) for one more binary
    forward conv per layer (about 7 % more search-step time there). The gradients are identical
    either way (the counts are exact integers)."""
    prev = getattr(_KEEP, "counts", True)
    _KEEP.counts = bool(enabled)
    try:
        yield
    finally:
        _KEEP.counts = prev


class ConvLIF(torch.autograd.Function):
    """Fused binary conv (+BN) (+residual) + LIF on spike input, through a kernel backend.

    Saves packed input bits (1 bit per spike), per-channel statistics and the integer counts;
    under ``keep_counts(False)`` the backward recomputes the counts from the packed bits with the
    forward kernel instead (exact).

    ``pool=2`` (CPU backend) also 2x2 max-pools the spikes, as SpikePool does, saving their bits;
    the backward hands the pooled gradient to ``bconv_lif_bwd_pool2``, whose kernel routes it
    inside the LIF backward: the unpooled gradient is never stored whole (one float per output
    spike less at the backward's peak).

    A residual of spikes (a ResNet block's identity shortcut; CPU backend) is saved as packed
    bits, 1 instead of 32 bits a value, and unpacked (exactly) for the backward; the kept counts
    as int8 where every one fits (CPU backend, whose backward kernel reads them so).
    """

    @staticmethod
    def forward(ctx, x, w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau,
                decay_input, v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha,
                backend, planes=None, pool=1):
        T, n, ci, h, w = x.shape
        x_packed = get_op("pack_spikes", backend)(x.reshape(T * n, ci, h, w).float())
        if planes is None:
            w_mask, w_pos = get_op("pack_weight", backend)(w_eff.detach().float())
            alpha = max_abs_gain(w_eff)
        else:  # W_eff's own (mask bits, positive bits, gain), packed with it
            w_mask, w_pos, alpha = planes
        res = None if residual is None else residual.float().contiguous()
        spikes, counts, mean, var = get_op("bconv_lif", backend)(
            x_packed, w_mask, w_pos, alpha, scale.detach().float(), shift.detach().float(), res,
            T, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset)
        kept = counts if getattr(_KEEP, "counts", True) else None
        ctx.counts_dtype = counts.dtype
        if kept is not None and backend == "cpu" and _fits_int8(kept):
            kept = kept.to(torch.int8)  # exact: every count is in [-128, 127]
        pool_bits = None
        if pool == 2:
            spikes, pool_bits = _pool2_spikes(spikes, backend)
        elif pool != 1:
            raise ValueError(f"ConvLIF: only 2x2 pooling is fused, got pool={pool}")
        res_saved, ctx.res_shape = res, None
        if res is not None and backend == "cpu" and _is_binary(res):
            res_saved = get_op("pack_spikes", backend)(res.flatten(0, 1))
            ctx.res_shape = tuple(res.shape)
        ctx.save_for_backward(x_packed, w_mask, w_pos, alpha, scale, shift, kept, mean, var,
                              res_saved, pool_bits)
        ctx.cfg = (ci, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset,
                   detach_reset, surrogate, surrogate_alpha)
        ctx.T = T
        ctx.backend = backend
        ctx.auto = getattr(_FIRST, "auto", False)  # an auto-chosen backend's first call
        ctx.has_res = residual is not None
        ctx.mark_non_differentiable(mean, var)
        return spikes.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, g_spikes, _g_mean, _g_var):
        (x_packed, w_mask, w_pos, alpha, scale, shift, counts, mean, var, res,
         pool_bits) = ctx.saved_tensors
        if ctx.res_shape is not None:  # a residual of spikes, saved packed
            res = get_op("unpack_spikes", ctx.backend)(res, ctx.res_shape[2]).view(ctx.res_shape)
        need_x = ctx.needs_input_grad[0]
        if counts is None:  # the forward's integer counts, recomputed (bit for bit)
            ci, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset = \
                ctx.cfg[:9]
            counts = get_op("bconv_lif", ctx.backend)(
                x_packed, w_mask, w_pos, alpha, scale.detach().float(), shift.detach().float(),
                res, ctx.T, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold,
                v_reset)[1]
        if ctx.backend != "cpu":  # (the CPU kernel reads int8 counts as they were saved)
            counts = counts.to(ctx.counts_dtype)
        rest = (counts, x_packed, w_mask, w_pos, alpha, scale.detach().float(),
                shift.detach().float(), mean, var, res, *ctx.cfg, need_x, ctx.has_res)
        g = g_spikes.float().contiguous()
        if pool_bits is None:
            out = _backward_op("bconv_lif_bwd", ctx, g, *rest)
        else:
            out = torch.ops.binslt.bconv_lif_bwd_pool2(g, pool_bits, *rest)
        g_x, g_w, g_cur, g_sc, g_sh = out
        return (g_x if need_x else None, g_w, g_sc.to(scale.dtype), g_sh.to(shift.dtype),
                g_cur if ctx.has_res else None) + (None,) * 14


class BNLIF(torch.autograd.Function):
    """Epilogue (+BN) (+residual) + LIF over a real current z: [T, N, C, *]."""

    @staticmethod
    def forward(ctx, z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold,
                v_reset, detach_reset, surrogate, surrogate_alpha, backend):
        # A current that is the same at every step (a real-input layer's, expanded over T) is
        # saved once, not T times; the C++ kernels also read it in place (time stride 0).
        ctx.steps = z.shape[0] if z.dim() > 1 and z.stride(0) == 0 else 0
        in_place = (ctx.steps and backend == "cpu" and z.dtype == torch.float32
                    and z[0].is_contiguous())
        zf = z.float() if in_place else z.float().contiguous()
        res = None if residual is None else residual.float().contiguous()
        spikes, mean, var = get_op("bn_lif", backend)(
            zf, scale.detach().float(), shift.detach().float(), res, bn_train, bn_eps, tau,
            decay_input, v_threshold, v_reset)
        # (in place: a view of the one current, no copy; otherwise step 0 of the T-fold copy)
        saved = zf[0] if in_place else zf[0].clone() if ctx.steps else zf
        ctx.save_for_backward(saved, scale, shift, mean, var, res)
        ctx.cfg = (bn_train, bn_eps, tau, decay_input, v_threshold, v_reset, detach_reset,
                   surrogate, surrogate_alpha)
        ctx.backend = backend
        ctx.auto = getattr(_FIRST, "auto", False)
        ctx.has_res = residual is not None
        ctx.z_dtype = z.dtype
        ctx.mark_non_differentiable(mean, var)
        return spikes.to(z.dtype), mean, var

    @staticmethod
    def backward(ctx, g_spikes, _g_mean, _g_var):
        zf, scale, shift, mean, var, res = ctx.saved_tensors
        if ctx.steps:
            zf = zf.unsqueeze(0).expand(ctx.steps, *zf.shape)
            if ctx.backend != "cpu":
                zf = zf.contiguous()
        g_z, g_cur, g_sc, g_sh = _backward_op(
            "bn_lif_bwd", ctx, g_spikes.float().contiguous(), zf, scale.detach().float(),
            shift.detach().float(), mean, var, res, *ctx.cfg, ctx.has_res)
        return (g_z.to(ctx.z_dtype), g_sc.to(scale.dtype), g_sh.to(shift.dtype),
                g_cur if ctx.has_res else None) + (None,) * 10


def _fits_int8(counts: torch.Tensor) -> bool:
    """Whether every integer count is in int8's range (one aminmax pass, a host read)."""
    if counts.numel() == 0 or counts.dtype == torch.int8:
        return False
    lo, hi = torch.aminmax(counts)
    return int(lo) >= -128 and int(hi) <= 127


def _is_binary(t: torch.Tensor) -> bool:
    """Whether every value of the float tensor t is 0 or 1 (one pass, a host read)."""
    return bool(t.eq(0).logical_or_(t.eq(1)).all())


def _pool2_spikes(s: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 (stride 2) max-pool of spikes [T, N, C, H, W] (a max of {0, 1} is their OR, exact)
    and the unpooled spikes packed [T*N, H, W, ceil(C/32)] (the backend's pack_spikes): what the
    pool's backward routes by."""
    T, n, c = s.shape[:3]
    flat = s.flatten(0, 1)
    a, b, cc, d = ref.pool2_windows(flat)
    y = torch.maximum(torch.maximum(a, b), torch.maximum(cc, d))
    return y.view(T, n, c, *y.shape[2:]), get_op("pack_spikes", backend)(flat.float().contiguous())


class SpikePool(torch.autograd.Function):
    """2x2 (stride 2) max-pooling of spikes [T, N, C, H, W] in training: a max of {0,1} spikes is
    their OR. Saves the layer's spikes packed (one bit per spike, the backend's pack_spikes), not
    float indices, and routes the gradient as torch's max_pool2d backward does on that input:
    to the first maximal element of each window in row-major order, i.e. the first 1, or the
    window's first element when all four are 0. Rows/columns past 2*(H//2), 2*(W//2) get none."""

    @staticmethod
    def forward(ctx, s, pool, backend):
        if pool != 2:
            raise ValueError(f"SpikePool: only 2x2 pooling is fused, got pool={pool}")
        y, packed = _pool2_spikes(s, backend)
        ctx.save_for_backward(packed)
        ctx.cfg = (tuple(s.shape), backend)
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        (T, n, c, h, w), _backend = ctx.cfg
        gx = torch.ops.binslt.spike_pool2_bwd(packed, g.flatten(0, 1).float().contiguous(), c)
        return gx.to(g.dtype).view(T, n, c, h, w), None, None


def _spike_pool(be: str, s: torch.Tensor, pool: int) -> torch.Tensor:
    """Max-pool a layer's spikes [T, N, C, H, W] by ``pool`` (1: unchanged). The torch backend is
    the reference (max_pool2d, as SpikeMaxPool2d); the kernel backends save one bit per spike."""
    if pool == 1:
        return s
    if be == "torch" or not torch.is_grad_enabled() or not s.requires_grad:
        y = F.max_pool2d(s.flatten(0, 1), pool)
        return y.view(*s.shape[:3], *y.shape[2:])
    return SpikePool.apply(s, pool, be)


# ---------------------------------------------------------------------------------------------
# The fused layer ops. Each public function resolves its backend; the underscore forms take a
# resolved one, so that a layer call (spiking_layer) resolves it once.
# ---------------------------------------------------------------------------------------------


def _surrogate_id(surrogate) -> int:
    return SURROGATES[surrogate] if isinstance(surrogate, str) else int(surrogate)


def _conv_lif(be, x, w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau,
              decay_input, v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha,
              planes=None, pool=1):
    """The fused layer with autograd, its spikes max-pooled by ``pool`` (1: unchanged). The CPU
    backend pools inside ConvLIF (its backward kernel routes the pooled gradient itself); the
    others through _spike_pool."""
    sid = _surrogate_id(surrogate)
    if be == "torch":
        T = x.shape[0]
        z = F.conv2d(x.flatten(0, 1), w_eff.to(x.dtype), stride=stride, padding=padding)
        z = z.view(T, -1, *z.shape[1:])
        s, mean, var = _bn_lif(be, z, scale, shift, residual, bn_train, bn_eps, tau, decay_input,
                               v_threshold, v_reset, detach_reset, sid, surrogate_alpha)
        return _spike_pool(be, s, pool), mean, var
    fused = pool == 2 and be == "cpu"
    s, mean, var = ConvLIF.apply(x, w_eff, scale, shift, residual, stride, padding, bn_train,
                                 bn_eps, float(tau), decay_input, float(v_threshold),
                                 None if v_reset is None else float(v_reset), detach_reset, sid,
                                 float(surrogate_alpha), be, planes, 2 if fused else 1)
    return (s if fused else _spike_pool(be, s, pool)), mean, var


def _bn_lif(be, z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold,
            v_reset, detach_reset, surrogate, surrogate_alpha):
    sid = _surrogate_id(surrogate)
    if be == "torch":
        x, mean, var = ref.epilogue(z, scale.to(z.dtype), shift.to(z.dtype), residual, bn_train,
                                    bn_eps)
        s = ref.lif_multistep(x, tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                              v_reset=v_reset, detach_reset=detach_reset, surrogate=sid,
                              surrogate_alpha=surrogate_alpha)
        return s, mean, var
    return BNLIF.apply(z, scale, shift, residual, bn_train, bn_eps, float(tau), decay_input,
                       float(v_threshold), None if v_reset is None else float(v_reset),
                       detach_reset, sid, float(surrogate_alpha), be)


def _infer_conv_lif(be, x, w_mask, w_pos, alpha, scale, shift, residual, stride, padding,
                    bn_train, bn_eps, tau, decay_input, v_threshold, v_reset, pool=1,
                    packed_out=False):
    packed_in = x.dtype == torch.int32  # words [T, N, H, W, Cw] of a previous layer
    if not packed_in:
        x = x.float()  # no copy for float32 spikes
    if residual is not None and residual.dtype == torch.int32 and (be != "cpu" or bn_train):
        # spike words [T, N, Ho, Wo, Cow]: only the CPU inference kernel reads them packed
        t_, n_, ho, wo, _ = residual.shape
        residual = get_op("unpack_spikes", be)(residual.flatten(0, 1), w_mask.shape[0]).view(
            t_, n_, w_mask.shape[0], ho, wo)
    operands = (w_mask, w_pos, alpha.float(), scale.float(), shift.float(), residual)
    if bn_train:
        T = x.shape[0]
        xp = x.flatten(0, 1) if packed_in else get_op("pack_spikes", be)(x.flatten(0, 1))
        s, _, mean, var = get_op("bconv_lif", be)(xp, *operands, T, stride, padding, True, bn_eps,
                                                  tau, decay_input, v_threshold, v_reset)
        C.check_pool("bconv_lif_infer", pool, s.shape[3], s.shape[4])
        return ref.infer_output(s, pool, packed_out, get_op("pack_spikes", be)), mean, var
    s = get_op("bconv_lif_infer", be)(x, *operands, stride, padding, tau, decay_input,
                                      v_threshold, v_reset, pool, packed_out)
    return s, None, None


def conv_lif(x, w_eff, scale, shift, residual=None, *, stride=1, padding=0, bn_train=False,
             bn_eps=1e-5, tau=2.0, decay_input=True, v_threshold=1.0, v_reset: Optional[float] = 0.0,
             detach_reset=False, surrogate="atan", surrogate_alpha=2.0, backend="auto"):
    """Spikes of the fused layer on spike input x: [T, N, Ci, H, W]. Returns (spikes, mean, var).

    ``backend='torch'`` runs the autograd reference (any dtype); others run kernels (float32).
    """
    return _run_auto(backend, x.device, lambda be: _conv_lif(
        be, x, w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau, decay_input,
        v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha))


def bn_lif(z, scale, shift, residual=None, *, bn_train=False, bn_eps=1e-5, tau=2.0,
           decay_input=True, v_threshold=1.0, v_reset: Optional[float] = 0.0, detach_reset=False,
           surrogate="atan", surrogate_alpha=2.0, backend="auto"):
    """Spikes of (BN) (+residual) + LIF over a real current z: [T, N, C, *]. -> (spikes, mean,
    var)."""
    return _run_auto(backend, z.device, lambda be: _bn_lif(
        be, z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset,
        detach_reset, surrogate, surrogate_alpha))


def infer_conv_lif(x, w_mask, w_pos, alpha, scale, shift, residual=None, *, stride=1, padding=0,
                   bn_train=False, bn_eps=1e-5, tau=2.0, decay_input=True, v_threshold=1.0,
                   v_reset: Optional[float] = 0.0, pool=1, packed_out=False, backend="auto"):
    """The no-grad inference path: binary conv + LIF of spikes x [T, N, C, H, W] (or packed
    words [T, N, H, W, Cw] int32) with packed weight planes -> (spikes, mean, var). ``pool=2``
    max-pools the spikes 2x2; ``packed_out`` returns them as words [T, N, Ho', Wo', Cw'] int32.
    With the eval epilogue it runs ``bconv_lif_infer`` (no packed copy of x and no counts are
    written); training BN needs ``bconv_lif``'s batch statistics (mean and var are None
    otherwise)."""
    with torch.no_grad():
        return _run_auto(backend, x.device, lambda be: _infer_conv_lif(
            be, x, w_mask, w_pos, alpha, scale, shift, residual, stride, padding, bn_train,
            bn_eps, tau, decay_input, v_threshold, v_reset, pool, packed_out))


def spiking_layer(x, weight, scale, shift, residual=None, *, linear=False, stride=1, padding=0,
                  real_input=False, bn_train=False, bn_eps=1e-5, neuron: dict, pool=1,
                  packed_out=False, backend="auto", who="layer"):
    """One call of a masked sign-weight spiking layer -> (spikes, mean, var).

    x is [T, N, C, H, W] (``linear``: [T, N, F], run as a 1x1 image with F channels), or, on the
    no-grad spike path, packed words [T, N, H, W, Cw] int32 from a previous layer's
    ``packed_out``; ``weight`` gives ``effective_weight()`` (differentiable W_eff) and
    ``packed_weight()`` (its bit planes and gain, cached); ``scale``, ``shift`` and ``bn_train``
    are the epilogue; ``neuron`` holds the LIF settings; ``pool=2`` max-pools the spikes 2x2
    (fused into the inference kernel; in training one bit per spike is saved for the backward).
    ``packed_out`` (no-grad spike path of a conv only) returns packed words [T, N, Ho, Wo, Cw]
    int32 instead of float spikes. The backend is resolved once; the input is checked (binary
    spikes, or finite real values) unless the backend's pack kernel checks it as it packs, or it
    is packed already. Spike input without autograd runs the packed inference path; with
    autograd, the fused autograd op; real input, a dense conv (linear) and the fused epilogue +
    LIF. With backend 'auto', a backend whose first call fails recoverably hands the call to the
    next one (``_run_auto``).
    """
    return _run_auto(backend, x.device, lambda be: _spiking_layer(
        be, x, weight, scale, shift, residual, linear, stride, padding, real_input, bn_train,
        bn_eps, neuron, pool, packed_out, who))


def _spiking_layer(be, x, weight, scale, shift, residual, linear, stride, padding, real_input,
                   bn_train, bn_eps, neuron, pool, packed_out, who):
    packed_in = x.dtype == torch.int32
    no_grad = be != "torch" and not torch.is_grad_enabled()
    infer = not real_input and no_grad
    # A real-input conv's no-grad path can emit packed spikes too (the next layer's input).
    real_infer = real_input and not linear and no_grad
    if (packed_in and not infer) or (packed_out and not (infer or real_infer)):
        raise ValueError(f"{who}: packed spikes in need the no-grad spike-input path and packed "
                         f"spikes out a no-grad conv (a kernel backend under torch.no_grad()), "
                         f"got backend {be!r}, grad enabled={torch.is_grad_enabled()}, "
                         f"real input={real_input}, linear={linear}")
    if real_input:
        check_finite(x, f"{who} input")
    elif be not in PACK_VALIDATES and not packed_in:
        check_spikes(x, f"{who} input")
    packed_res = residual is not None and residual.dtype == torch.int32
    if packed_res and (not infer or linear):
        raise ValueError(f"{who}: a packed (int32 spike words) residual needs the no-grad "
                         f"spike-input path of a conv, got backend {be!r}, grad enabled="
                         f"{torch.is_grad_enabled()}, linear={linear}")
    if residual is not None and not packed_res:
        check_finite(residual, f"{who} residual")
    T, n = x.shape[:2]
    co = scale.shape[0]
    # A linear layer on spikes runs as a 1x1 conv. The CPU autograd path lays the batch out as
    # the pixels of one 1 x N image per step ([T, 1, F, 1, N]): the same sums, BN statistics over
    # the same (T, N) values, but the kernels' rows run over the batch instead of being 1 wide.
    as_row = linear and not real_input and not infer and be == "cpu" and n > 0
    if as_row:
        x = x.transpose(1, 2).reshape(T, 1, x.shape[2], 1, n)
        residual = (None if residual is None
                    else residual.transpose(1, 2).reshape(T, 1, co, 1, n))
    elif linear and not real_input:
        if not packed_in:  # explicit sizes: -1 is ambiguous at N = 0
            x = x.reshape(T, n, x.shape[2], 1, 1)
        residual = None if residual is None else residual.reshape(T, n, co, 1, 1)
    nk = neuron
    if infer:
        w_mask, w_pos, alpha = weight.packed_weight()
        res = (None if residual is None else residual.contiguous() if packed_res
               else residual.float().contiguous())
        s, mean, var = _infer_conv_lif(be, x, w_mask, w_pos, alpha, scale, shift, res, stride,
                                       padding, bn_train, bn_eps, nk["tau"], nk["decay_input"],
                                       nk["v_threshold"], nk["v_reset"], pool, packed_out)
        if packed_out:
            return s, mean, var
        s = s.to(torch.float32 if packed_in else x.dtype)
    elif not real_input:
        # The CPU kernels take W_eff's bit planes from the pass that wrote it, where the weight
        # offers them (search mode); otherwise ConvLIF packs W_eff itself.
        planes_of = getattr(weight, "effective_weight_planes", None) if be == "cpu" else None
        w, planes = planes_of() if planes_of is not None else (weight.effective_weight(), None)
        w = w[:, :, None, None] if linear else w
        s, mean, var = _conv_lif(be, x, w, scale, shift, residual, stride, padding, bn_train,
                                 bn_eps, **nk, planes=planes, pool=pool)
    else:
        w = weight.effective_weight().to(x.dtype)
        # Direct encoding repeats the image over T as an expanded view (stride 0): its current
        # is computed once and expanded, not T times.
        once = T > 1 and x.stride(0) == 0
        xin = x[:1] if once else x
        if linear:
            z = F.linear(xin, w)
        else:
            z = F.conv2d(xin.flatten(0, 1), w, stride=stride, padding=padding)
            z = z.view(xin.shape[0], n, *z.shape[1:])
        if once:
            z = z.expand(T, *z.shape[1:])
        if real_infer:
            return _real_infer(be, z, scale, shift, residual, bn_train, bn_eps, nk, pool,
                               packed_out, x.dtype)
        s, mean, var = _bn_lif(be, z, scale, shift, residual, bn_train, bn_eps, **nk)
        s = _spike_pool(be, s, pool)
    if as_row:
        # contiguous [T, N, F] like every other path's: a transposed layout would send the next
        # dense layer (the classifier) down another BLAS path, with other float rounding
        s = s.view(T, co, n).transpose(1, 2).contiguous()
    elif linear and not real_input:
        s = s.view(T, n, co)
    return s, mean, var


def _real_infer(be, z, scale, shift, residual, bn_train, bn_eps, nk, pool, packed_out, dtype):
    """A real-input conv's no-grad epilogue + LIF over its current z [T, N, C, H, W] (an expanded
    view when the input was), pooled and packed as asked -> (spikes, mean, var). The CPU with the
    eval epilogue runs ``binslt::bn_lif_infer``: one pass from the current to the pooled, packed
    spikes, reading an expanded current once per step in place."""
    if be == "cpu" and not bn_train and residual is None:
        s = torch.ops.binslt.bn_lif_infer(
            z.float(), scale.float(), shift.float(), nk["tau"], nk["decay_input"],
            nk["v_threshold"], nk["v_reset"], pool, packed_out)
        return (s if packed_out else s.to(dtype)), None, None
    s, mean, var = _bn_lif(be, z, scale, shift, residual, bn_train, bn_eps, **nk)
    s = ref.infer_output(s.float(), pool, packed_out, get_op("pack_spikes", be))
    return (s if packed_out else s.to(dtype)), mean, var


# ---------------------------------------------------------------------------------------------
# The search step's weight side
# ---------------------------------------------------------------------------------------------

_SELECTION_DTYPES = (torch.float32, torch.float64)


def topk_mask(scores: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """biprop's mask: the ``numel - floor(prune_rate * numel)`` largest |s| kept, ties to the lower
    flat index -- ``reference.topk_mask`` bit for bit, as a {0, 1} tensor like ``scores``.

    float32/float64 scores run ``binslt::topk_mask`` (a radix selection on the CPU, the reference
    on other devices); other dtypes run the reference directly.
    """
    if scores.dtype not in _SELECTION_DTYPES:
        return ref.topk_mask(scores, prune_rate)
    n = scores.numel()
    return torch.ops.binslt.topk_mask(scores.detach(), n - ref.num_pruned(n, prune_rate))


class _MaskedSignSearchPacked(torch.autograd.Function):
    """Search mode's W_eff (``reference._MaskedSignSearch``'s values and score gradient) with its
    bit planes and kernel gain, written by one ``binslt::sign_gain_pack`` pass."""

    @staticmethod
    def forward(ctx, weight, scores, mask, per_channel):
        alpha = ref.mean_abs_gain(weight, mask, per_channel)
        w4 = weight.view(*weight.shape, 1, 1) if weight.dim() == 2 else weight
        w_eff, w_mask, w_pos, gain = torch.ops.binslt.sign_gain_pack(w4, mask.view_as(w4), alpha)
        ctx.save_for_backward(weight, scores)
        ctx.mark_non_differentiable(w_mask, w_pos, gain)
        return w_eff.view_as(weight), w_mask, w_pos, gain

    @staticmethod
    def backward(ctx, grad, _g_mask, _g_pos, _g_gain):
        weight, scores = ctx.saved_tensors
        if grad.dtype != torch.float32:
            return None, ref.search_score_grad(grad, weight, scores), None, None
        return None, torch.ops.binslt.search_score_grad(grad, weight, scores), None, None


def _packs_on_cpu(weight: torch.Tensor, scores: torch.Tensor) -> bool:
    return (_CPU_SIGN_GAIN_PACK and not torch.compiler.is_compiling()
            and weight.device.type == "cpu" and weight.dtype == torch.float32
            and scores.dtype == torch.float32 and weight.dim() in (2, 4))


def masked_sign_weight(weight: torch.Tensor, scores: torch.Tensor, prune_rate: float,
                       per_channel: bool = False, *, planes: bool = False):
    """Search mode's W_eff = alpha * sign(w) * M (``reference.masked_sign_weight``'s values and
    biprop's score gradient), its mask selected by ``topk_mask``.

    ``planes``: return ``(W_eff, (mask bits, positive bits, gain))``, what ``pack_weight`` and
    ``max_abs_gain`` give for W_eff ([O, F] weights as 1x1 kernels), written in the same pass on
    the CPU; ``(W_eff, None)`` where no CPU kernel serves the weight.
    """
    mask = topk_mask(scores, prune_rate)
    if _packs_on_cpu(weight, scores):
        w_eff, *packed = _MaskedSignSearchPacked.apply(weight, scores, mask, per_channel)
        return (w_eff, tuple(packed)) if planes else w_eff
    w_eff = ref.masked_sign_weight(weight, scores, prune_rate, per_channel, mask=mask)
    return (w_eff, None) if planes else w_eff


def pack_spikes(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[B, C, H, W] spikes -> [B, H, W, ceil(C/32)] int32 words."""
    return _run_auto(backend, x.device, lambda be: get_op("pack_spikes", be)(x))


def unpack_spikes(packed: torch.Tensor, channels: int, backend: str = "auto") -> torch.Tensor:
    return _run_auto(backend, packed.device,
                     lambda be: get_op("unpack_spikes", be)(packed, channels))


def bconv_affine_infer(x, w_mask, w_pos, alpha, scale, shift, stride=1, padding=0,
                       backend: str = "auto") -> torch.Tensor:
    """(count * alpha) * scale + shift of spikes x (float 0/1 [B, C, H, W] or packed words
    [B, H, W, Cw] int32): a masked sign-weight conv without a neuron, eval BN folded."""
    return _run_auto(backend, x.device, lambda be: get_op("bconv_affine_infer", be)(
        x, w_mask, w_pos, alpha, scale, shift, stride, padding))


def onednn_conv_available() -> bool:
    """Whether the C++ CPU kernels can run oneDNN's int8 convolution here (AMX-INT8)."""
    global _ONEDNN
    if _ONEDNN is None:
        info = _ext.cpu_info()
        _ONEDNN = bool(info and info["features"].get("onednn_int8", False))
    return _ONEDNN


_ONEDNN = None


def pack_weight(weight: torch.Tensor, backend: str = "auto"):
    return _run_auto(backend, weight.device, lambda be: get_op("pack_weight", be)(weight))

from ._cpu_algos import cpu_algorithms  # noqa: E402,F401
