"""NIR export of models converted by binslt.convert (SpikingJelly models with binslt layers):
the graph comes from a recorded run of the user's forward; binslt's reader (and SpikingJelly's
importer) give the converted model's eval outputs back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import sj_modules
from torch import nn

nir = pytest.importorskip("nir", reason="the binslt[nir] extra is not installed")

from test_nir import binslt_spikes  # noqa: E402

import binslt  # noqa: E402
from binslt.interop import nir as bnir  # noqa: E402

functional, layer, neuron = sj_modules("functional", "layer", "neuron")


def lif():
    return neuron.LIFNode(tau=2.0)


def calibrated(net: nn.Module, x: torch.Tensor, bias: float = 0.5) -> nn.Module:
    """Frozen, with every converted BN's running statistics those of one batch and its shift
    ``bias``, so that every layer fires; eval mode after."""
    binslt.models.set_mode(net, "frozen")
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and type(m).__name__ != "BiasShift"]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    net.train()
    functional.reset_net(net)
    with torch.no_grad():
        net(x)
        for m in bns:
            if m.affine:
                m.bias.fill_(bias)
    functional.reset_net(net)
    return net.eval()


def converted(sj: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    functional.set_step_mode(sj, "m")
    net, _ = binslt.convert(sj, 0.5, example_input=x, **kw)
    return calibrated(net, torch.rand(4, 8, *x.shape[2:]))


def spikes_of(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(outputs, {NIR neuron name: spikes}) of a converted model's eval run, from reset
    states (reset again after)."""
    functional.reset_net(net)
    try:
        return binslt_spikes(net, x)
    finally:
        functional.reset_net(net)


def check_round_trip(net: nn.Module, example: torch.Tensor, x: torch.Tensor, path: Path,
                     maxpool: str = "threshold"):
    """to_nir -> file -> from_nir gives the converted model's eval outputs and every neuron's
    spikes, bit for bit; every neuron fires."""
    bnir.write_nir(bnir.to_nir(net, example, maxpool=maxpool), path)
    back = bnir.from_nir(path)
    want, spikes = spikes_of(net, x)
    with torch.no_grad():
        got = back(x, record=True)
    assert spikes and set(spikes) <= set(back.spikes), sorted(set(spikes) - set(back.spikes))
    for name, s in spikes.items():
        assert torch.equal(back.spikes[name], s), f"spikes of {name} differ"
        assert float(s.mean()) > 0.005, f"{name} hardly fires ({float(s.mean()):.4f})"
    assert got.shape == want.shape and torch.equal(got, want)
    assert bool((want != 0).any())
    return back


def lif_net():
    torch.manual_seed(0)
    return nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1), layer.BatchNorm2d(8), lif(),
        layer.MaxPool2d(2), layer.Conv2d(8, 16, 3, padding=1, bias=False),
        layer.BatchNorm2d(16), lif(), layer.MaxPool2d(2), layer.Flatten(),
        layer.Linear(16 * 2 * 2, 10))


@pytest.mark.parametrize("maxpool", ["threshold", "lif"])
def test_sequential_lif_maxpool_round_trip_and_ticket(tmp_path, maxpool):
    x = torch.rand(2, 3, 1, 8, 8)
    net = converted(lif_net(), x)
    back = check_round_trip(net, x, torch.rand(3, 5, 1, 8, 8), tmp_path / "c.nir", maxpool)
    assert back.readout == "sequence" and back.timesteps == 2
    kinds = sorted(type(u).__name__ for u in back.units.values())
    assert kinds.count("_Spiking") == 2 and kinds.count("_SpikeOr") == 2
    g = nir.read(tmp_path / "c.nir")
    assert g.metadata["arch"] == "converted" and g.metadata["readout"] == "sequence"
    # the classifier's bias (a Bias module after the BinLinear) is the Affine node's bias
    bias = net[9][1].bias.detach().numpy()
    assert (g.nodes["9.0"].bias == bias).all() and bool((bias != 0).any())
    # a ticket loaded into the user's model exports the same graph
    path = tmp_path / "t.safetensors"
    binslt.export_ticket(net, path)
    functional.set_step_mode(model := lif_net(), "m")
    ticket = binslt.load_ticket(path, model=model)
    check_round_trip(ticket, x, torch.rand(2, 4, 1, 8, 8), tmp_path / "t.nir", maxpool)


def if_net():
    torch.manual_seed(1)
    return nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.IFNode(),
        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, 32), layer.BatchNorm1d(32),
        neuron.IFNode(), layer.Linear(32, 10, bias=False))


def test_sequential_if_round_trip_and_spikingjelly_import(tmp_path):
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    x = torch.rand(2, 3, 1, 8, 8)
    net = converted(if_net(), x)
    check_round_trip(net, x, torch.rand(3, 4, 1, 8, 8), tmp_path / "if.nir")
    g = bnir.to_nir(net, x)
    assert isinstance(g.nodes["0.lif"], nir.IF) and isinstance(g.nodes["5.lif"], nir.IF)
    assert isinstance(g.nodes["3.avgpool"], nir.AvgPool2d)
    # SpikingJelly's importer runs the graph too: its dense float layers and float order give
    # the outputs to float rounding, in float64 on both sides
    sj = import_from_nir(g, step_mode="m").double()
    xx = torch.rand(3, 4, 1, 8, 8, dtype=torch.float64)
    functional.reset_net(sj)
    with torch.no_grad():
        theirs, _state = sj(xx)
        ours = binslt.models.set_backend(net, "torch").double()(xx)
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-10)
    assert bool((ours != 0).any())


