"""Tickets of models converted by ``binslt.convert``: ``export_ticket`` writes them like any
binslt network (packed planes, BN statistics, neuron settings, the conversion's settings; no
code), ``load_ticket(path, model=factory())`` converts the user's model again and loads the file:
equal eval logits, after a search step too. The zoo's VGG-BN, spiking ResNet and SEW ResNet
(ADD) with LIF and IF take the same round trip in tests/test_zoo.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import sj_modules
from torch import nn

import binslt
from binslt.interop.convert import convert
from binslt.io.tickets import TicketError, read_ticket_metadata

functional, layer, neuron = sj_modules("functional", "layer", "neuron")


class Net(nn.Module):
    """A user's model: conv-BN-neuron stem, a residual block in the user's forward, a dropout
    after spikes, max pool, flatten, a linear stack."""

    def __init__(self, spiking_neuron):
        super().__init__()
        self.conv1 = layer.Conv2d(2, 8, 3, padding=1)
        self.bn1 = layer.BatchNorm2d(8)
        self.sn1 = spiking_neuron()
        self.conv2 = layer.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = layer.BatchNorm2d(8)
        self.sn2 = spiking_neuron()
        self.pool = layer.MaxPool2d(2)
        self.drop = layer.Dropout(0.3)
        self.fc1 = layer.Linear(8 * 4 * 4, 16)
        self.bn3 = layer.BatchNorm1d(16)
        self.sn3 = spiking_neuron()
        self.fc2 = layer.Linear(16, 4)

    def forward(self, x):
        s = self.sn1(self.bn1(self.conv1(x)))
        s = self.sn2(self.bn2(self.conv2(s)) + s)
        s = self.drop(torch.flatten(self.pool(s), 2))
        return self.fc2(self.sn3(self.bn3(self.fc1(s))))


NEURONS = {"lif": "LIFNode", "if": "IFNode"}


def factory(nkind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = Net(getattr(neuron, NEURONS[nkind]))
    functional.set_step_mode(net, "m")
    return net


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(net)
    with torch.no_grad():
        y = net.eval()(x)
    functional.reset_net(net)
    return y.mean(0)


def search_step(net: nn.Module, x: torch.Tensor) -> None:
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    functional.reset_net(net)
    loss = nn.functional.cross_entropy(net(x).mean(0), torch.arange(x.shape[1]) % 4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    functional.reset_net(net)


X = torch.rand(2, 6, 2, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("nkind", sorted(NEURONS))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_converted_ticket_round_trip(tmp_path, nkind, backend):
    conv, report = convert(factory(nkind), prune_rate=0.5, example_input=X[:, :1],
                           backend=backend)
    assert any("SpikeDropout" in n for n in report.notes)
    search_step(conv, X)
    path = tmp_path / "t.safetensors"
    info = binslt.export_ticket(conv, path)
    assert info["packed_layers"] and info["ratio"] > 1
    meta = read_ticket_metadata(path)
    cfg = meta["config"]
    assert cfg["arch"] == "converted" and cfg["model"].endswith("test_convert_tickets.Net")
    assert cfg["example_input"] == {"tuple": False, "tensors": [
        {"shape": [2, 1, 2, 8, 8], "dtype": "float32"}]}
    assert cfg["prune_rate"] == 0.5 and cfg["backend"] == backend
    assert sum("neuron" in r for r in meta["layers"].values()) == 3  # conv1, conv2, fc1
    raw = path.read_bytes()
    assert b"PK\x03\x04" not in raw[:8] and b"__reduce__" not in raw  # safetensors, no pickle
    # a different seed: every tensor comes from the file
    loaded = binslt.load_ticket(path, model=factory(nkind, seed=9))
    assert all(m.mode == "frozen" for m in loaded.modules()
               if isinstance(m, binslt.nn.layers._MaskedSignWeight))
    xe = torch.rand(2, 5, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    a, b = logits(conv, xe), logits(loaded, xe)
    assert a.abs().max() > 0
    assert torch.equal(a, b)
    # an already converted model of the same structure is taken as it is
    again, _ = convert(factory(nkind, seed=5), prune_rate=0.5, example_input=X[:, :1],
                       backend=backend)
    assert torch.equal(logits(binslt.load_ticket(path, model=again), xe), a)


def test_converted_ticket_load_errors(tmp_path):
    conv, _ = convert(factory("lif"), prune_rate=0.5, example_input=X[:, :1])
    path = tmp_path / "t.safetensors"
    binslt.export_ticket(conv, path)
    with pytest.raises(TicketError, match=r"converted SpikingJelly model .*model=factory\(\)"):
        binslt.load_ticket(path)
    with pytest.raises(TicketError, match="model= is a torch.nn.modules.container.Sequential"):
        binslt.load_ticket(path, model=nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TicketError, match="must be an nn.Module"):
        binslt.load_ticket(path, model="Net")
    # the same class with other shapes: the file does not match the converted structure
    other = factory("lif")
    other.fc2 = layer.Linear(16, 5)
    with pytest.raises(TicketError, match="fc2"):
        binslt.load_ticket(path, model=other)


def test_conversion_settings_are_recorded_and_reapplied(tmp_path):
    net = factory("if")
    conv, report = convert(net, prune_rate=0.25, example_input=(X[:, :1],), keep_dense=["fc2"],
                           per_channel_gain=True, train_bn=True)
    path = tmp_path / "t.safetensors"
    binslt.export_ticket(conv, path)
    cfg = json.loads(json.dumps(read_ticket_metadata(path)["config"]))
    assert cfg["keep_dense"] == ["fc2"] and cfg["per_channel_gain"] is True
    assert cfg["train_bn"] is True and cfg["prune_rate"] == 0.25
    assert cfg["example_input"]["tuple"] is True
    loaded = binslt.load_ticket(path, model=factory("if", seed=1))
    assert isinstance(loaded.fc2, nn.Linear)  # kept dense again, its weights from the file
    torch.testing.assert_close(loaded.fc2.weight, conv.fc2.weight, rtol=0, atol=0)
    assert torch.equal(logits(loaded, X), logits(conv, X))


def test_to_spikingjelly_drops_the_conversion_config():
    conv, _ = convert(factory("lif"), prune_rate=0.5, example_input=X[:, :1])
    assert conv.build_config["arch"] == "converted"
    back = binslt.to_spikingjelly(conv)
    assert "build_config" not in back.__dict__
    with pytest.raises(TypeError, match="build_config"):
        binslt.export_ticket(back, "/nonexistent/x.safetensors")


def test_converted_ticket_leaves_python_through_torch_export(tmp_path):
    """A converted model's loaded ticket exports with torch.export like a built network's: the
    program runs the binslt ops from packed planes and gives the loaded model's outputs, also
    after save/load of the program (the SpikingJelly model's own eval outputs beside)."""
    from binslt.interop.export import export_program, load_program, save_program

    conv, _ = convert(factory("lif"), prune_rate=0.5, example_input=X[:, :1], backend="cpu")
    search_step(conv, X)
    path = tmp_path / "t.safetensors"
    binslt.export_ticket(conv, path)
    loaded = binslt.load_ticket(path, model=factory("lif", seed=9))
    xe = torch.rand(2, 5, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    functional.reset_net(loaded)
    ep = export_program(loaded, xe)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(o.startswith("binslt.") for o in ops), ops
    saved = save_program(ep, tmp_path / "p.pt2")
    want = logits(loaded, xe)
    assert want.abs().max() > 0
    for program in (ep, load_program(saved)):
        with torch.no_grad():
            assert torch.equal(program.module()(xe).mean(0), want)
    # independent: the converted model's weights back in SpikingJelly give the same decisions
    sj = binslt.to_spikingjelly(loaded)
    assert torch.equal(logits(sj, xe).argmax(-1), want.argmax(-1))
