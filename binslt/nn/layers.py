"""Public multi-step modules. Inputs are time-major: ``[T, N, ...]``.

``BinSpikeConv2d`` / ``BinSpikeLinear`` replace a SpikingJelly ``layer.Conv2d`` (+
``layer.BatchNorm2d``) + ``neuron.LIFNode`` (step mode 'm') with a masked sign-weight layer whose
weights are never trained in search mode (docs/design.md section 1). Their neuron defaults are
SpikingJelly's, so they drop in; the search CLI uses the paper's (decay=0.99, decay_input=False).

Note on naming: ``prune_rate`` here is the fraction of weights *removed*. The biprop code calls
the kept fraction ``prune_rate``; we do not.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import contract as C
from ..ops import reference as ref
from ..ops.schemas import SURROGATES

MODES = ("search", "finetune", "frozen")


class NonFiniteError(ValueError):
    """NaN or inf in a layer's scores, weight or BN statistics, named by the layer that holds it
    (``"BinSpikeConv2d features.3: scores contain NaN (2 of 73728); ..."``)."""


# The kernels' messages for non-finite data (binslt::topk_mask, sign_gain_pack, the BN
# statistics of bn_lif / bconv_lif; reference.raise_non_finite).
_NON_FINITE = ("contain NaN", "contain inf", "contains NaN", "contains inf",
               "BN batch statistics are not finite")


def _named_error(layer: nn.Module, err: ValueError) -> Optional[NonFiniteError]:
    """The op error ``err`` re-raised with the layer's name if it is a kernel's non-finite check;
    None for any other error (the caller re-raises it as it is)."""
    if isinstance(err, NonFiniteError):
        return None
    msg = str(err).splitlines()[0] if str(err) else ""
    if not msg.startswith("binslt::") or not any(m in msg for m in _NON_FINITE):
        return None
    return NonFiniteError(f"{layer_label(layer)}: {msg.split(': ', 1)[-1]}")


def layer_label(layer: nn.Module) -> str:
    """``"BinSpikeConv2d features.3"``: the class and the name ``name_layers`` gave the layer in
    its model (the class alone for a layer no model named)."""
    name = layer.__dict__.get("_binslt_name")
    return f"{type(layer).__name__} {name}" if name else type(layer).__name__


def name_layers(model: nn.Module) -> nn.Module:
    """Records each binslt layer's qualified name in ``model`` (``features.3``), which its errors
    then carry. ``binslt.convert`` and the run loop call it; returns ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, (_MaskedSignWeight, LIF, SpikeMaxPool2d)):
            m.__dict__["_binslt_name"] = name
    return model


class MultiStepOnly:
    """Step mode 'm' only: binslt layers take whole sequences [T, N, ...] (time first) and keep
    no state between calls. ``step_mode`` reads 'm'; setting it (SpikingJelly's
    ``functional.set_step_mode``) to anything else is a ValueError, not a silent no-op."""

    @property
    def step_mode(self) -> str:
        return "m"

    @step_mode.setter
    def step_mode(self, mode) -> None:
        if mode != "m":
            raise ValueError(
                f"{layer_label(self)} is multi-step only (step_mode 'm'): it takes whole "
                f"sequences [T, N, ...] with time first and keeps no state between calls, got "
                f"step_mode={mode!r}. Keep the model in step mode 'm' and give a single step as "
                "x.unsqueeze(0)")


_NEURON_ARGS = """\
        tau (float, optional): LIF membrane time constant (None: SpikingJelly's 2.0); give
            either ``tau`` or ``decay``.
        decay (float, optional): the leak lambda = 1 - 1/tau in (0, 1], instead of ``tau``.
        decay_input (bool, optional): LIF: H = V + (X - (V - v_reset)) / tau (True, None:
            SpikingJelly's default) or H = V - (V - v_reset) / tau + X (False, the paper's).
        v_threshold (float): firing threshold (default 1.0).
        v_reset (float or None): hard-reset potential (default 0.0); None: soft reset (subtract
            the threshold).
        detach_reset (bool): keep the reset out of the backward graph (default False).
        surrogate (str): the spike's surrogate gradient, 'atan' (default), 'sigmoid', 'rect' or
            'piecewise_quadratic' (SpikingJelly's ATan, Sigmoid, Rect, PiecewiseQuadratic).
        surrogate_alpha (float): the surrogate's sharpness (default 2.0; SpikingJelly's defaults
            are ``binslt.ops.schemas.DEFAULT_SURROGATE_ALPHA``).
        neuron (str): 'lif' (default) or 'if' (SpikingJelly's IFNode, H = V + X: takes no tau,
            decay or decay_input=True)."""

_WEIGHT_ARGS = """\
        prune_rate (float): the fraction of weights *removed* by the mask, in [0, 1)
            (default 0.5).
        per_channel_gain (bool): one gain alpha per output channel instead of one per layer
            (default False)."""

_SPIKE_ARGS = """\
        bn (bool): a BatchNorm after the conv / linear, fused into the neuron (default False).
        bn_affine (bool): the BatchNorm has a learnable scale and shift (default False: the
            paper's; only the running statistics are kept).
        bn_eps (float): the BatchNorm's eps (default 1e-5).
        bn_momentum (float): the BatchNorm's running-statistics momentum (default 0.1).
        input (str): 'spike' (default: 0/1 spikes, bit-packed on the kernel paths) or 'real'
            (real values, e.g. the first layer's images).
        backend (str): the kernel: 'auto' (default: the fastest checked one for the device),
            'torch' (the pure-torch reference), 'cpu' (C++), 'triton' or 'cuda'."""

_MODE_DOC = """\
    ``mode`` (a property; all layers start in 'search'): 'search' trains the scores s (the mask
    is the top-|s| of them, the weights w stay frozen), 'finetune' fixes the mask and trains
    w, 'frozen' keeps only the packed bit planes and the gain (inference; no way back). A mode
    switch sets ``weight.requires_grad`` / ``scores.requires_grad`` to what the new mode trains,
    except in a layer the user froze: when every parameter the current mode trains has
    requires_grad False (``requires_grad_(False)`` on the model, the layer or those
    parameters), the switch keeps both frozen; a switch never turns on gradients the user
    turned off. ``requires_grad_(True)`` before the switch lets the modes drive them again."""


