"""The layer-call entry points: one call per layer (``spiking_layer``), and the fused ops it
is made of (``conv_lif``, ``bn_lif``, ``infer_conv_lif``, ``pack_spikes``, ...). Each public
function resolves its backend; the underscore forms take a resolved one. Input validation
(``check_spikes``, ``check_finite``) gives clear errors instead of crashes deep in C++.

A layer call runs one of the named paths (``Path``), chosen once per call by ``choose_path``
from the input kind, the backend's capabilities (``binslt.ops.backend.CAPABILITIES``) and
whether autograd records; ``run_path`` runs it. What a call reads travels as values: the
weight (``Weights``: W_eff, its bit planes, an input gain), the epilogue (``Epilogue``), the
neuron (``NeuronParams``) and the geometry (``Geometry``). binslt.ops never calls back into a
module: the layer makes the ``Weights`` the chosen path needs (``weight_need``).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import contract as C
from . import reference as ref
from .autograd import BNLIF, ConvLIF, _spike_pool, is_packed_input, values_unreadable
from .backend import CAPABILITIES, _run_auto, capabilities
from .registry import get_op
from .values import _CONV, Epilogue, Geometry, NeuronParams, Shortcut, Weights  # noqa: F401

# Backends whose pack_spikes kernel rejects non-binary input as it packs (for free), so the layers
# skip their separate full-tensor check there (read from the capability table).
PACK_VALIDATES = frozenset(be for be, cap in CAPABILITIES.items() if cap.pack_validates)

#: The input kinds of a spiking layer: 0/1 spikes, real values, and small non-negative integers
#: (sums of spikes, e.g. SEW ResNet's ADD: 0..k).
INPUTS = ("spike", "real", "spike-sum")


def check_spikes(x: torch.Tensor, name: str = "input") -> None:
    """Raise ValueError unless every element of ``x`` is exactly 0 or 1 (skipped when tracing)."""
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


def spike_sum_bits(x: torch.Tensor, name: str = "input") -> int:
    """The number of bit planes of integer spike-sum input ``x`` (values 0, 1, 2, ...): the bit
    length of its maximum (at least 1). ValueError for a negative, non-integer, NaN or inf value,
    or a maximum of 2^24 or more (past float32's exact integers)."""
    if x.numel() == 0:
        return 1
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0 and hi < 2 ** 24) or not bool((x == torch.trunc(x)).all()):
        raise ValueError(f"{name} must hold sums of spikes (integers 0, 1, 2, ... below 2^24), "
                         f"found values in [{lo}, {hi}] or a fraction. For real-valued input "
                         "construct the layer with input='real'.")
    return max(1, int(hi).bit_length())


# ---------------------------------------------------------------------------------------------
# The fused layer ops. Each public function resolves its backend; the underscore forms take a
# resolved one, so that a layer call resolves it once.
# ---------------------------------------------------------------------------------------------


def _conv_lif(be, x, w_eff, epi: Epilogue, nrn: NeuronParams, stride, padding, planes=None,
              pool=1):
    """The fused layer with autograd, its spikes max-pooled by ``pool`` (1: unchanged). A
    backend that fuses the 2x2 pool does it inside ConvLIF (its backward kernel routes the pooled
    gradient itself); the others through _spike_pool."""
    if capabilities(be).autograd_reference:
        T = x.shape[0]
        z = F.conv2d(x.flatten(0, 1), w_eff.to(x.dtype), stride=stride, padding=padding)
        s, mean, var = _bn_lif(be, z.view(T, -1, *z.shape[1:]), epi, nrn)
        return _spike_pool(be, s, pool), mean, var
    fused = pool == 2 and capabilities(be).fused_pool2
    s, mean, var = ConvLIF.apply(x, w_eff, epi.scale, epi.shift, epi.residual, stride, padding,
                                 epi.bn_train, epi.eps, *nrn.op_args(), be, planes,
                                 2 if fused else 1)[:3]
    return (s if fused else _spike_pool(be, s, pool)), mean, var


