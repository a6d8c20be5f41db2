"""The masked sign-weight modules without a neuron (a real current out): ``BinConv2d`` (ResNet
1x1 shortcuts, the BNN-BinAct baseline), ``BinLinear`` (the logits layer) and the BNN-BinAct
activation ``SignActivation``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import reference as ref
from .base import (
    _CONV_ARGS,
    _MODE_DOC,
    _WEIGHT_ARGS,
    _IntOrPair,
    _refuse_jit_trace,
    _square,
    conv_padding,
    no_bias,
    torch_conv_options,
)
from .spiking import _bn_scale_shift
from .weight import _MaskedSignWeight


class BinConv2d(_MaskedSignWeight):
    __doc__ = """Masked sign-weight Conv2d (+BN) without a neuron: a real current out.

    Used for ResNet 1x1 shortcuts and the BNN-BinAct baseline.

    Args:
""" + _CONV_ARGS + _WEIGHT_ARGS + """
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
                 stride: _IntOrPair = 1, padding: _IntOrPair | str = 0,
                 dilation: _IntOrPair = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", *, prune_rate: float = 0.5,
                 bn: bool = False, bn_affine: bool = False, per_channel_gain: bool = False):
        """Build the layer; every argument is described in ``help(binslt.BinConv2d)``."""
        k = _square(kernel_size, "kernel_size")
        torch_conv_options("BinConv2d", dilation, groups, bias, padding_mode)
        super().__init__((out_channels, in_channels, k, k), prune_rate, per_channel_gain)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride = _square(stride, "stride")
        self.padding = conv_padding("BinConv2d", padding, k, self.stride)
        self.bn = nn.BatchNorm2d(out_channels, affine=bn_affine) if bn else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._weight_repr()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv (+BN) of ``x`` ``[N, C_in, H, W]`` or ``[T, N, C_in, H, W]`` with W_eff:
        ``[N, C_out, H', W']`` or ``[T, N, C_out, H', W']``."""
        y, again = self._forward_and_again(x, want_again=self._handed is not None)
        if again is not None:
            self._handed.append(again)
        return y

    # Set by a caller that can use the recompute function of the next call (ResidualBlock).
    _handed: list | None = None

    def _forward_and_again(self, x: torch.Tensor, want_again: bool):
        """``(forward(x), again)``: with ``want_again``, ``again()`` recomputes the output bit for
        bit from what the graph keeps (the input's packed bits, W_eff, BN's batch statistics
        taken again from the same conv output) where the input is spikes in a training graph
        and the BN, if any, is a plain ``BatchNorm2d``; ``again`` is None otherwise. A ResNet
        block saves its shortcut's float output as ``again`` (``ResidualBlock``)."""
        _refuse_jit_trace(self)
        if x.dim() not in (4, 5):
            raise ValueError(f"BinConv2d expects [N, C, H, W] or [T, N, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-3]
        xf = x.flatten(0, -4)
        if _affine_infer_path(self, xf):
            y = ops.bconv_affine_infer(xf, *self._affine_operands(xf), self.stride,
                                       self.padding)
            return y.view(*lead, *y.shape[1:]), None
        w = self._frozen_weight().to(x.dtype)
        again = None
        bits = ops.spike_bits(xf, ops.pack_spikes) if _may_save_spikes_packed(xf, w) else None
        if bits is not None:
            y, again_flat = self._conv_bn_saving_bits(xf, w, bits, want_again)
            if again_flat is not None:
                shape = (*lead, *y.shape[1:])

                def again():
                    return again_flat().view(shape)
        else:
            y = _conv(xf, w, self.stride, self.padding)
            if self.bn is not None:
                y = self.bn(y)
        return y.view(*lead, *y.shape[1:]), again

    def _affine_operands(self, like: torch.Tensor):
        """``(w_mask, w_pos, alpha, scale, shift)`` of the ``bconv_affine_infer`` path: the bit
        planes and gain, and the eval BN folded into a float32 per-channel affine."""
        scale, shift, _ = _bn_scale_shift(self.bn, self.out_channels, like)
        return (*self.packed_weight(), scale.float(), shift.float())

    def _conv_bn_saving_bits(self, x: torch.Tensor, w: torch.Tensor, bits: torch.Tensor,
                             want_again: bool):
        """conv (+BN) of float spikes x [B, C, H, W] (``bits``: their ``pack_spikes`` words) with
        what autograd saves made small: the conv's saved input is kept as packed bits (1 of 32
        bits a value, unpacked exactly), and
        BN's saved input, the conv's output, is recomputed from them in the backward (the same
        conv of the same values: bit for bit). A ResNet shortcut's saved state shrinks from two
        float maps to one bit per input spike. Returns ``(y, again)``: with ``want_again``,
        ``again()`` recomputes y itself the same way (None without it, and where the BN is not a
        plain ``BatchNorm2d`` that recomputes alone: a SyncBatchNorm's statistics span
        processes)."""
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
                return _conv(unpacked(), w_value, self.stride, self.padding)
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = _conv(x, w, self.stride, self.padding)
            conv["y"] = y
            if self.bn is not None:
                y = self.bn(y)
        conv.clear()  # the hooks keep only bits and w_value alive
        if not want_again:
            return y, None
        return y, _recompute(self.bn, unpacked, w_value, self.stride, self.padding)


def _recompute(bn, unpacked, w_value: torch.Tensor, stride: int, padding: int):
    """``again()`` for ``BinConv2d._conv_bn_saving_bits``: the conv of the unpacked spikes, then
    the BN as its forward ran it (the batch's statistics, taken again from the same values, in
    training; the running statistics of that moment otherwise). None for any BN but a plain
    ``BatchNorm2d``."""
    if bn is not None and type(bn) is not nn.BatchNorm2d:
        return None
    batch = bn is not None and (bn.training or bn.running_mean is None)
    stats = (None, None) if bn is None or batch else (bn.running_mean.clone(),
                                                       bn.running_var.clone())
    affine = (None, None) if bn is None or bn.weight is None else (bn.weight.detach(),
                                                                   bn.bias.detach())
    eps = None if bn is None else bn.eps

    def again():
        y = _conv(unpacked(), w_value, stride, padding)
        if bn is None:
            return y
        return F.batch_norm(y, *stats, *affine, batch, 0.0, eps)

    return again


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


def _may_save_spikes_packed(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether BinConv2d's input (flattened to [B, C, H, W]) is a float32 CPU tensor in a
    training graph that would save it: where it is spikes (``ops.spike_bits`` packs it or says
    it is not), autograd keeps it as packed bits instead."""
    return (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            and x.dtype == torch.float32
            and x.device.type == "cpu" and x.numel() > 0
            and not torch.compiler.is_compiling())


def _conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding)``; a 1x1 kernel without padding on the
    CPU (a ResNet shortcut) as ``_PointwiseConv``'s matrix products."""
    if (w.shape[-2:] == (1, 1) and padding == 0 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and w.dtype == x.dtype
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
            and not ops.is_vmapped(x) and not ops.is_vmapped(w)):
        return _PointwiseConv.apply(x, w, stride)
    return F.conv2d(x, w, stride=stride, padding=padding)


def _subsample(x: torch.Tensor, stride: int) -> torch.Tensor:
    """x [B, C, H, W] at the pixels a 1x1 kernel of this stride reads, as [B, C, Ho*Wo]."""
    xs = x if stride == 1 else x[:, :, ::stride, ::stride]
    return xs.reshape(*xs.shape[:2], -1)


class _PointwiseConv(torch.autograd.Function):
    """A 1x1 convolution without padding, ``F.conv2d(x, w, stride=stride)`` for x [B, Ci, H, W]
    and w [Co, Ci, 1, 1], as matrix products over each image's pixels: y_b = W x_b, dx_b =
    W^T dy_b (scattered back to the strided pixels), dW = sum_b dy_b x_b^T. On the CPU these run
    at BLAS speed on NCHW as it is, where the convolution primitive reorders both maps (a ResNet
    shortcut, 64->128 32x32 at N*T=128 on a 2-core Xeon: the conv's forward 56 ms against 26 ms
    here). The forward saves x itself (BinConv2d's saved-tensor hooks keep it as bits)."""

    @staticmethod
    def forward(x, w, stride):
        xs = _subsample(x, stride)
        ho, wo = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
        return torch.matmul(w.flatten(1), xs).view(x.shape[0], w.shape[0], ho, wo)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, stride = inputs
        ctx.save_for_backward(x, w)
        ctx.stride = stride

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s = ctx.stride
        gy = g.reshape(g.shape[0], g.shape[1], -1)
        w2 = w.flatten(1)
        gx = gw = None
        if ctx.needs_input_grad[0]:  # (bmm: matmul would fold the images into one product
            # over a transposed copy of dy, and transpose the result back)
            gxs = torch.bmm(w2.t().expand(gy.shape[0], -1, -1), gy)
            if s == 1:
                gx = gxs.view(x.shape)
            else:
                gx = x.new_zeros(x.shape)
                gx[:, :, ::s, ::s] = gxs.view(*x.shape[:2], *g.shape[2:])
        if ctx.needs_input_grad[1]:
            xs = _subsample(x, s)
            acc = w2.new_zeros(w2.shape)
            for b in range(x.shape[0]):  # sum_b dy_b x_b^T, accumulated in place
                acc.addmm_(gy[b], xs[b].t())
            gw = acc.view(w.shape)
        return gx, gw, None


class BinLinear(_MaskedSignWeight):
    __doc__ = """Masked sign-weight Linear without a neuron (the logits layer), no bias.

    Args:
        in_features (int): input features F.
        out_features (int): output features O.
        bias (bool): False only (torch.nn.Linear's option at the one value the layer computes:
            binslt's sign-weight layers have no bias).
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

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 prune_rate: float = 0.5, per_channel_gain: bool = False):
        """Build the layer; every argument is described in ``help(binslt.BinLinear)``."""
        no_bias("BinLinear", bias)
        super().__init__((out_features, in_features), prune_rate, per_channel_gain)
        self.in_features, self.out_features = in_features, out_features

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._weight_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_eff.T``: ``[..., F]`` -> ``[..., O]``."""
        _refuse_jit_trace(self)
        return F.linear(x, self._frozen_weight().to(x.dtype))



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