_IntOrPair = Union[int, tuple[int, int]]


def _square(v: _IntOrPair, name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} must be an int or a square pair, got {v!r}")
        v = v[0]
    if not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


NEURONS = ("lif", "if")


class NeuronConfig:
    """The neuron settings shared by the spiking modules: SpikingJelly's ``LIFNode``
    (``neuron="lif"``) or ``IFNode`` (``neuron="if"``: H = V + X, no leak), step mode 'm'.

    ``tau`` (default 2.0, SpikingJelly's) or ``decay`` (lambda = 1 - 1/tau) and ``decay_input``
    (default True) are LIF settings. An IF neuron has no leak, so it refuses an explicit tau,
    decay or decay_input=True; the ops run it as the LIF arithmetic with tau = +inf and
    decay_input=False, which is H = V + X exactly (binslt.ops.contract.check_tau).
    """

    def __init__(self, tau: Optional[float] = None, decay_input: Optional[bool] = None,
                 v_threshold=1.0, v_reset: Optional[float] = 0.0, detach_reset=False,
                 surrogate="atan", surrogate_alpha=2.0, decay=None, who="NeuronConfig",
                 neuron: str = "lif"):
        if neuron not in NEURONS:
            raise ValueError(f"{who}: neuron must be one of {NEURONS}, got {neuron!r}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got {surrogate!r}")
        self.neuron = neuron
        if neuron == "if":
            check_if_settings(who, tau, decay, decay_input)
            self.tau, self.decay_input = math.inf, False
        else:
            self.tau = C.resolve_tau(2.0 if tau is None else tau, decay, who)
            self.decay_input = True if decay_input is None else bool(decay_input)
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = bool(detach_reset)
        self.surrogate = surrogate
        self.surrogate_alpha = float(surrogate_alpha)

    def kwargs(self) -> dict:
        """The ops' neuron arguments (IF: tau = +inf, decay_input = False)."""
        return dict(tau=self.tau, decay_input=self.decay_input, v_threshold=self.v_threshold,
                    v_reset=self.v_reset, detach_reset=self.detach_reset,
                    surrogate=self.surrogate, surrogate_alpha=self.surrogate_alpha)

    def record(self) -> dict:
        """The settings as plain JSON values (tickets' metadata): an IF record has no tau and no
        decay_input, since +inf is not valid JSON."""
        rec = dict(neuron=self.neuron, **self.kwargs())
        if self.neuron == "if":
            del rec["tau"], rec["decay_input"]
        return rec

    def load_record(self, rec: dict) -> None:
        """Sets the settings from ``record()``'s dict (KeyError: an unknown or missing key;
        ValueError: a bad value). A record without ``neuron`` is a LIF's."""
        rec = dict(rec)
        unknown = sorted(set(rec) - {"neuron", *self.kwargs()})
        if unknown:
            raise KeyError(unknown[0])
        neuron = rec.pop("neuron", "lif")
        if neuron == "lif":
            for k in ("tau", "decay_input"):
                if k not in rec:
                    raise KeyError(k)
        base = {k: v for k, v in self.kwargs().items() if k not in ("tau", "decay_input")}
        new = NeuronConfig(**{**base, **rec}, neuron=neuron)
        self.__dict__.update(new.__dict__)

    def extra_repr(self) -> str:
        lead = ("neuron=IF" if self.neuron == "if" else
                f"tau={self.tau:g}, decay_input={self.decay_input}")
        return (f"{lead}, v_threshold={self.v_threshold:g}, v_reset={self.v_reset}, "
                f"detach_reset={self.detach_reset}, "
                f"surrogate={self.surrogate}({self.surrogate_alpha:g})")


def check_if_settings(who: str, tau, decay, decay_input) -> None:
    """neuron='if' has no leak: an explicit tau, decay or decay_input=True is a mistake."""
    given = [f"{k}={v!r}" for k, v in (("tau", tau), ("decay", decay)) if v is not None]
    if decay_input:
        given.append("decay_input=True")
    if given:
        raise ValueError(f"{who}: neuron='if' has no leak (H = V + X) and takes no tau, decay or "
                         f"decay_input=True; drop them or use neuron='lif', got "
                         f"{', '.join(given)}")


class TorchScriptNotSupportedError(RuntimeError):
    """``torch.jit.script`` / ``torch.jit.trace`` of a binslt layer or model."""


def torchscript_error(who: str) -> TorchScriptNotSupportedError:
    """The error that ``torch.jit.script`` / ``torch.jit.trace`` of a binslt module raises,
    before TorchScript's own (an f-string or ``unordered_map::at``)."""
    return TorchScriptNotSupportedError(
        f"{who}: TorchScript (torch.jit.script / torch.jit.trace) is not supported by binslt "
        "layers and models; use torch.export instead: binslt.interop.export.export_program("
        "model, example_input) for a frozen ticket model, or torch.export.export(model, (x,))")


def _refuse_jit_trace(module: nn.Module) -> None:
    """Raises ``torchscript_error`` inside ``torch.jit.trace`` (at the top of a forward)."""
    if torch.jit.is_tracing():
        raise torchscript_error(type(module).__name__)


class _NoTorchScript:
    """Mixin of the binslt modules: ``torch.jit.script`` calls ``__prepare_scriptable__`` on a
    module and on each submodule before it compiles anything, so it fails here first."""

    def __prepare_scriptable__(self):
        raise torchscript_error(type(self).__name__)


def _check_input(x: torch.Tensor, rank: int, layout: str, channels: int, cdim: int,
                 ref_param: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{who} expects a multi-step input {layout} (rank {rank}), got shape "
                         f"{tuple(x.shape)}. Single-step tensors need a leading time dim: "
                         "x.unsqueeze(0)")
    if x.shape[cdim] != channels:
        raise ValueError(f"{who} expects {channels} channels at dim {cdim} of {layout}, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got {x.dtype}")
    if x.device != ref_param.device:
        raise ValueError(f"{who}: input is on {x.device} but the layer's weights are on "
                         f"{ref_param.device}; move one of them (.to(device))")