def _bn_lif(be, z, epi: Epilogue, nrn: NeuronParams):
    if capabilities(be).autograd_reference:
        x, mean, var = ref.epilogue(z, epi.scale.to(z.dtype), epi.shift.to(z.dtype),
                                    epi.residual, epi.bn_train, epi.eps)
        return ref.lif_multistep(x, **nrn.kwargs()), mean, var
    return BNLIF.apply(z, epi.scale, epi.shift, epi.residual, epi.bn_train, epi.eps,
                       *nrn.op_args(), be)[:3]


def _infer_conv_lif(be, x, planes, epi: Epilogue, nrn: NeuronParams, stride, padding, pool=1,
                    packed_out=False):
    packed_in = x.dtype == torch.int32  # words [T, N, H, W, Cw] of a previous layer
    if not packed_in:
        x = x.float()  # no copy for float32 spikes
    w_mask = planes[0]
    residual = epi.residual
    if isinstance(residual, Shortcut):
        if capabilities(be).fused_shortcut and not epi.bn_train:
            s = get_op("bconv_lif_infer_shortcut", be)(
                x, *planes[:2], planes[2].float(), epi.scale.float(), epi.shift.float(),
                *residual, stride, padding, *nrn.forward_args(), pool, packed_out)
            return s, None, None
        residual = residual.current()
    if residual is not None and residual.dtype == torch.int32 and (
            not capabilities(be).packed_residual or epi.bn_train):
        # spike words [T, N, Ho, Wo, Cow]: only some inference kernels read them packed
        t_, n_, ho, wo, _ = residual.shape
        residual = get_op("unpack_spikes", be)(residual.flatten(0, 1), w_mask.shape[0]).view(
            t_, n_, w_mask.shape[0], ho, wo)
    operands = (*planes[:2], planes[2].float(), epi.scale.float(), epi.shift.float(), residual)
    if epi.bn_train:
        T = x.shape[0]
        xp = x.flatten(0, 1) if packed_in else get_op("pack_spikes", be)(x.flatten(0, 1))
        s, _, mean, var = get_op("bconv_lif", be)(xp, *operands, T, stride, padding, True,
                                                  epi.eps, *nrn.forward_args())
        C.check_pool("bconv_lif_infer", pool, s.shape[3], s.shape[4])
        return ref.infer_output(s, pool, packed_out, get_op("pack_spikes", be)), mean, var
    s = get_op("bconv_lif_infer", be)(x, *operands, stride, padding, *nrn.forward_args(), pool,
                                      packed_out)
    return s, None, None


def conv_lif(x, w_eff, scale, shift, residual=None, *, stride=1, padding=0, bn_train=False,
             bn_eps=1e-5, tau=2.0, decay_input=True, v_threshold=1.0,
             v_reset: Optional[float] = 0.0, detach_reset=False, surrogate="atan",
             surrogate_alpha=2.0, backend="auto"):
    """Spikes of the fused layer on spike input x: [T, N, Ci, H, W]. Returns (spikes, mean, var).

    ``backend='torch'`` runs the autograd reference (any dtype); others run kernels (float32).
    """
    epi = Epilogue(scale, shift, bn_train, bn_eps, residual)
    nrn = NeuronParams(tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                       surrogate_alpha)
    return _run_auto(backend, x.device, lambda be: _conv_lif(be, x, w_eff, epi, nrn, stride,
                                                             padding))


def bn_lif(z, scale, shift, residual=None, *, bn_train=False, bn_eps=1e-5, tau=2.0,
           decay_input=True, v_threshold=1.0, v_reset: Optional[float] = 0.0, detach_reset=False,
           surrogate="atan", surrogate_alpha=2.0, backend="auto", neuron=None):
    """Spikes of (BN) (+residual) + LIF over a real current z: [T, N, C, *]. -> (spikes, mean,
    var). ``neuron`` (a ``NeuronParams``) replaces the seven neuron keywords."""
    epi = Epilogue(scale, shift, bn_train, bn_eps, residual)
    nrn = neuron if neuron is not None else NeuronParams(
        tau, decay_input, v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha)
    return _run_auto(backend, z.device, lambda be: _bn_lif(be, z, epi, nrn))


