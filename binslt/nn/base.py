"""What every binslt module shares: the modes, the layer names its errors carry
(``layer_label``, ``NonFiniteError``), step mode 'm' only (``MultiStepOnly``), the refusal of
TorchScript, the input checks and the argument documentation the layer docstrings are made of.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ..ops.layer import INPUTS

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


def _call_named(layer: nn.Module, op, *args, **kwargs):
    """``op(*args, **kwargs)`` for ``layer``: a kernel's non-finite error comes back as a
    ``NonFiniteError`` naming the layer (``_named_error``); any other error as it is."""
    try:
        return op(*args, **kwargs)
    except ValueError as err:
        named = _named_error(layer, err)
        if named is None:
            raise
        raise named from err


def layer_label(layer: nn.Module) -> str:
    """``"BinSpikeConv2d features.3"``: the class and the name ``name_layers`` gave the layer in
    its model (the class alone for a layer no model named)."""
    name = layer.__dict__.get("_binslt_name")
    return f"{type(layer).__name__} {name}" if name else type(layer).__name__



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
        surrogate (str or SpikingJelly surrogate): the spike's surrogate gradient, 'atan'
            (default), 'sigmoid', 'rect' or 'piecewise_quadratic' (SpikingJelly's ATan,
            Sigmoid, Rect, PiecewiseQuadratic), or one of those SpikingJelly objects
            (``surrogate.ATan(alpha=4.0)``: its kind and alpha).
        surrogate_alpha (float, optional): the surrogate's sharpness (None: the object's alpha,
            2.0 for a name; SpikingJelly's defaults are
            ``binslt.ops.schemas.DEFAULT_SURROGATE_ALPHA``).
        neuron (str): 'lif' (default) or 'if' (SpikingJelly's IFNode, H = V + X: takes no tau,
            decay or decay_input=True)."""

_CONV_ARGS = """\
        in_channels (int): input channels C_in.
        out_channels (int): output channels C_out.
        kernel_size (int or (k, k)): square kernel.
        stride (int or (s, s)): default 1.
        padding (int, (p, p), 'same' or 'valid'): zero padding, default 0 ('same': k // 2
            for an odd kernel at stride 1).
        dilation (int): 1 only (torch.nn.Conv2d's option, accepted at the one value the layer
            computes; any other is a ValueError, and so for the next three).
        groups (int): 1 only.
        bias (bool): False only (binslt's sign-weight layers have no bias).
        padding_mode (str): 'zeros' only.
"""

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
        input (str): 'spike' (default: 0/1 spikes, bit-packed on the kernel paths), 'real'
            (real values, e.g. the first layer's images) or 'spike-sum' (integer sums of
            spikes, 0..k, e.g. SEW ResNet's ADD: the real-input route, or the exact bit-plane
            path where the backend takes it).
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
#: A surrogate by name ('atan', ...) or a SpikingJelly surrogate object (surrogate.ATan()).
_Surrogate = Union[str, Any]


def _square(v: _IntOrPair, name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} must be an int or a square pair, got {v!r}")
        v = v[0]
    if not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


def no_bias(who: str, bias) -> None:
    """torch's ``bias`` option at the one value binslt's sign-weight layers take (False)."""
    if bias is not False:
        raise ValueError(f"{who} has no bias (bias=False only), got bias={bias!r}: binslt's "
                         "sign-weight layers are bias-free, and the BatchNorm that follows a "
                         "spiking layer (bn=True) absorbs a bias in its mean subtraction")


def torch_conv_options(who: str, dilation, groups, bias, padding_mode) -> None:
    """torch.nn.Conv2d's options at the one value binslt's convs compute; any other is a
    ValueError that says so (not a TypeError for an unknown keyword)."""
    if _square(dilation, "dilation") != 1:
        raise ValueError(f"{who} supports dilation=1 only, got {dilation!r}")
    if isinstance(groups, bool) or groups != 1:
        raise ValueError(f"{who} supports groups=1 only, got {groups!r}")
    no_bias(who, bias)
    if padding_mode != "zeros":
        raise ValueError(f"{who} supports padding_mode='zeros' only, got {padding_mode!r}")


def conv_padding(who: str, padding, k: int, stride: int) -> int:
    """The zero padding as an int: an int or a square pair, or torch's 'valid' (0) and 'same'
    (k // 2 for an odd kernel at stride 1, where torch.nn.Conv2d allows it)."""
    if padding == "valid":
        return 0
    if padding == "same":
        if stride != 1:
            raise ValueError(f"{who}: padding='same' needs stride=1 (as in torch.nn.Conv2d), "
                             f"got stride={stride}")
        if k % 2 == 0:
            raise ValueError(f"{who}: padding='same' with an even kernel_size={k} pads one "
                             "side more than the other, which binslt's convs do not do; give an "
                             "odd kernel or an int padding")
        return k // 2
    if isinstance(padding, str):
        raise ValueError(f"{who}: padding must be an int, a square pair, 'same' or 'valid', "
                         f"got {padding!r}")
    return _square(padding, "padding")


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


def check_input_kind(input: str) -> str:
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
    return input


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
    if x.shape[0] == 0:
        raise ValueError(f"{who} expects at least one time step T at dim 0 of {layout}, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got {x.dtype}")
    if x.device != ref_param.device:
        raise ValueError(f"{who}: input is on {x.device} but the layer's weights are on "
                         f"{ref_param.device}; move one of them (.to(device))")

