"""The layer-call entry points: one call per layer (``spiking_layer``), and the fused ops it
is made of (``conv_lif``, ``bn_lif``, ``infer_conv_lif``, ``pack_spikes``, ...). Each public
function resolves its backend; the underscore forms take a resolved one. Input validation
(``check_spikes``, ``check_finite``) gives clear errors instead of crashes deep in C++."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import contract as C
from . import reference as ref
from .autograd import BNLIF, ConvLIF, _spike_pool, values_unreadable
from .backend import _run_auto
from .registry import get_op
from .schemas import SURROGATES

# Backends whose pack_spikes kernel rejects non-binary input as it packs (for free), so the layers
# skip their separate full-tensor check there.
PACK_VALIDATES = frozenset({"cpu"})


def check_spikes(x: torch.Tensor, name: str = "input") -> None:
    """Raise ValueError unless every element of ``x`` is exactly 0 or 1 (skipped when tracing
    and under vmap: ``values_unreadable``)."""
    if values_unreadable(x) or x.numel() == 0 or x.is_meta:
        return
    if not bool(((x == 0) | (x == 1)).all()):
        bad = x[(x != 0) & (x != 1)].flatten()[:3].tolist()
        raise ValueError(
            f"{name} must be binary spikes (every element 0. or 1.), found values such as {bad}. "
            "For real-valued input (e.g. images in the first layer) construct the layer with "
            "input='real'.")


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    if values_unreadable(x) or x.numel() == 0 or x.is_meta:
        return
    if not x.is_floating_point():  # integers are finite
        return
    # min and max propagate NaN and show +-inf: one reading pass, no bool tensor (isfinite().all()
    # is three passes and two allocations; 30x slower on a ResNet-19 residual on the CPU).
    lo, hi = torch.aminmax(x.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf; binslt layers need finite input")


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
                                 float(surrogate_alpha), be, planes, 2 if fused else 1)[:3]
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
                       detach_reset, sid, float(surrogate_alpha), be)[:3]


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


def _records_grad(x, weight, scale, shift, residual) -> bool:
    """Whether autograd records this layer call: grad mode is on and the input, the epilogue,
    the residual or a parameter of the layer behind ``weight`` requires grad."""
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in (x, scale, shift, residual)):
        return True
    layer = getattr(weight, "layer", weight)  # (_GainScaled wraps the layer)
    if not isinstance(layer, torch.nn.Module):
        return True
    return any(p.requires_grad for p in layer.parameters(recurse=False))


def _spiking_layer(be, x, weight, scale, shift, residual, linear, stride, padding, real_input,
                   bn_train, bn_eps, neuron, pool, packed_out, who):
    packed_in = x.dtype == torch.int32
    # The packed inference kernels serve every call autograd would not record (a frozen ticket
    # called without torch.no_grad too, e.g. by torch.export.export).
    no_grad = be != "torch" and not _records_grad(x, weight, scale, shift, residual)
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