def infer_conv_lif(x, w_mask, w_pos, alpha, scale, shift, residual=None, *, stride=1, padding=0,
                   bn_train=False, bn_eps=1e-5, tau=2.0, decay_input=True, v_threshold=1.0,
                   v_reset: Optional[float] = 0.0, pool=1, packed_out=False, backend="auto"):
    """The no-grad inference path: binary conv + LIF of spikes x [T, N, C, H, W] (or packed
    words [T, N, H, W, Cw] int32) with packed weight planes -> (spikes, mean, var). ``pool=2``
    max-pools the spikes 2x2; ``packed_out`` returns them as words [T, N, Ho', Wo', Cw'] int32.
    With the eval epilogue it runs ``bconv_lif_infer`` (no packed copy of x and no counts are
    written); training BN needs ``bconv_lif``'s batch statistics (mean and var are None
    otherwise)."""
    epi = Epilogue(scale, shift, bn_train, bn_eps, residual)
    nrn = NeuronParams(tau, decay_input, v_threshold, v_reset)
    with torch.no_grad():
        return _run_auto(backend, x.device, lambda be: _infer_conv_lif(
            be, x, (w_mask, w_pos, alpha), epi, nrn, stride, padding, pool, packed_out))


# ---------------------------------------------------------------------------------------------
# The layer call: named paths, chosen once per call
# ---------------------------------------------------------------------------------------------


class Path(str, Enum):
    """The ways a spiking layer call runs (``choose_path`` picks one per call).

    ``SPIKE_TRAIN``: spikes through the fused autograd op (``ConvLIF``; the torch backend's
    autograd reference). ``SPIKE_INFER``: spikes (or packed words) through the packed no-grad
    kernel. ``DROPOUT_TRAIN`` / ``DROPOUT_INFER``: spikes behind a dropout, whose 1/(1-p) is the
    weight's input gain, folded into W_eff and the kernel gain (the spikes stay 0/1 and packed).
    ``REAL``: real input, a dense conv (linear) then the epilogue + LIF with autograd.
    ``REAL_INFER``: a real-input conv without autograd, its epilogue + LIF (+ pool, + pack) in one
    pass where the backend has it. ``SPIKE_SUM_BITS``: integer spike sums x without autograd as
    bit planes through the spike kernels, conv(x) = sum_b 2^b conv(bit_b(x)): exact integer
    counts times the gain, one rounding."""

    SPIKE_TRAIN = "spike-train"
    SPIKE_INFER = "spike-infer"
    DROPOUT_TRAIN = "spike-dropout-train"
    DROPOUT_INFER = "spike-dropout-infer"
    REAL = "real"
    REAL_INFER = "real-infer"
    SPIKE_SUM_BITS = "spike-sum-bits"

    __hash__ = str.__hash__  # (Enum's is a Python call; equal members are equal strings)


_PLANE_PATHS = frozenset({Path.SPIKE_INFER, Path.DROPOUT_INFER, Path.SPIKE_SUM_BITS})
_SPIKE_PATHS = frozenset({Path.SPIKE_TRAIN, Path.SPIKE_INFER, Path.DROPOUT_TRAIN,
                          Path.DROPOUT_INFER})


def choose_path(be: str, input: str = "spike", gain: float = 1.0, linear: bool = False,
                records: Optional[bool] = None) -> Path:
    """The path of a layer call on the resolved backend ``be``: by the input kind (``INPUTS``),
    the weight's input gain (a dropout's 1/(1-p)), whether autograd records the call
    (``records``; None: grad mode; the torch backend always runs its autograd reference) and the
    backend's capabilities. A call autograd would not record (a frozen ticket called without
    ``torch.no_grad()``, e.g. by ``torch.export.export``) runs the no-grad paths."""
    cap = capabilities(be)
    grad = cap.autograd_reference or (torch.is_grad_enabled() if records is None else records)
    if input == "spike":
        if gain != 1.0:
            return Path.DROPOUT_TRAIN if grad else Path.DROPOUT_INFER
        return Path.SPIKE_TRAIN if grad else Path.SPIKE_INFER
    if input == "spike-sum" and cap.bit_planes and not grad:
        return Path.SPIKE_SUM_BITS
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
    return Path.REAL if grad or linear else Path.REAL_INFER


