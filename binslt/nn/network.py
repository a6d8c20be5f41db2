"""``BinSLTNet``, the network ``binslt.nn.models.build`` returns: images [N, C, H, W] ->
logits, direct encoding over T, and the no-grad path that chains packed spikes between
consecutive binslt spike-input convs; the image-size checks the builder shares."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import layer_label
from .blocks import ResidualBlock
from .layers import (
    BinConv2d,
    BinSpikeConv2d,
    _affine_infer_path,
    _NoTorchScript,
    _refuse_jit_trace,
)

__all__ = ["BinSLTNet"]


class BinSLTNet(_NoTorchScript, nn.Module):
    """images [N, C, H, W] -> logits [N, num_classes].

    Spiking variants repeat the image over ``timesteps`` (direct encoding) and run the layers on
    [T, N, ...]; their classifier averages its output over T. ``build_config`` holds the
    arguments that rebuild the same network: ``build(**model.build_config)``.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Module, *, spiking: bool,
                 timesteps: int, in_channels: int, input_hw: tuple[int, int],
                 build_config: dict):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.spiking = spiking
        self.timesteps = timesteps
        self.in_channels = in_channels
        self.input_hw = input_hw
        self.build_config = build_config

    def extra_repr(self) -> str:
        c = self.build_config
        return (f"arch={c['arch']}, variant={c['variant']}, input={self.in_channels}x"
                f"{self.input_hw[0]}x{self.input_hw[1]}, timesteps={self.timesteps}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of images ``x`` ``[N, C, H, W]``."""
        _refuse_jit_trace(self)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        want = (self.in_channels, *self.input_hw)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images [N, {want[0]}, {want[1]}, {want[2]}] (the model was "
                             f"built for in_channels={want[0]}, input_size={want[1:]}), got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got {x.dtype}")
        if self.spiking:  # direct encoding
            x = x.unsqueeze(0).expand(self.timesteps, *x.shape)
            if not torch.is_grad_enabled():
                return self.classifier(self._chained_features(x))
        return self.classifier(self.features(x))

    def _chained_features(self, x: torch.Tensor) -> torch.Tensor:
        """``self.features(x)`` without autograd, with packed spikes between consecutive binslt
        spike-input convs: such a conv followed by another emits packed words
        ([T, N, H, W, ceil(C/32)] int32) that the next one consumes, so no float spike tensor is
        written in between. Layers with hooks run as modules (the hooks see float spikes). The
        output has ``x``'s dtype."""
        mods = list(self.features)
        units = [_packable_conv(m, x.device) or _PackedBlock.of(m, x.device) for m in mods]
        h = x
        for i, m in enumerate(mods):
            nxt = units[i + 1] if i + 1 < len(mods) else None
            consumer = nxt is not None and nxt.input == "spike"
            conv = units[i]
            if conv is not None and (h.dtype == torch.int32 or consumer):
                h = conv.forward_packed(h, packed_out=consumer)
            else:
                h = m(h)
        # A packed-input layer's spikes come out as float32 (the words carry no dtype); the
        # features' output follows the input's dtype, as the layers' forward does (exact 0/1).
        return h.to(x.dtype) if h.is_floating_point() and h.dtype != x.dtype else h


class _PackedBlock:
    """A ResidualBlock of binslt spiking convs run with packed spikes: conv1 emits packed words,
    an identity shortcut hands its input to conv2 as a packed residual (added as 0. / 1., the
    spikes it packs), a BinConv2d shortcut runs as the module (on the packed words where its
    bconv_affine_infer path runs, on the unpacked float spikes otherwise); conv2 emits
    packed words when the next layer consumes them. The same spikes as the block's forward."""

    input = "spike"

    def __init__(self, block: ResidualBlock):
        self.block = block

    @classmethod
    def of(cls, m: nn.Module, device: torch.device) -> _PackedBlock | None:
        if not isinstance(m, ResidualBlock) or m._forward_hooks or m._forward_pre_hooks:
            return None
        if _packable_conv(m.conv1, device) is None or _packable_conv(m.conv2, device) is None:
            return None
        if m.conv1.input != "spike" or m.conv2.input != "spike":
            return None
        sc = m.shortcut
        if sc is not None and (not isinstance(sc, BinConv2d) or sc._forward_hooks
                               or sc._forward_pre_hooks):
            return None
        return cls(m)

    def forward_packed(self, x: torch.Tensor, packed_out: bool) -> torch.Tensor:
        b = self.block
        h = b.conv1.forward_packed(x, packed_out=True)
        r = x if b.shortcut is None else self._shortcut(x)  # x: packed words, or float spikes
        return b.conv2.forward_packed(h, packed_out=packed_out, residual=r)

    def _shortcut(self, x: torch.Tensor):
        """conv2's residual from the BinConv2d shortcut: its bconv_affine_infer path as a
        ``Shortcut`` that conv2's op computes beside its own conv, where conv2's backend fuses it;
        that path's float current (packed words in) otherwise; the module on float spikes where
        the path does not run."""
        b = self.block
        sc, xf = b.shortcut, x.flatten(0, 1)
        if not _affine_infer_path(sc, xf):
            xs = x
            if x.dtype == torch.int32:
                xs = ops.unpack_spikes(xf, b.conv1.in_channels).view(
                    x.shape[0], x.shape[1], b.conv1.in_channels, *x.shape[2:4])
                xs = xs.to(sc.weight.dtype)  # exact 0/1, in the shortcut's dtype
            return sc(xs)
        be = ops.resolve_backend(b.conv2.backend, x.device)
        if not ops.capabilities(be).fused_shortcut or b.conv2.store_v_seq:
            return sc(x)
        w_mask, w_pos, alpha, scale, shift = sc._affine_operands(xf)
        # Every |count| is at most Ci * k * k: a finite bound makes every value of the current
        # finite, as conv2's check of a float residual would find it.
        reach = sc.in_channels * sc.kernel_size ** 2
        ops.check_finite((reach * alpha.float().abs()) * scale.abs() + shift.abs(),
                         f"{layer_label(sc)} current (its gain and eval BN)")
        return ops.Shortcut(x, w_mask, w_pos, alpha, scale, shift, sc.stride, sc.padding)


def _packable_conv(m: nn.Module, device: torch.device) -> BinSpikeConv2d | None:
    """The BinSpikeConv2d behind a features entry (itself, or the one-child Sequential of a
    pooled layer) when it can pass packed spikes: a kernel backend, no hooks. A spike-input one
    takes and gives packed words; a real-input one (the first layer) only gives them."""
    mods = [m]
    if isinstance(m, nn.Sequential) and len(m) == 1:
        mods.append(m[0])
    conv = mods[-1]
    if not isinstance(conv, BinSpikeConv2d):
        return None
    if ops.resolve_backend(conv.backend, device) == "torch":
        return None
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return None
    if any(mm._forward_hooks or mm._forward_pre_hooks for mm in mods):
        return None
    return conv


def _hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2:
        h, w = input_size
    else:
        h = w = input_size
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"input_size must be a positive int or an (H, W) pair of them, got "
                             f"{input_size!r}")
    return int(h), int(w)


def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v
