"""Public multi-step modules. Inputs are time-major: ``[T, N, ...]``.

``BinSpikeConv2d`` / ``BinSpikeLinear`` replace a SpikingJelly ``layer.Conv2d`` (+
``layer.BatchNorm2d``) + ``neuron.LIFNode`` (step mode 'm') with a masked sign-weight layer whose
weights are never trained in search mode (docs/design.md section 1). Their neuron defaults are
SpikingJelly's, so they drop in; the search CLI uses the paper's (decay=0.99, decay_input=False).

Note on naming: ``prune_rate`` here is the fraction of weights *removed*. The biprop code calls
the kept fraction ``prune_rate``; we do not.

This module gathers the modules of the package's parts, by responsibility:

* ``base``: modes, layer names and errors, step mode 'm', TorchScript's refusal, input checks;
* ``neuron``: the neuron settings (``NeuronConfig``, making the ops' ``NeuronParams``), ``LIF``;
* ``weight``: the weight / score part, ``_MaskedSignWeight``;
* ``spiking``: the neuron / BN set-up and the layer call shared by the spiking layers;
* ``conv``: ``BinSpikeConv2d``; ``linear``: ``BinSpikeLinear``;
* ``binary``: ``BinConv2d``, ``BinLinear``, ``SignActivation`` (no neuron);
* ``pool``: ``SpikeMaxPool2d``.
"""

from __future__ import annotations

from torch import nn

from .base import (  # noqa: F401
    _MODE_DOC,
    _NEURON_ARGS,
    _SPIKE_ARGS,
    _WEIGHT_ARGS,
    INPUTS,
    MODES,
    MultiStepOnly,
    NonFiniteError,
    TorchScriptNotSupportedError,
    _check_input,
    _IntOrPair,
    _named_error,
    _NoTorchScript,
    _refuse_jit_trace,
    _square,
    layer_label,
    torchscript_error,
)
from .binary import BinConv2d, BinLinear, SignActivation, _affine_infer_path  # noqa: F401
from .conv import BinSpikeConv2d, conv_output_numel  # noqa: F401
from .linear import BinSpikeLinear  # noqa: F401
from .neuron import LIF, NEURONS, NeuronConfig, check_if_settings  # noqa: F401
from .pool import SpikeMaxPool2d  # noqa: F401
from .spiking import _bn_scale_shift, _SpikingLayer, _update_running_stats  # noqa: F401
from .weight import _check_loaded_finite, _MaskedSignWeight  # noqa: F401

#: The public layers, which ``binslt`` exports at its top.
__all__ = ["LIF", "BinConv2d", "BinLinear", "BinSpikeConv2d", "BinSpikeLinear", "SignActivation",
           "SpikeMaxPool2d"]


def name_layers(model: nn.Module) -> nn.Module:
    """Records each binslt layer's qualified name in ``model`` (``features.3``), which its errors
    then carry. ``binslt.convert`` and the run loop call it; returns ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, (_MaskedSignWeight, LIF, SpikeMaxPool2d)):
            m.__dict__["_binslt_name"] = name
    return model