def weight_need(path: Path, be: str) -> str:
    """What ``path`` reads of the weight on backend ``be``: 'planes' (the packed bit planes and
    gain, no autograd), 'w_eff+planes' (W_eff with autograd, and the bit planes of the pass
    that wrote it where the backend takes them) or 'w_eff'."""
    if path in _PLANE_PATHS:
        return "planes"
    if path in (Path.SPIKE_TRAIN, Path.DROPOUT_TRAIN) and capabilities(be).search_planes:
        return "w_eff+planes"
    return "w_eff"


def _check_call(path: Path, be: str, x, epi: Epilogue, geo: Geometry, who: str) -> None:
    """What the chosen path accepts: packed words in (no-grad spike paths), packed words out
    (no-grad conv paths), a packed residual (no-grad spike paths of a conv), and the values
    (binary spikes where the backend's packing does not check them, finite real input)."""
    packed_in = x.dtype == torch.int32
    packs_out = path in (Path.SPIKE_INFER, Path.DROPOUT_INFER) or (
        path in (Path.REAL_INFER, Path.SPIKE_SUM_BITS) and not geo.linear)
    if (packed_in and path not in (Path.SPIKE_INFER, Path.DROPOUT_INFER)) or (
            geo.packed_out and not packs_out):
        raise ValueError(f"{who}: packed spikes in need the no-grad spike-input path and packed "
                         f"spikes out a no-grad conv (a kernel backend under torch.no_grad()), "
                         f"got backend {be!r}, grad enabled={torch.is_grad_enabled()}, "
                         f"path {path.value}, linear={geo.linear}")
    res = epi.residual
    if isinstance(res, Shortcut):
        if path is not Path.SPIKE_INFER or geo.linear:
            raise ValueError(f"{who}: a Shortcut residual needs the no-grad spike-input path of "
                             f"a conv, got backend {be!r}, grad enabled="
                             f"{torch.is_grad_enabled()}, path {path.value}, linear={geo.linear}")
        res = None  # its parameters were checked where it was made
    packed_res = res is not None and res.dtype == torch.int32
    if packed_res and (path not in (Path.SPIKE_INFER, Path.DROPOUT_INFER) or geo.linear):
        raise ValueError(f"{who}: a packed (int32 spike words) residual needs the no-grad "
                         f"spike-input path of a conv, got backend {be!r}, grad enabled="
                         f"{torch.is_grad_enabled()}, linear={geo.linear}")
    if res is not None and not packed_res and not is_packed_input(res, be):
        check_finite(res, f"{who} residual")  # (an earlier layer's input was checked as spikes)
    if path in (Path.REAL, Path.REAL_INFER):
        check_finite(x, f"{who} input")
    elif path in _SPIKE_PATHS and not packed_in and not capabilities(be).pack_validates:
        check_spikes(x, f"{who} input")


def _as_image(x, epi: Epilogue, geo: Geometry):
    """A linear layer's [T, N, F] input (and [T, N, O] residual) as 1x1 images."""
    if not geo.linear:
        return x, epi
    T, n, res = *x.shape[:2], epi.residual
    if x.dtype != torch.int32:  # explicit sizes: -1 is ambiguous at N = 0
        x = x.reshape(T, n, x.shape[2], 1, 1)
    co = epi.scale.shape[0]
    return x, epi.with_residual(None if res is None else res.reshape(T, n, co, 1, 1))


