"""Triton kernels of binslt (docs/design.md): bit packing, the fused binary conv + LIF on
int8 tensor cores, the BN + LIF epilogue, and their backward passes.

The kernels are registered as the ``triton`` backend of the ``binslt::`` ops by
``binslt/_triton_ops.py`` (``binslt::<op>_triton`` through ``torch.library.triton_op``). On CUDA
tensors they run compiled; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
"""

from ._common import INTERPRET
from .bconv import bconv_counts, bconv_dgrad, bconv_wgrad
from .lif import batch_stats_from_sums, bn_lif_fwd, channel_stats, lif_bwd
from .pack import pack_spikes, pack_weight, unpack_spikes

__all__ = [
    "INTERPRET",
    "batch_stats_from_sums",
    "bconv_counts",
    "bconv_dgrad",
    "bconv_wgrad",
    "bn_lif_fwd",
    "channel_stats",
    "lif_bwd",
    "pack_spikes",
    "pack_weight",
    "unpack_spikes",
]
