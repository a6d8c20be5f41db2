"""Code a user writes against binslt's public API, type-checked by mypy (tests/test_public_api.py
runs ``mypy --follow-imports=silent`` on it: binslt's annotations are read, its bodies are not
reported). Never run; only checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import binslt
from binslt.nn.models import BinSLTNet


def usage(path: Path) -> None:
    net: BinSLTNet = binslt.models.build("conv4", "binwslt", num_classes=10, in_channels=1,
                                         input_size=8, timesteps=2, prune_rate=0.5)
    binslt.models.set_mode(net, "frozen")
    info: dict[str, Any] = binslt.export_ticket(net, path)
    ticket: torch.nn.Module = binslt.load_ticket(str(path), device="cpu", backend="cpu")
    logits: torch.Tensor = ticket(torch.rand(2, 1, 8, 8))
    conv = binslt.BinSpikeConv2d(2, 4, 3, stride=1, padding=1, prune_rate=0.25, tau=2.0,
                                 v_reset=None, pool=2, backend="torch")
    spikes: torch.Tensor = conv(torch.zeros(2, 1, 2, 6, 6))
    lin = binslt.BinSpikeLinear(8, 4, neuron="if", input="real")
    dense = binslt.BinConv2d(2, 4, 3, padding=1, per_channel_gain=True)
    fc = binslt.BinLinear(4, 3)
    lif = binslt.LIF(v_threshold=0.5, backend="torch")
    pool = binslt.SpikeMaxPool2d(2)
    sign = binslt.SignActivation()
    status: dict[str, dict] = binslt.backends()
    with binslt.use_backend("torch"):
        out: torch.Tensor = lin(spikes.flatten(2)[..., :8])
    mods: list[torch.nn.Module] = [dense, fc, lif, pool, sign]
    version: str = binslt.__version__
    del info, logits, status, out, mods, version