class _MeanOverT(nn.Module):
    """Conv and linear biases without BN (folded as shifts), IF neurons, logits averaged over T
    by the user's forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            layer.Conv2d(1, 8, 3, padding=1), neuron.IFNode(), layer.Flatten(),
            layer.Linear(8 * 8 * 8, 20), neuron.IFNode(), layer.Linear(20, 10))
        with torch.no_grad():  # every layer fires without a BN to calibrate
            self.net[0].bias.fill_(0.3)
            self.net[3].bias.uniform_(0.0, 0.5)
            self.net[3].weight.mul_(3.0)

    def forward(self, x):
        return self.net(x).mean(0)


def test_biases_without_bn_and_a_mean_over_time_readout(tmp_path):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 1, 8, 8)
    sj = _MeanOverT()
    functional.set_step_mode(sj, "m")
    net, _ = binslt.convert(sj, 0.5, example_input=x)
    net = binslt.models.set_mode(net, "frozen").eval()
    assert type(net.net[0].bn).__name__ == "BiasShift"
    back = check_round_trip(net, x, torch.rand(2, 4, 1, 8, 8), tmp_path / "m.nir")
    assert back.readout == "mean_over_time" and back.timesteps == 2
    images = torch.rand(5, 1, 8, 8)  # images are repeated over the recorded T
    functional.reset_net(net)
    with torch.no_grad():
        assert torch.equal(back(images), net(images.unsqueeze(0).repeat(2, 1, 1, 1, 1)))


def test_dropout_in_eval_passes(tmp_path):
    torch.manual_seed(2)
    sj = nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1), layer.BatchNorm2d(8), lif(), layer.Dropout(0.5),
        layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8), lif(), layer.Flatten(),
        layer.Dropout(0.3), layer.Linear(8 * 8 * 8, 10))
    x = torch.rand(2, 3, 1, 8, 8)
    net = converted(sj, x)
    assert type(net[3]).__name__ == "SpikeDropout"
    check_round_trip(net, x, torch.rand(2, 4, 1, 8, 8), tmp_path / "d.nir")
    g = bnir.to_nir(net, x)
    assert not any("Dropout" in type(v).__name__ for v in g.nodes.values())
    assert sorted(a for a, b in g.edges if b == "4") == ["0.lif"]


def test_spiking_resnet18_round_trip_with_residual_edges(tmp_path):
    from test_zoo import build

    x = torch.rand(2, 2, 3, 16, 16)
    functional.set_step_mode(r := build("spiking_resnet18", "if"), "m")
    net, _ = binslt.convert(r, 0.5, example_input=x)
    net = calibrated(net, torch.rand(2, 8, 3, 16, 16))
    check_round_trip(net, x, torch.rand(2, 3, 3, 16, 16), tmp_path / "r18.nir")
    g = nir.read(tmp_path / "r18.nir")
    into = lambda n: sorted(a for a, b in g.edges if b == n)  # noqa: E731
    # the residual add is an edge into the block's second neuron: identity (the spikes of the
    # block input) or the 1x1 shortcut with its BN folded
    assert into("layer1.0.sn2.layer.lif") == ["layer1.0.sn2.layer", "maxpool"]
    assert into("layer2.0.sn2.layer.lif") == ["layer2.0.downsample.0", "layer2.0.sn2.layer"]
    assert into("layer2.1.sn2.layer.lif") == ["layer2.0.sn2.layer.lif", "layer2.1.sn2.layer"]
    assert '"running_mean"' in g.nodes["layer2.0.downsample.0"].metadata["binslt"]


class _Sew(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.sn = layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4), lif()
        self.conv2, self.bn2, self.sn2 = (layer.Conv2d(4, 4, 3, padding=1), layer.BatchNorm2d(4),
                                          lif())
        self.fc = layer.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        s = self.sn(self.bn(self.conv(x)))
        out = self.sn2(self.bn2(self.conv2(s))) + s  # SEW ADD of two spike trains
        return self.fc(out.flatten(2))


def test_what_nir_cannot_hold_is_named():
    x = torch.rand(2, 3, 1, 8, 8)
    functional.set_step_mode(sew := _Sew(), "m")
    net, _ = binslt.convert(sew, 0.5, example_input=x)
    with pytest.raises(bnir.NIRError, match=r"operation '(add|__add__)'.*SEW add"):
        bnir.to_nir(net.eval(), x)
    plif = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), neuron.ParametricLIFNode(),
                         layer.Flatten(), layer.Linear(4 * 8 * 8, 10))
    functional.set_step_mode(plif, "m")
    net, _ = binslt.convert(plif, 0.5, example_input=x)
    with pytest.raises(bnir.NIRError, match=r"module '1' \(ParametricLIFNode\) has no NIR"):
        bnir.to_nir(net.eval(), x)
    real_max = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), layer.MaxPool2d(2),
                             layer.Flatten(), layer.Linear(4 * 4 * 4, 10))
    functional.set_step_mode(real_max, "m")
    net, _ = binslt.convert(real_max, 0.5, example_input=x)
    with pytest.raises(bnir.NIRError, match=r"module '1' \(MaxPool2d\): a max pool of real"):
        bnir.to_nir(net.eval(), x)
    with pytest.raises(bnir.NIRError, match=r"needs example_input: one tensor \[T, N"):
        bnir.to_nir(net.eval())