class _MaskedSignWeight(MultiStepOnly, _NoTorchScript, nn.Module):
    """Frozen real weight ``w``, trainable scores ``s`` and the effective weight
    ``W_eff = alpha * sign(w) * M`` (docs/design.md section 1).

    NaN or inf in the scores, the weight or a spiking layer's BN batch statistics is a
    ``NonFiniteError`` naming the layer, found by the kernels in the passes that read them (no
    extra host read per call); a checkpoint holding them fails at ``load_state_dict``.
    """

    #: A constant factor of a spiking layer's input, folded into its gain: the layer computes
    #: ``conv(input_gain * x)`` as ``conv(x)`` with ``input_gain * W_eff``, so that ``x`` stays
    #: 0/1 spikes on the packed path (a dropout's 1/(1-p) in front of a converted layer:
    #: ``binslt.interop.convert.SpikeDropout`` sets it on every call).
    input_gain = 1.0

    def __init__(self, shape: tuple[int, ...], prune_rate: float, per_channel_gain: bool = False):
        super().__init__()
        self.prune_rate = C.check_prune_rate(prune_rate)
        self.per_channel_gain = bool(per_channel_gain)
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.scores = nn.Parameter(torch.empty(shape))
        self.register_buffer("mask", None)
        self.register_buffer("w_mask_bits", None)
        self.register_buffer("w_pos_bits", None)
        self.register_buffer("alpha", None)
        self._mode = "search"
        self.reset_parameters()

    def _weight_repr(self) -> str:
        """The masked sign-weight settings in a layer's repr: prune rate, mode and (where set)
        the per-channel gain."""
        return (f"prune_rate={self.prune_rate}, mode={self.mode}"
                + (", per_channel_gain=True" if self.per_channel_gain else ""))

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == self._mode:
            return
        if self._mode == "frozen":
            raise RuntimeError("a frozen layer holds only packed bits; it cannot go back to "
                               f"{mode!r} (load the searched checkpoint instead)")
        with torch.no_grad():
            if mode == "finetune":
                self.mask = self.current_mask()
            elif mode == "search":
                self.mask = None
            else:  # frozen: keep only the packed bit planes and the gain
                self.w_mask_bits, self.w_pos_bits, self.alpha = self._pack_effective_weight()
                self.mask = None
        self._set_mode_grads(mode)
        self._mode = mode

    #: Which parameters each mode trains.
    _MODE_GRADS = {"search": {"weight": False, "scores": True},
                   "finetune": {"weight": True, "scores": False},
                   "frozen": {"weight": False, "scores": False}}

    def _set_mode_grads(self, mode: str) -> None:
        """``requires_grad`` of weight / scores for ``mode``, keeping the user's freeze: when
        every parameter that the current mode trains has requires_grad False, the user froze
        the layer (``requires_grad_(False)`` on it, its model or those parameters), and the
        layer stays frozen in the new mode; once one of them is True again, the modes drive the
        flags."""
        trained = [getattr(self, n) for n, on in self._MODE_GRADS[self._mode].items() if on]
        if trained:  # 'frozen' trains nothing: the flag carries over unchanged
            self.__dict__["_user_frozen"] = not any(p.requires_grad for p in trained)
        user_frozen = self.__dict__.get("_user_frozen", False)
        for name, on in self._MODE_GRADS[mode].items():
            getattr(self, name).requires_grad_(on and not user_frozen)

    def train(self, mode: bool = True):
        self.__dict__.pop("_packed_cache", None)  # also the way to drop it after a .data write
        return super().train(mode)

    def current_mask(self) -> torch.Tensor:
        """The {0,1} mask M in use: top-|s| in search mode, the fixed one otherwise."""
        if self._mode == "search":
            try:
                return ops.topk_mask(self.scores, self.prune_rate)
            except ValueError as err:
                named = _named_error(self, err)
                if named is None:
                    raise
                raise named from err
        if self._mode == "finetune":
            return self.mask
        w = self.effective_weight()
        return (w != 0).to(w.dtype)

    def effective_weight(self) -> torch.Tensor:
        """alpha * sign(w) * M, differentiable as the mode prescribes."""
        if self._mode == "search":
            try:
                return ops.masked_sign_weight(self.weight, self.scores, self.prune_rate,
                                              self.per_channel_gain)
            except ValueError as err:
                named = _named_error(self, err)
                if named is None:
                    raise
                raise named from err
        if self._mode == "finetune":
            return ref.masked_sign_weight_finetune(self.weight, self.mask, self.per_channel_gain)
        cin = self.weight.shape[1]
        w = ref.unpack_weight_reference(self.w_mask_bits, self.w_pos_bits, cin, self.alpha)
        return w.view(self.weight.shape).to(self.weight.dtype)

    def effective_weight_planes(self):
        """``(effective_weight(), planes)``: in search mode on the CPU, planes = (mask bits,
        positive bits, gain) of that W_eff (``pack_weight`` and ``ops.max_abs_gain`` of it),
        written in the same pass; None otherwise (the caller packs W_eff)."""
        if self._mode == "search":
            try:
                return ops.masked_sign_weight(self.weight, self.scores, self.prune_rate,
                                              self.per_channel_gain, planes=True)
            except ValueError as err:
                named = _named_error(self, err)
                if named is None:
                    raise
                raise named from err
        return self.effective_weight(), None

    def packed_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask bits, positive bits [Co, kh, kw, Cw] int32, alpha [Co] float32) of W_eff.

        Frozen layers return their buffers. Otherwise the packing is cached until the scores,
        the weight or the mask change (their version counters move on every in-place update, so
        an optimiser step or ``load_state_dict`` invalidates it): inference does not redo the
        top-|s| selection and the packing on every call. Writes through ``.data`` bypass version
        counters (as they bypass autograd's checks): after one, call ``train()``/``eval()``
        (which drop the cache) before the next no-grad call.
        """
        if self._mode == "frozen":
            return self.w_mask_bits, self.w_pos_bits, self.alpha
        if torch.compiler.is_compiling():  # traced graphs recompute; no Python-side cache
            return self._pack_effective_weight()
        key = (self._mode, self.prune_rate, self.per_channel_gain, self.weight._version,
               self.weight.data_ptr(), self.scores._version, self.scores.data_ptr(),
               None if self.mask is None else (self.mask._version, self.mask.data_ptr()))
        cache = self.__dict__.get("_packed_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        planes = self._pack_effective_weight()
        self.__dict__["_packed_cache"] = (key, planes)
        return planes

    @torch.no_grad()
    def _pack_effective_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pack the current W_eff ([O, F] linear weights as 1x1 kernels) into bit planes + gain."""
        w = self.effective_weight().detach().float()
        w4 = w.view(w.shape[0], w.shape[1], *w.shape[2:], *([1] * (4 - w.dim())))
        return ops.pack_weight(w4) + (ops.max_abs_gain(w4),)

    def mean_abs_gain(self) -> torch.Tensor:
        """The search's gain: mean |w| over the weights the current mask keeps."""
        return ref.mean_abs_gain(self.weight, self.current_mask(), self.per_channel_gain)

    def _fire(self, x: torch.Tensor, residual: Optional[torch.Tensor], channels: int, *,
              linear: bool, stride: int = 1, padding: int = 0, pool: int = 1,
              stat_count: Optional[int] = None, packed_out: bool = False) -> torch.Tensor:
        """The spiking layer call: the BN epilogue, one ops call, the BN running statistics
        (over ``stat_count`` neurons per channel: the count before pooling)."""
        scale, shift, bn_train = _bn_scale_shift(self.bn, channels, x)
        weight = self if self.input_gain == 1.0 else _GainScaled(self, float(self.input_gain))
        # eps enters the op only with batch statistics; eval BN is folded above with its own
        # eps (which nn.BatchNorm allows to be 0).
        bn_eps = self.bn.eps if bn_train else 1e-5
        try:
            s, mean, var = ops.spiking_layer(
                x, weight, scale, shift, residual, linear=linear, stride=stride,
                padding=padding, real_input=self.input == "real", bn_train=bn_train,
                bn_eps=bn_eps, neuron=self.neuron.kwargs(), pool=pool, packed_out=packed_out,
                backend=self.backend, who=layer_label(self))
        except ValueError as err:
            named = _named_error(self, err)
            if named is None:
                raise
            raise named from err
        if self.store_v_seq:
            self._store_v(x, weight, scale, shift, residual, bn_train, bn_eps, linear, stride,
                          padding)
        if bn_train:
            _update_running_stats(self.bn, mean, var,
                                  s.numel() // channels if stat_count is None else stat_count)
        return s

    #: Keep the membrane potential of the last call (``v_seq`` [T, N, C, H', W'] before any
    #: pool, ``v`` its last step: SpikingJelly's ``LIFNode(store_v_seq=True)`` attributes, which
    #: ``monitor.AttributeMonitor('v')`` reads). A debug path: the fused kernels never write V,
    #: so each call recomputes it through the reference (binslt.reference), off the graph.
    store_v_seq = False

    def __getattr__(self, name: str):
        if name == "v":  # V after the last step of the last call (store_v_seq)
            v_seq = self.__dict__.get("v_seq")
            if v_seq is None:
                raise AttributeError(
                    f"{layer_label(self)} keeps no membrane potential v: its kernels never "
                    "write V. Set layer.store_v_seq = True (a slower debug path through the "
                    "reference) and call it again; then .v and .v_seq hold V")
            return v_seq[-1]
        return super().__getattr__(name)

    @torch.no_grad()
    def _store_v(self, x, weight, scale, shift, residual, bn_train, bn_eps, linear, stride,
                 padding) -> None:
        """V [T, N, ...] of this call, recomputed through the reference: the current, the
        epilogue (the batch statistics of this call when BN trains) and SpikingJelly's LIF."""
        if x.dtype == torch.int32:  # packed spikes of a previous layer's forward_packed
            t_, n_ = x.shape[:2]
            x = ops.unpack_spikes(x.flatten(0, 1), self.weight.shape[1]).view(
                t_, n_, self.weight.shape[1], *x.shape[2:4])
        if residual is not None and residual.dtype == torch.int32:
            t_, n_ = residual.shape[:2]
            residual = ops.unpack_spikes(residual.flatten(0, 1), self.weight.shape[0]).view(
                t_, n_, self.weight.shape[0], *residual.shape[2:4])
        w = weight.effective_weight().detach().float()
        xf = x.detach().float()
        if linear:
            z = F.linear(xf, w)[..., None, None]
            res = None if residual is None else residual.float()[..., None, None]
        else:
            z = F.conv2d(xf.flatten(0, 1), w, stride=stride, padding=padding)
            z = z.view(*xf.shape[:2], *z.shape[1:])
            res = None if residual is None else residual.float()
        y, _, _ = ref.epilogue(z, scale.detach().float(), shift.detach().float(), res, bn_train,
                               bn_eps)
        nk = self.neuron
        vr = 0.0 if nk.v_reset is None else nk.v_reset
        v = torch.full_like(y[0], vr)
        vs = []
        for yt in y:  # SpikingJelly's charge, fire, reset (reference.lif_multistep's order)
            h = (v + (yt - (v - vr)) / nk.tau if nk.decay_input
                 else v - (v - vr) / nk.tau + yt)
            sp = (h >= nk.v_threshold).to(h.dtype)
            v = h - sp * nk.v_threshold if nk.v_reset is None else sp * nk.v_reset + (1 - sp) * h
            vs.append(v)
        v_seq = torch.stack(vs)
        self.__dict__["v_seq"] = v_seq.view(*v_seq.shape[:3]) if linear else v_seq

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _check_loaded_finite(self, state_dict, prefix)
        # Buffers that are None in this mode but present in the file (or vice versa) follow the
        # file: a checkpoint saved in finetune/frozen mode restores that mode.
        for name in ("mask", "w_mask_bits", "w_pos_bits", "alpha"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key]))
        if prefix + "w_mask_bits" in state_dict:
            self._set_mode_grads("frozen")
            self._mode = "frozen"
        elif prefix + "mask" in state_dict:
            self._set_mode_grads("finetune")
            self._mode = "finetune"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_loaded_finite(layer: nn.Module, state_dict, prefix: str) -> None:
    """A checkpoint entry of this layer (its scores, weight, mask, gain or BN statistics) that
    holds NaN or inf is a NonFiniteError naming the layer and the entry."""
    for name in ("scores", "weight", "mask", "alpha", "bn.running_mean", "bn.running_var",
                 "bn.weight", "bn.bias"):
        t = state_dict.get(prefix + name)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        nan, inf = (int(c) for c in torch.stack([t.isnan().sum(), t.isinf().sum()]).tolist())
        if nan or inf:
            parts = " and ".join(f"{k} ({c} of {t.numel()})"
                                 for k, c in (("NaN", nan), ("inf", inf)) if c)
            who = f"{type(layer).__name__} {prefix[:-1]}" if prefix else layer_label(layer)
            verb = "contain" if name == "scores" else "contains"
            raise NonFiniteError(f"{who}: {name} in the loaded state dict {verb} {parts}; load "
                                 "a checkpoint saved before the values diverged")