def _spike_sizes(x, w: Weights, epi: Epilogue) -> tuple[int, int, int]:
    """(T, N, C_out) of a spike path's call; the spike paths take an input gain of 1."""
    if w.gain != 1.0:
        raise ValueError("the spike paths take an input gain of 1; spikes behind a dropout run "
                         "the dropout paths")
    return x.shape[0], x.shape[1], epi.scale.shape[0]


def _spike_train(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """Spikes with autograd: the fused op (W_eff, and its bit planes where given)."""
    T, n, co = _spike_sizes(x, w, epi)
    # A linear layer on spikes runs as a 1x1 conv. Where the backend takes it, the batch is laid
    # out as the pixels of one 1 x N image per step ([T, 1, F, 1, N]): the same sums, BN
    # statistics over the same (T, N) values, but the kernels' rows run over the batch.
    as_row = geo.linear and capabilities(be).batch_as_row and n > 0
    if as_row:
        res = epi.residual
        x = x.transpose(1, 2).reshape(T, 1, x.shape[2], 1, n)
        epi = epi.with_residual(None if res is None else res.transpose(1, 2).reshape(
            T, 1, co, 1, n))
    else:
        x, epi = _as_image(x, epi, geo)
    w_eff = w.w_eff[:, :, None, None] if geo.linear else w.w_eff
    s, mean, var = _conv_lif(be, x, w_eff, epi, nrn, geo.stride, geo.padding, w.planes,
                             geo.pool)
    if as_row:
        # contiguous [T, N, F] like every other path's: a transposed layout would send the next
        # dense layer (the classifier) down another BLAS path, with other float rounding
        return s.view(T, co, n).transpose(1, 2).contiguous(), mean, var
    return (s.view(T, n, co) if geo.linear else s), mean, var


def _spike_infer(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """Spikes (or packed words) without autograd: the packed inference kernel."""
    T, n, co = _spike_sizes(x, w, epi)
    packed_in = x.dtype == torch.int32
    x, epi = _as_image(x, epi, geo)
    res = epi.residual
    if res is not None and not isinstance(res, Shortcut):
        epi = epi.with_residual(res.contiguous() if res.dtype == torch.int32
                                else res.float().contiguous())
    s, mean, var = _infer_conv_lif(be, x, w.packed(be), epi, nrn, geo.stride, geo.padding,
                                   geo.pool, geo.packed_out)
    if geo.packed_out:
        return s, mean, var
    s = s.to(torch.float32 if packed_in else x.dtype)
    return (s.view(T, n, co) if geo.linear else s), mean, var


def _dropout_train(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """Spikes behind a dropout, with autograd: conv(gain * x) as conv(x) with gain * W_eff (and
    gain * the kernel gain), so that x stays 0/1 spikes on the fused op."""
    return _spike_train(be, x, w.folded(), epi, nrn, geo)


def _dropout_infer(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """Spikes behind a dropout, without autograd: the packed kernel with gain * the kernel
    gain."""
    return _spike_infer(be, x, w.folded(), epi, nrn, geo)


#: Input channels up to which a real-input conv runs channels-last where the no-grad epilogue
#: reads such a current (``Capabilities.channels_last_current``). oneDNN's float32 conv of
#: 3-channel images runs ~10x faster so (VGG-11's first layer, 32 images 3->64 32x32, 2-core
#: Xeon with AVX-512: 0.60 ms channels-last against 5.8 ms NCHW), and up to 16 channels it gave
#: the NCHW conv's currents bit for bit on that machine.
CHANNELS_LAST_MAX_CHANNELS = 4


def _real_current(x, w_eff, geo: Geometry, channels_last: bool = False):
    """The dense current of real input x (W_eff in x's dtype). Direct encoding repeats the image
    over T as an expanded view (stride 0): its current is computed once and expanded.
    ``channels_last``: the conv runs in ChannelsLast and its steps stay so."""
    T, n = x.shape[:2]
    w_eff = w_eff.to(x.dtype)
    once = T > 1 and x.stride(0) == 0
    xin = x[:1] if once else x
    if geo.linear:
        z = F.linear(xin, w_eff)
    else:
        xin4 = xin.flatten(0, 1)
        if channels_last:
            xin4 = xin4.contiguous(memory_format=torch.channels_last)
            w_eff = w_eff.contiguous(memory_format=torch.channels_last)
        z = F.conv2d(xin4, w_eff, stride=geo.stride, padding=geo.padding)
        z = z.unflatten(0, (xin.shape[0], n))
    return z.expand(T, *z.shape[1:]) if once else z


def _real(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """Real input with autograd: the dense conv (linear), then the epilogue + LIF."""
    z = _real_current(x, w.folded().dense(), geo)
    s, mean, var = _bn_lif(be, z, epi, nrn)
    return _spike_pool(be, s, geo.pool), mean, var


def _real_infer(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """A real-input conv without autograd: the dense conv, then the current's epilogue + LIF."""
    cl = (capabilities(be).channels_last_current and _fused_real_infer(be, epi)
          and not geo.linear and x.shape[2] <= CHANNELS_LAST_MAX_CHANNELS)
    z = _real_current(x, w.folded().dense(), geo, channels_last=cl)
    return _current_infer(be, z, epi, nrn, geo, x.dtype)


def _fused_real_infer(be, epi: Epilogue) -> bool:
    """Whether a no-grad real-input current's epilogue + LIF is ``binslt::bn_lif_infer``."""
    return capabilities(be).fused_real_infer and not epi.bn_train and epi.residual is None


def _current_infer(be, z, epi: Epilogue, nrn: NeuronParams, geo: Geometry, dtype):
    """A conv's no-grad epilogue + LIF over its current z [T, N, C, H, W] (an expanded view when
    the input was), pooled and packed as asked -> (spikes, mean, var). Where the backend fuses
    it, the eval epilogue runs ``binslt::bn_lif_infer``: one pass from the current to the
    pooled, packed spikes, reading an expanded current once per step in place."""
    if _fused_real_infer(be, epi):
        s = torch.ops.binslt.bn_lif_infer(z.float(), epi.scale.float(), epi.shift.float(),
                                          *nrn.forward_args(), geo.pool, geo.packed_out)
        return (s if geo.packed_out else s.to(dtype)), None, None
    s, mean, var = _bn_lif(be, z, epi, nrn)
    s = ref.infer_output(s.float(), geo.pool, geo.packed_out, get_op("pack_spikes", be))
    return (s if geo.packed_out else s.to(dtype)), mean, var


def bit_plane_current(be, x, planes, stride: int = 1, padding: int = 0,
                      bits: Optional[int] = None) -> torch.Tensor:
    """conv(x) of integer spike sums x [T, N, C, H, W] with the weight's bit planes (mask bits,
    positive bits, gain) as sum_b 2^b conv(bit_b(x)): each plane's exact integer counts from the
    backend's spike kernel (``bconv_lif`` with unit gain), summed as integers and times the
    gain once -> [T, N, Co, Ho, Wo] in x's dtype (float32 at least). ``bits``: the number of
    planes (``spike_sum_bits(x)``, which also checks the values, where None). An input expanded
    over T (time stride 0) is convolved once."""
    T, n = x.shape[:2]
    once = T > 1 and x.stride(0) == 0
    xin = x[:1] if once else x
    steps = xin.shape[0]
    w_mask, w_pos, gain = planes
    co = w_mask.shape[0]
    one = torch.ones(co, dtype=torch.float32, device=x.device)
    zero = torch.zeros_like(one)
    xi = xin.flatten(0, 1).to(torch.int32)
    total = None
    for b in range(spike_sum_bits(x) if bits is None else bits):
        bits = get_op("pack_spikes", be)(((xi >> b) & 1).float())
        counts = get_op("bconv_lif", be)(bits, w_mask, w_pos, one, one, zero, None, steps, stride,
                                         padding, False, 1e-5, 2.0, True, 1.0, 0.0)[1]
        counts = counts.to(torch.int32)
        total = counts if total is None else total.add_(counts << b)
    dtype = torch.promote_types(x.dtype, torch.float32)
    z = total.to(dtype) * gain.to(dtype).view(1, 1, co, 1, 1)
    return z.expand(T, *z.shape[1:]) if once else z


def _spike_sum_bits(be, x, w: Weights, epi: Epilogue, nrn: NeuronParams, geo: Geometry):
    """Integer spike sums without autograd: the bit-plane current (``bit_plane_current``), then
    the conv's no-grad epilogue + LIF (a linear layer's: the LIF over [T, N, O])."""
    T, n = x.shape[:2]
    xi, epi = _as_image(x, epi, geo)
    bits = spike_sum_bits(x, "spike-sum input")
    z = bit_plane_current(be, xi, w.folded().packed(be), geo.stride, geo.padding, bits)
    if not geo.linear:
        return _current_infer(be, z, epi, nrn, geo, x.dtype)
    co, res = epi.scale.shape[0], epi.residual
    s, mean, var = _bn_lif(be, z.view(T, n, co), epi.with_residual(
        None if res is None else res.view(T, n, co)), nrn)
    return s.to(x.dtype), mean, var


_PATHS: dict[Path, Callable] = {
    Path.SPIKE_TRAIN: _spike_train,
    Path.SPIKE_INFER: _spike_infer,
    Path.DROPOUT_TRAIN: _dropout_train,
    Path.DROPOUT_INFER: _dropout_infer,
    Path.REAL: _real,
    Path.REAL_INFER: _real_infer,
    Path.SPIKE_SUM_BITS: _spike_sum_bits,
}


def run_path(path: Path, be: str, x: torch.Tensor, weights: Weights, epilogue: Epilogue,
             neuron: NeuronParams, geometry: Geometry = _CONV, who: str = "layer"):
    """Run one layer call on the resolved backend ``be`` by ``path`` -> (spikes, mean, var),
    after checking what the path accepts (``_check_call``). ``choose_path`` picks the path;
    naming one runs it (e.g. ``Path.SPIKE_SUM_BITS`` where the backend does not take it by
    default)."""
    _check_call(path, be, x, epilogue, geometry, who)
    return _PATHS[path](be, x, weights, epilogue, neuron, geometry)


def spiking_layer(x, weights: Weights, epilogue: Epilogue, neuron: NeuronParams, *,
                  input: str = "spike", geometry: Geometry = _CONV, backend="auto",
                  who="layer"):
    """One call of a masked sign-weight spiking layer -> (spikes, mean, var).

    x is [T, N, C, H, W] (``geometry.linear``: [T, N, F], run as a 1x1 image with F channels),
    or, on the no-grad spike path, packed words [T, N, H, W, Cw] int32 from a previous layer's
    ``packed_out``; ``input`` is its kind (``INPUTS``). ``weights`` holds W_eff and/or its bit
    planes (packed from W_eff where a no-grad path needs them) and the input gain; ``epilogue``
    the BN / affine and the residual; ``neuron`` the LIF settings; ``geometry`` the conv, the 2x2
    pool (fused into the inference kernel; in training one bit per spike is saved for the
    backward) and packed words out. The backend is resolved once and the path chosen once
    (``choose_path``). With backend 'auto', a backend whose first call fails recoverably hands
    the call to the next one (``_run_auto``). A layer that makes its ``Weights`` for the chosen
    path calls ``choose_path``, ``weight_need`` and ``run_path`` itself (``run_auto``)."""
    def call(be):
        path = choose_path(be, input, weights.gain, geometry.linear)
        return run_path(path, be, x, weights, epilogue, neuron, geometry, who)
    return _run_auto(backend, x.device, call)


#: ``run_auto(backend, device, run)``: ``run(be)`` on the backend ``backend`` resolves to, with
#: auto's first-call fall-back (a layer that makes its ``Weights`` per path calls it).
run_auto = _run_auto


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
