"""The neuron settings shared by the spiking modules (``NeuronConfig``, which makes the ops'
``NeuronParams``) and the stateless multi-step neuron module ``LIF``."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import contract as C
from ..ops.layer import NeuronParams
from ..ops.schemas import SURROGATES
from .base import _NEURON_ARGS, MultiStepOnly, _NoTorchScript, _refuse_jit_trace, _Surrogate

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
                 surrogate="atan", surrogate_alpha=None, decay=None, who="NeuronConfig",
                 neuron: str = "lif"):
        if neuron not in NEURONS:
            raise ValueError(f"{who}: neuron must be one of {NEURONS}, got {neuron!r}")
        surrogate, surrogate_alpha = resolve_surrogate(surrogate, surrogate_alpha, who)
        self.neuron = neuron
        if neuron == "if":
            check_if_settings(who, tau, decay, decay_input)
            tau, decay_input = math.inf, False
        else:
            tau = C.resolve_tau(2.0 if tau is None else tau, decay, who)
            decay_input = True if decay_input is None else bool(decay_input)
        #: The settings as the ops take them: one frozen value, made here once (a settings
        #: write through the attributes below makes a new one).
        self.params = NeuronParams(tau, decay_input, v_threshold, v_reset, detach_reset,
                                   surrogate, surrogate_alpha)

    def kwargs(self) -> dict:
        """The neuron settings by name (IF: tau = +inf, decay_input = False), the surrogate by
        its name."""
        return dataclasses.asdict(self.params)

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


def _setting(name: str) -> property:
    """A NeuronConfig attribute that reads (and writes, as a new ``params``) one field."""

    def get(self):
        return getattr(self.params, name)

    def put(self, value):
        self.params = dataclasses.replace(self.params, **{name: value})

    return property(get, put, doc=f"The neuron's ``{name}`` (``params.{name}``).")


for _f in dataclasses.fields(NeuronParams):
    setattr(NeuronConfig, _f.name, _setting(_f.name))


def sj_surrogate_classes() -> dict:
    """binslt's surrogate names (``binslt.ops.schemas.SURROGATES``) -> SpikingJelly's surrogate
    classes (imports SpikingJelly)."""
    from spikingjelly.activation_based import surrogate

    return {"atan": surrogate.ATan, "sigmoid": surrogate.Sigmoid, "rect": surrogate.Rect,
            "piecewise_quadratic": surrogate.PiecewiseQuadratic}


def sj_surrogate_name(sg) -> str | None:
    """binslt's name of a SpikingJelly surrogate object (its exact class), or None when binslt
    has no such surrogate."""
    return next((name for name, cls in sj_surrogate_classes().items() if type(sg) is cls), None)


def resolve_surrogate(surrogate, alpha: Optional[float], who: str) -> tuple[str, float]:
    """``(name, alpha)`` of a surrogate given by name (``binslt.ops.schemas.SURROGATES``; alpha
    None: 2.0) or as a SpikingJelly surrogate object (``surrogate.ATan(alpha=4.0)``: its class
    and alpha; an explicit ``alpha`` must agree with the object's)."""
    if isinstance(surrogate, str):
        if surrogate not in SURROGATES:
            raise ValueError(f"{who}: surrogate must be one of {tuple(SURROGATES)} or a "
                             f"SpikingJelly surrogate object, got {surrogate!r}")
        return surrogate, 2.0 if alpha is None else alpha
    if not type(surrogate).__module__.startswith("spikingjelly."):
        raise ValueError(f"{who}: surrogate must be one of {tuple(SURROGATES)} or a SpikingJelly "
                         f"surrogate object, got {surrogate!r}")
    name = sj_surrogate_name(surrogate)
    if name is None:
        raise ValueError(f"{who}: SpikingJelly's {type(surrogate).__name__} has no binslt "
                         "kernel; use surrogate.ATan, Sigmoid, Rect or PiecewiseQuadratic")
    if getattr(surrogate, "spiking", True) is False:
        raise ValueError(f"{who}: the surrogate {surrogate!r} is in non-spiking mode "
                         "(spiking=False); binslt's neurons emit spikes")
    own = float(surrogate.alpha)
    if alpha is not None and float(alpha) != own:
        raise ValueError(f"{who}: surrogate_alpha={alpha!r} disagrees with the surrogate "
                         f"object's alpha={own!r}; give one of them")
    return name, own


def check_if_settings(who: str, tau, decay, decay_input) -> None:
    """neuron='if' has no leak: an explicit tau, decay or decay_input=True is a mistake."""
    given = [f"{k}={v!r}" for k, v in (("tau", tau), ("decay", decay)) if v is not None]
    if decay_input:
        given.append("decay_input=True")
    if given:
        raise ValueError(f"{who}: neuron='if' has no leak (H = V + X) and takes no tau, decay or "
                         f"decay_input=True; drop them or use neuron='lif', got "
                         f"{', '.join(given)}")


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
                 detach_reset: bool = False, surrogate: _Surrogate = "atan",
                 surrogate_alpha: Optional[float] = None, *, decay: Optional[float] = None,
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
                             neuron=self.neuron.params)
        return s.view(x.shape)