class _GainScaled:
    """A spiking layer's weight as ``ops.spiking_layer`` reads it, times a constant ``g``: W_eff
    and its kernel gain scaled, the bit planes unchanged (``_MaskedSignWeight.input_gain``)."""

    def __init__(self, layer: _MaskedSignWeight, g: float):
        self.layer, self.g = layer, g

    def effective_weight(self) -> torch.Tensor:
        return self.layer.effective_weight() * self.g

    def effective_weight_planes(self):
        w, planes = self.layer.effective_weight_planes()
        return w * self.g, None if planes is None else (*planes[:2], planes[2] * self.g)

    def packed_weight(self):
        w_mask, w_pos, alpha = self.layer.packed_weight()
        return w_mask, w_pos, alpha * self.g


def _bn_scale_shift(bn: Optional[nn.modules.batchnorm._BatchNorm], channels: int,
                    like: torch.Tensor):
    """(scale, shift, bn_train) for the fused epilogue from an optional BatchNorm module."""
    if bn is None:
        one = torch.ones(channels, dtype=torch.float32, device=like.device)
        return one, torch.zeros_like(one), False
    train = bn.training or not bn.track_running_stats
    w = bn.weight if bn.affine else torch.ones(channels, device=like.device)
    b = bn.bias if bn.affine else torch.zeros(channels, device=like.device)
    if train:
        return w, b, True
    scale = w * torch.rsqrt(bn.running_var + bn.eps)
    return scale, b - bn.running_mean * scale, False


