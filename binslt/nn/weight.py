"""The weight / score part of every masked sign-weight module (``_MaskedSignWeight``): the frozen
real weight w, the scores s, the mask and the modes (search, finetune, frozen), W_eff =
alpha * sign(w) * M (docs/design.md section 1), its bit planes (cached for the no-grad paths)
and the checkpoint checks."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..ops import contract as C
from ..ops import reference as ref
from .base import MODES, MultiStepOnly, NonFiniteError, _call_named, _NoTorchScript, layer_label


def _tensor_states(*tensors) -> tuple:
    """(version counter, storage address) of each tensor (None for None): the caches of derived
    weights key on it, so that any in-place update (an optimiser step, ``load_state_dict``) or a
    new storage (``.to``, ``.data =``) invalidates them. Writes through ``.data`` bypass version
    counters, as they bypass autograd's checks."""
    return tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)


class _MaskedSignWeight(MultiStepOnly, _NoTorchScript, nn.Module):
    """Frozen real weight ``w``, trainable scores ``s`` and the effective weight
    ``W_eff = alpha * sign(w) * M`` (docs/design.md section 1).

    NaN or inf in the scores, the weight or a spiking layer's BN batch statistics is a
    ``NonFiniteError`` naming the layer, found by the kernels in the passes that read them (no
    extra host read per call); a checkpoint holding them fails at ``load_state_dict``.
    """

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
        # also the way to drop them after a .data write
        self.__dict__.pop("_packed_cache", None)
        self.__dict__.pop("_weight_cache", None)
        return super().train(mode)

    def current_mask(self) -> torch.Tensor:
        """The {0,1} mask M in use: top-|s| in search mode, the fixed one otherwise."""
        if self._mode == "search":
            return _call_named(self, ops.topk_mask, self.scores, self.prune_rate)
        if self._mode == "finetune":
            return self.mask
        w = self.effective_weight()
        return (w != 0).to(w.dtype)

    def effective_weight(self) -> torch.Tensor:
        """alpha * sign(w) * M, differentiable as the mode prescribes."""
        if self._mode == "search":
            return _call_named(self, ops.masked_sign_weight, self.weight, self.scores,
                               self.prune_rate, self.per_channel_gain)
        if self._mode == "finetune":
            return ref.masked_sign_weight_finetune(self.weight, self.mask, self.per_channel_gain)
        cin = self.weight.shape[1]
        w = ref.unpack_weight_reference(self.w_mask_bits, self.w_pos_bits, cin, self.alpha)
        return w.view(self.weight.shape).to(self.weight.dtype)

    #: The largest W_eff (entries) that a frozen layer keeps unpacked between no-grad calls
    #: (``_frozen_weight``): a real-input first conv or a classifier is far below it; a layer
    #: whose float weight would outweigh its bit planes by megabytes is unpacked per call.
    _FROZEN_WEIGHT_KEEP = 1 << 16

    def _frozen_weight(self) -> torch.Tensor:
        """``effective_weight()`` for the layer's own calls: a frozen layer's no-grad calls
        keep the unpacked W_eff (up to ``_FROZEN_WEIGHT_KEEP`` entries) until its bit planes,
        gain or weight dtype change (the same objects, version counters and storage;
        ``train()``/``eval()`` drop it), so that an eval loop's dense paths (a real-input first
        conv, a classifier) do not unpack the planes on every call. Other modes, grad mode and
        larger weights: ``effective_weight()``."""
        if self._mode != "frozen" or torch.is_grad_enabled() or \
                torch.compiler.is_compiling() or self.weight.numel() > self._FROZEN_WEIGHT_KEEP:
            return self.effective_weight()
        src = (self.w_mask_bits, self.w_pos_bits, self.alpha)
        if any(type(t) is not torch.Tensor or t.is_meta for t in src):
            return self.effective_weight()
        key = (self.weight.dtype, torch.is_inference_mode_enabled(), tuple(map(id, src)),
               _tensor_states(*src))
        hit = self.__dict__.get("_weight_cache")
        if hit is not None and hit[0] == key:
            return hit[2]
        w = self.effective_weight()
        self.__dict__["_weight_cache"] = (key, src, w)
        return w

    def effective_weight_planes(self):
        """``(effective_weight(), planes)``: in search mode on the CPU, planes = (mask bits,
        positive bits, gain) of that W_eff (``pack_weight`` and ``ops.max_abs_gain`` of it),
        written in the same pass; None otherwise (the caller packs W_eff)."""
        if self._mode == "search":
            return _call_named(self, ops.masked_sign_weight, self.weight, self.scores,
                               self.prune_rate, self.per_channel_gain, planes=True)
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
        key = (self._mode, self.prune_rate, self.per_channel_gain,
               _tensor_states(self.weight, self.scores, self.mask))
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