@torch.no_grad()
def _update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    if bn is None or not (bn.training and bn.track_running_stats) or count == 0:
        return  # an empty batch (N = 0) has no statistics; NaN must not enter the running ones
    bn.num_batches_tracked += 1
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)


class BinSpikeConv2d(_MaskedSignWeight):
    __doc__ = """Masked sign-weight Conv2d (+BN) + multi-step LIF neuron, in one fused op.

    Replaces a SpikingJelly ``layer.Conv2d`` (+ ``layer.BatchNorm2d``) + ``neuron.LIFNode``
    (step mode 'm'). The effective weight is ``W_eff = alpha * sign(w) * M``: w is frozen, the
    mask M keeps the top-|s| of the trainable scores s.

    Args:
        in_channels (int): input channels C_in.
        out_channels (int): output channels C_out.
        kernel_size (int or (k, k)): square kernel.
        stride (int or (s, s)): default 1.
        padding (int or (p, p)): zero padding, default 0.
""" + _WEIGHT_ARGS + "\n" + _SPIKE_ARGS + "\n" + _NEURON_ARGS + """
        pool (int): 1 (default) or 2: conv -> BN -> neuron -> 2x2 max-pool (stride 2) in one
            layer, the same spikes as this layer followed by ``SpikeMaxPool2d(2)``.

    Shape:
        - input ``x``: ``[T, N, C_in, H, W]`` spikes (or real values with ``input='real'``).
        - ``residual`` (optional): a real current ``[T, N, C_out, H', W']`` added before the
          neuron (ResNet blocks), in the unpooled shape.
        - output: ``[T, N, C_out, H', W']`` spikes (exact 0./1.) in the input's dtype, with
          H' = (H + 2 * padding - kernel_size) // stride + 1 (halved again with ``pool=2``).

""" + _MODE_DOC + """

    The max of spikes is their OR: inference fuses the pool into the kernel, training saves
    one bit per spike for its backward.

    Example::

        >>> import torch, binslt
        >>> layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1, prune_rate=0.5, bn=True)
        >>> x = (torch.rand(3, 1, 2, 8, 8) > 0.5).float()  # [T, N, C, H, W] spikes
        >>> y = layer(x)
        >>> y.shape
        torch.Size([3, 1, 4, 8, 8])
        >>> bool(((y == 0) | (y == 1)).all())
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1, padding: _IntOrPair = 0, *, prune_rate: float = 0.5,
                 tau: Optional[float] = None, decay_input: Optional[bool] = None,
                 v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = False,
                 surrogate: str = "atan", surrogate_alpha: float = 2.0, bn: bool = False,
                 input: str = "spike", backend: str = "auto", decay: Optional[float] = None,
                 bn_affine: bool = False, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 per_channel_gain: bool = False, neuron: str = "lif", pool: int = 1):
        """Build the layer; every argument is described in ``help(binslt.BinSpikeConv2d)``."""
        k = _square(kernel_size, "kernel_size")
        if k < 1:
            raise ValueError("kernel_size must be >= 1")
        if isinstance(pool, bool) or pool not in C.POOLS:
            raise ValueError(f"pool must be 1 (none) or 2 (2x2 max-pool after the neuron), got "
                             f"{pool!r}")
        if input not in ("spike", "real"):
            raise ValueError(f"input must be 'spike' or 'real', got {input!r}")
        C.check_backend(backend)
        super().__init__((out_channels, in_channels, k, k), prune_rate, per_channel_gain)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride = _square(stride, "stride")
        if self.stride < 1:
            raise ValueError("stride must be >= 1")
        self.padding = _square(padding, "padding")
        self.pool = pool
        self.neuron = NeuronConfig(tau, decay_input, v_threshold, v_reset, detach_reset,
                                   surrogate, surrogate_alpha, decay, type(self).__name__,
                                   neuron)
        self.input = input
        self.backend = backend
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum,
                                 affine=bn_affine) if bn else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                + (f"pool={self.pool}, " if self.pool > 1 else "")
                + f"{self._weight_repr()}, input={self.input}, backend={self.backend}, "
                f"{self.neuron.extra_repr()}")

    def reset(self) -> None:
        """No-op: layers are stateless across calls (for SpikingJelly's functional.reset_net)."""

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The conv's output size (before the pool)."""
        k = self.kernel_size
        return C.out_hw(h, w, k, k, self.stride, self.padding)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Spikes ``[T, N, C_out, H', W']`` (the input's dtype) of input ``x`` ``[T, N, C_in, H,
        W]``; ``residual``, a real current ``[T, N, C_out, H', W']`` (before the pool), is added
        to the BN output before the neuron."""
        _refuse_jit_trace(self)
        who = type(self).__name__
        _check_input(x, 5, "[T, N, C, H, W]", self.in_channels, 2, self.weight, who)
        return self._forward(x, residual, x.shape[3], x.shape[4], False)

    def forward_packed(self, x: torch.Tensor, packed_out: bool = True,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference chaining between binslt layers, under ``torch.no_grad()`` with a kernel
        backend: x is float spikes [T, N, C_in, H, W] or packed words [T, N, H, W,
        ceil(C_in/32)] int32 (a previous layer's ``forward_packed``), or, for ``input='real'``,
        real values [T, N, C_in, H, W]; the output is packed words [T, N, H', W',
        ceil(C_out/32)] int32 (``packed_out``) or float 0./1. spikes, the same spikes
        ``forward`` gives. ``residual`` is a float current [T, N, C_out, H', W'] or spikes as
        packed words [T, N, H', W', ceil(C_out/32)] int32 (an identity shortcut's input), added
        as 0. / 1."""
        _refuse_jit_trace(self)
        who = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            _check_input(x, 5, "[T, N, C, H, W]", self.in_channels, 2, self.weight, who)
            return self._forward(x, residual, x.shape[3], x.shape[4], packed_out)
        if x.dim() != 5 or x.shape[4] != C.channel_words(self.in_channels):
            raise ValueError(f"{who} expects packed spikes [T, N, H, W, "
                             f"{C.channel_words(self.in_channels)}] int32 "
                             f"(in_channels={self.in_channels}), got shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"{who}: input is on {x.device} but the layer's weights are on "
                             f"{self.weight.device}; move one of them (.to(device))")
        return self._forward(x, residual, x.shape[2], x.shape[3], packed_out)

    def _forward(self, x, residual, h: int, w: int, packed_out: bool) -> torch.Tensor:
        who = type(self).__name__
        k = self.kernel_size
        ho, wo = C.check_output_size(who, h, w, k, k, self.stride, self.padding)
        if ho < self.pool or wo < self.pool:
            raise ValueError(f"{who}: pool={self.pool} needs a conv output of at least "
                             f"{self.pool}x{self.pool}, got {ho}x{wo} from a {h}x{w} input")
        if residual is not None and residual.dtype == torch.int32:  # packed spikes (no-grad)
            C.check_residual(who, residual, (x.shape[0], x.shape[1], ho, wo,
                                             C.channel_words(self.out_channels)))
        else:
            C.check_residual(who, residual, (x.shape[0], x.shape[1], self.out_channels, ho, wo))
        return self._fire(x, residual, self.out_channels, linear=False, stride=self.stride,
                          padding=self.padding, pool=self.pool,
                          stat_count=x.shape[0] * x.shape[1] * ho * wo, packed_out=packed_out)


def conv_output_numel(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Output elements of a layer's conv / linear for input ``x``: a pooled BinSpikeConv2d
    (``pool=2``) returns its spikes after the pool, but its conv computes every position before
    it."""
    if isinstance(mod, BinSpikeConv2d) and mod.pool > 1:
        ho, wo = mod.out_size(x.shape[-2], x.shape[-1])
        return out.numel() // (out.shape[-2] * out.shape[-1]) * ho * wo
    return out.numel()


class BinSpikeLinear(_MaskedSignWeight):
    __doc__ = """Masked sign-weight Linear (+BN) + multi-step LIF (or IF) neuron, in one fused op.

    Args:
        in_features (int): input features F.
        out_features (int): output features O.
""" + _WEIGHT_ARGS + "\n" + _SPIKE_ARGS + "\n" + _NEURON_ARGS + """

    Shape:
        - input ``x``: ``[T, N, F]`` spikes (or real values with ``input='real'``).
        - ``residual`` (optional): a real current ``[T, N, O]`` added before the neuron.
        - output: ``[T, N, O]`` spikes (exact 0./1.) in the input's dtype.

""" + _MODE_DOC + """

    Example::

        >>> import torch, binslt
        >>> layer = binslt.BinSpikeLinear(16, 4, prune_rate=0.25, decay=0.99, decay_input=False)
        >>> layer(torch.ones(3, 2, 16)).shape  # [T, N, F] -> [T, N, O]
        torch.Size([3, 2, 4])
    """

    def __init__(self, in_features: int, out_features: int, *, prune_rate: float = 0.5,
                 tau: Optional[float] = None, decay_input: Optional[bool] = None,
                 v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = False,
                 surrogate: str = "atan", surrogate_alpha: float = 2.0, bn: bool = False,
                 input: str = "spike", backend: str = "auto", decay: Optional[float] = None,
                 bn_affine: bool = False, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 per_channel_gain: bool = False, neuron: str = "lif"):
        """Build the layer; every argument is described in ``help(binslt.BinSpikeLinear)``."""
        if input not in ("spike", "real"):
            raise ValueError(f"input must be 'spike' or 'real', got {input!r}")
        C.check_backend(backend)
        super().__init__((out_features, in_features), prune_rate, per_channel_gain)
        self.in_features, self.out_features = in_features, out_features
        self.neuron = NeuronConfig(tau, decay_input, v_threshold, v_reset, detach_reset,
                                   surrogate, surrogate_alpha, decay, type(self).__name__,
                                   neuron)
        self.input = input
        self.backend = backend
        self.bn = nn.BatchNorm1d(out_features, eps=bn_eps, momentum=bn_momentum,
                                 affine=bn_affine) if bn else None

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, {self._weight_repr()}, "
                f"input={self.input}, backend={self.backend}, {self.neuron.extra_repr()}")

    def reset(self) -> None:
        """No-op: layers are stateless across calls."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Spikes ``[T, N, O]`` (the input's dtype) of input ``x`` ``[T, N, F]``; ``residual``,
        a real current ``[T, N, O]``, is added to the BN output before the neuron."""
        _refuse_jit_trace(self)
        who = type(self).__name__
        _check_input(x, 3, "[T, N, F]", self.in_features, 2, self.weight, who)
        C.check_residual(who, residual, (x.shape[0], x.shape[1], self.out_features))
        return self._fire(x, residual, self.out_features, linear=True)


class BinConv2d(_MaskedSignWeight):
    __doc__ = """Masked sign-weight Conv2d (+BN) without a neuron: a real current out.

    Used for ResNet 1x1 shortcuts and the BNN-BinAct baseline.

    Args:
        in_channels (int): input channels C_in.
        out_channels (int): output channels C_out.
        kernel_size (int or (k, k)): square kernel.
        stride (int or (s, s)): default 1.
        padding (int or (p, p)): zero padding, default 0.
""" + _WEIGHT_ARGS + """
        bn (bool): a BatchNorm2d after the conv (default False; statistics over T*N*H*W).
        bn_affine (bool): the BatchNorm has a learnable scale and shift (default False).

    Shape:
        - input: ``[N, C_in, H, W]`` or multi-step ``[T, N, C_in, H, W]``.
        - output: ``[N, C_out, H', W']`` or ``[T, N, C_out, H', W']``, the input's dtype.

""" + _MODE_DOC + """

    Example::

        >>> import torch, binslt
        >>> conv = binslt.BinConv2d(4, 8, 1, stride=2, bn=True)
        >>> conv(torch.ones(3, 2, 4, 6, 6)).shape
        torch.Size([3, 2, 8, 3, 3])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1, padding: _IntOrPair = 0, *, prune_rate: float = 0.5,
                 bn: bool = False, bn_affine: bool = False, per_channel_gain: bool = False):
        """Build the layer; every argument is described in ``help(binslt.BinConv2d)``."""
        k = _square(kernel_size, "kernel_size")
        super().__init__((out_channels, in_channels, k, k), prune_rate, per_channel_gain)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding = _square(stride, "stride"), _square(padding, "padding")
        self.bn = nn.BatchNorm2d(out_channels, affine=bn_affine) if bn else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._weight_repr()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv (+BN) of ``x`` ``[N, C_in, H, W]`` or ``[T, N, C_in, H, W]`` with W_eff:
        ``[N, C_out, H', W']`` or ``[T, N, C_out, H', W']``."""
        _refuse_jit_trace(self)
        if x.dim() not in (4, 5):
            raise ValueError(f"BinConv2d expects [N, C, H, W] or [T, N, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-3]
        xf = x.flatten(0, -4)
        if _affine_infer_path(self, xf):
            scale, shift, _ = _bn_scale_shift(self.bn, self.out_channels, xf)
            w_mask, w_pos, alpha = self.packed_weight()
            y = ops.bconv_affine_infer(xf, w_mask, w_pos, alpha, scale.float(), shift.float(),
                                       self.stride, self.padding)
            return y.view(*lead, *y.shape[1:])
        w = self.effective_weight().to(x.dtype)
        if _saves_spikes_packed(xf, w):
            y = self._conv_bn_saving_bits(xf, w)
        else:
            y = F.conv2d(xf, w, stride=self.stride, padding=self.padding)
            if self.bn is not None:
                y = self.bn(y)
        return y.view(*lead, *y.shape[1:])

    def _conv_bn_saving_bits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """conv (+BN) of float spikes x [B, C, H, W] with what autograd saves made small: the
        conv's saved input is kept as packed bits (1 of 32 bits a value, unpacked exactly), and
        BN's saved input, the conv's output, is recomputed from them in the backward (the same
        conv of the same values: bit for bit). A ResNet shortcut's saved state shrinks from two
        float maps to one bit per input spike."""
        bits = ops.pack_spikes(x)
        channels, w_value = x.shape[1], w.detach()
        conv = {}

        def unpacked():
            return ops.unpack_spikes(bits, channels)

        def pack(t):
            if t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.dtype == x.dtype:
                return ("x",)
            y = conv.get("y")
            if y is not None and t.data_ptr() == y.data_ptr() and t.shape == y.shape:
                return ("y",)
            return t

        def unpack(saved):
            if isinstance(saved, tuple) and saved == ("x",):
                return unpacked()
            if isinstance(saved, tuple) and saved == ("y",):
                return F.conv2d(unpacked(), w_value, stride=self.stride, padding=self.padding)
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = F.conv2d(x, w, stride=self.stride, padding=self.padding)
            conv["y"] = y
            if self.bn is not None:
                y = self.bn(y)
        conv.clear()  # the hooks keep only bits and w_value alive
        return y


def _affine_infer_path(m: BinConv2d, x: torch.Tensor) -> bool:
    """Whether BinConv2d's no-grad call on float CPU spikes x [B, C, H, W] runs as the
    ``bconv_affine_infer`` op: exact integer counts (oneDNN's int8 convolution where the CPU has
    AMX-INT8), then the gain and the eval BN as one per-channel affine. Only where that op's int8
    route runs (elsewhere ATen's float conv is as fast): on such a CPU the layer's eval output is
    (count * alpha) * scale + shift, one rounding per step instead of a float sum of +-alpha
    terms, so it can differ from the grad-mode forward in the last bits."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() == 0:
        return False
    if m.bn is not None and (m.bn.training or not m.bn.track_running_stats):
        return False
    if torch.compiler.is_compiling() or not ops.onednn_conv_available():
        return False
    return x.dtype == torch.int32 or (x.dtype == torch.float32 and ops._is_binary(x))


def _saves_spikes_packed(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether BinConv2d's input (flattened to [B, C, H, W]) is float32 CPU spikes in a
    training graph that would save it: then autograd keeps it as packed bits instead."""
    return (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            and x.dtype == torch.float32
            and x.device.type == "cpu" and x.numel() > 0
            and not torch.compiler.is_compiling() and ops._is_binary(x))


class BinLinear(_MaskedSignWeight):
    __doc__ = """Masked sign-weight Linear without a neuron (the logits layer), no bias.

    Args:
        in_features (int): input features F.
        out_features (int): output features O.
""" + _WEIGHT_ARGS + """

    Shape:
        - input: ``[..., F]`` (e.g. ``[T, N, F]``).
        - output: ``[..., O]``, the input's dtype.

""" + _MODE_DOC + """

    Example::

        >>> import torch, binslt
        >>> fc = binslt.BinLinear(16, 10, prune_rate=0.5)
        >>> fc(torch.ones(4, 2, 16)).shape
        torch.Size([4, 2, 10])
    """

    def __init__(self, in_features: int, out_features: int, *, prune_rate: float = 0.5,
                 per_channel_gain: bool = False):
        """Build the layer; every argument is described in ``help(binslt.BinLinear)``."""
        super().__init__((out_features, in_features), prune_rate, per_channel_gain)
        self.in_features, self.out_features = in_features, out_features

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._weight_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_eff.T``: ``[..., F]`` -> ``[..., O]``."""
        _refuse_jit_trace(self)
        return F.linear(x, self.effective_weight().to(x.dtype))


class LIF(MultiStepOnly, _NoTorchScript, nn.Module):
    __doc__ = """Stateless multi-step LIF neuron (SpikingJelly ``LIFNode``, step mode 'm').

    ``neuron="if"`` makes it SpikingJelly's ``IFNode`` (H = V + X).

    Args:
""" + _NEURON_ARGS + """
        backend (str): the kernel: 'auto' (default), 'torch', 'cpu', 'triton' or 'cuda'.

    Shape:
        - input: ``[T, ...]`` currents (rank >= 2, time first).
        - output: the same shape, spikes (exact 0./1.) in the input's dtype.

    Example::

        >>> import torch, binslt
        >>> lif = binslt.LIF(tau=2.0, v_threshold=1.0)
        >>> lif(torch.full((3, 1, 2), 1.5)).flatten().tolist()  # [T, N, F]
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, tau: Optional[float] = None, decay_input: Optional[bool] = None,
                 v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 detach_reset: bool = False, surrogate: str = "atan",
                 surrogate_alpha: float = 2.0, *, decay: Optional[float] = None,
                 backend: str = "auto", neuron: str = "lif"):
        """Build the layer; every argument is described in ``help(binslt.LIF)``."""
        super().__init__()
        C.check_backend(backend)
        self.neuron = NeuronConfig(tau, decay_input, v_threshold, v_reset, detach_reset,
                                   surrogate, surrogate_alpha, decay, type(self).__name__,
                                   neuron)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{self.neuron.extra_repr()}, backend={self.backend}"

    def reset(self) -> None:
        """No-op: the neuron is stateless across calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spikes of the currents ``x`` ``[T, ...]`` (time first), the same shape and dtype;
        the membrane starts at ``v_reset`` (0 for a soft reset) on every call."""
        _refuse_jit_trace(self)
        if x.dim() < 2:
            raise ValueError(f"LIF expects a multi-step input [T, ...] of rank >= 2, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"LIF expects a floating-point tensor, got {x.dtype}")
        ops.check_finite(x, "LIF input")
        if x.numel() == 0:  # nothing to integrate (and no kernel needs to see an empty tensor)
            return torch.zeros_like(x)
        T = x.shape[0]
        z = x.reshape(T, 1, 1, -1)
        one = torch.ones(1, dtype=torch.float32, device=x.device)
        s, _, _ = ops.bn_lif(z, one, torch.zeros_like(one), None, backend=self.backend,
                             **self.neuron.kwargs())
        return s.view(x.shape)


class SpikeMaxPool2d(MultiStepOnly, nn.Module):
    """Multi-step 2-D max pooling (on spikes: their OR over each window).

    Args:
        kernel_size (int or (k, k)): square window (default 2).
        stride (int or (s, s), optional): default ``kernel_size``.
        padding (int or (p, p)): default 0.

    Shape:
        - input: ``[T, N, C, H, W]``.
        - output: ``[T, N, C, H', W']``, H' = (H + 2 * padding - kernel_size) // stride + 1.

    Example::

        >>> import torch, binslt
        >>> binslt.SpikeMaxPool2d(2)(torch.ones(3, 1, 4, 8, 8)).shape
        torch.Size([3, 1, 4, 4, 4])
    """

    def __init__(self, kernel_size: _IntOrPair = 2, stride: Optional[_IntOrPair] = None,
                 padding: _IntOrPair = 0):
        """Build the layer; every argument is described in ``help(binslt.SpikeMaxPool2d)``."""
        super().__init__()
        self.kernel_size = _square(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _square(stride, "stride")
        self.padding = _square(padding, "padding")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The max over each window of ``x`` ``[T, N, C, H, W]`` (per time step)."""
        if x.dim() != 5:
            raise ValueError(f"SpikeMaxPool2d expects [T, N, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        y = F.max_pool2d(x.flatten(0, 1), self.kernel_size, self.stride, self.padding)
        return y.view(*x.shape[:2], *y.shape[1:])


class SignActivation(nn.Module):
    """BNN-BinAct activation: sign forward (+-1), Bi-Real ApproxSign backward. Any shape.

    Example::

        >>> import torch, binslt
        >>> binslt.SignActivation()(torch.tensor([-0.5, 0.0, 2.0])).tolist()
        [-1.0, 1.0, 1.0]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """+-1 of ``x`` (sign, with sign(0) = +1), the same shape."""
        return ref.sign_activation(x)
