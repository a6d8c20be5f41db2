"""binslt.convert: SpikingJelly models -> BinW-SLT search layers."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import assert_close_rel, binarised_copy, sj_modules, tie_mask
from torch import nn

import binslt
from binslt.interop.convert import ExampleRunError, SpikeDropout, convert, to_spikingjelly
from binslt.ops import reference as ref

# SpikingJelly is imported when a test first uses it (skipped where it is not installed).
functional, layer, neuron, surrogate = sj_modules("functional", "layer", "neuron", "surrogate")


NEURONS = ("paper", "sj_sigmoid_soft")


def neuron_kwargs(name: str) -> dict:
    """LIFNode keywords of a neuron setting in NEURONS (its surrogate made here, on use)."""
    if name == "paper":
        return dict(tau=100.0, decay_input=False, v_threshold=1.0, v_reset=0.0,
                    surrogate_function=surrogate.ATan(), detach_reset=True)
    assert name == "sj_sigmoid_soft", name
    return dict(tau=2.0, decay_input=True, v_threshold=0.5, v_reset=None,
                surrogate_function=surrogate.Sigmoid(alpha=3.0))


def sj_vgg(nkw: dict) -> nn.Sequential:
    """A small spiking VGG of SpikingJelly layers, step mode 'm': input [T, N, 2, 8, 8]."""
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
        neuron.LIFNode(**nkw),
        layer.Conv2d(8, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16),
        neuron.LIFNode(**nkw),
        layer.MaxPool2d(2), layer.Flatten(),
        layer.Linear(16 * 4 * 4, 32, bias=False), neuron.LIFNode(**nkw),
        layer.Linear(32, 5),
    )
    functional.set_step_mode(net, "m")
    with torch.no_grad():  # non-trivial BN state, so that carrying it over is tested
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.6)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net[8].weight.mul_(6.0)  # no BN before this neuron: scale so that it fires
    return net


def record(net: nn.Module, types) -> tuple[list, list]:
    """Forward hooks: (inputs, outputs) of every module of the given types, in call order."""
    ins, outs = [], []

    def hook(_m, i, o):
        ins.append(i[0].detach())
        outs.append(o.detach())

    for m in net.modules():
        if isinstance(m, types):
            m.register_forward_hook(hook)
    return ins, outs


def recorded_modes(conv: nn.Module, expected_net: nn.Module):
    """For eval, then training mode: both networks in that mode, SpikingJelly's neurons reset,
    and hooks recording the next forward; yields (train, the inputs and the spikes of
    ``expected_net``'s LIFNodes, the spikes of ``conv``'s binslt spiking layers)."""
    for train in (False, True):
        conv.train(train)
        expected_net.train(train)
        functional.reset_net(expected_net)
        sj_in, sj_out = record(expected_net, neuron.LIFNode)
        _, our_out = record(conv, (binslt.BinSpikeConv2d, binslt.BinSpikeLinear))
        yield train, sj_in, sj_out, our_out


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("nname", sorted(NEURONS))
def test_converted_spikes_equal_spikingjelly_with_sign_weights(nname, backend):
    torch.manual_seed(3)
    nkw = neuron_kwargs(nname)
    net = sj_vgg(nkw)
    conv, report = convert(net, prune_rate=0.0, backend=backend)
    assert [c["paths"][0] for c in report.converted] == ["0", "3", "8", "10"]
    assert [c["input"] for c in report.converted] == ["real", "spike", "spike", None]
    assert [c["new"] for c in report.converted] == ["BinSpikeConv2d", "BinSpikeConv2d",
                                                    "BinSpikeLinear", "BinLinear"]
    # the logits layer feeds no neuron: a masked sign layer without one, its bias kept
    assert "not followed by a LIFNode" in report.converted[3]["note"]
    assert report.converted[3]["bias"] == "shift" and report.skipped == []
    expected_net = binarised_copy(net, ["0", "3", "8", "10"])
    vth = nkw["v_threshold"]
    x = torch.rand(3, 4, 2, 8, 8) * 2  # [T, N, C, H, W], real-valued first-layer input
    for train, sj_in, sj_out, our_out in recorded_modes(conv, expected_net):
        y_exp = expected_net(x)
        y = conv(x)
        assert len(our_out) == len(sj_out) == 3
        for k, (xin, s_exp, s) in enumerate(zip(sj_in, sj_out, our_out)):
            _, h = ref.lif_multistep(xin.double(), tau=nkw["tau"],
                                     decay_input=nkw["decay_input"], v_threshold=vth,
                                     v_reset=nkw["v_reset"], return_h=True)
            # margin check: on this seeded input no neuron comes within 1e-5 of the threshold,
            # so the spikes must agree exactly, layer by layer and end to end
            assert bool(tie_mask(h, vth).all()), f"layer {k}: a near-tie; pick another seed"
            assert torch.equal(s, s_exp), f"layer {k} ({'train' if train else 'eval'})"
            assert 0.02 < s.mean() < 0.98, f"layer {k} fires at rate {s.mean():.3f}"
        torch.testing.assert_close(y, y_exp, rtol=1e-5, atol=1e-5)
        # BN state carried over and updated identically
        ours = [m.bn for m in conv.modules() if isinstance(m, binslt.BinSpikeConv2d)]
        theirs = [m for m in expected_net.modules() if isinstance(m, nn.BatchNorm2d)]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_string_padding_converts_where_binslt_computes_it():
    """torch's padding='same' (odd kernel, stride 1) and 'valid' convert; the spikes equal
    SpikingJelly's own layers with the same sign weights, eval and training. An even kernel's
    'same' (one side padded more) stays, with the reason."""
    torch.manual_seed(5)
    nkw = neuron_kwargs("paper")
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding="same", bias=False), layer.BatchNorm2d(8),
        neuron.LIFNode(**nkw),
        layer.Conv2d(8, 8, 5, padding="same", bias=False), layer.BatchNorm2d(8),
        neuron.LIFNode(**nkw),
        layer.Conv2d(8, 8, 3, padding="valid", bias=False), layer.BatchNorm2d(8),
        neuron.LIFNode(**nkw),
        layer.Conv2d(8, 4, 2, padding="same", bias=False), neuron.LIFNode(**nkw),
    )
    functional.set_step_mode(net, "m")
    with torch.no_grad():  # BN states under which every layer fires in eval and training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 0.6)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    conv, report = convert(net, prune_rate=0.0, strict=False)
    assert [c["paths"][0] for c in report.converted] == ["0", "3", "6"]
    assert [c["new"] for c in report.converted] == ["BinSpikeConv2d"] * 3
    assert [conv[i].padding for i in (0, 3, 6)] == [1, 2, 0]
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert "even kernel_size=2" in reasons["9"]
    expected_net = binarised_copy(net, ["0", "3", "6"])
    x = torch.rand(3, 4, 2, 9, 9) * 2
    for train, sj_in, sj_out, our_out in recorded_modes(conv, expected_net):
        expected_net(x)
        conv(x)
        assert len(our_out) == 3
        for k, (xin, s_exp, s) in enumerate(zip(sj_in, sj_out, our_out)):
            _, h = ref.lif_multistep(xin.double(), tau=nkw["tau"],
                                     decay_input=nkw["decay_input"], v_threshold=1.0,
                                     v_reset=0.0, return_h=True)
            assert bool(tie_mask(h, 1.0).all()), f"layer {k}: a near-tie; pick another seed"
            assert s.shape == s_exp.shape and torch.equal(s, s_exp), (k, train)
            assert 0.02 < s.mean() < 0.98, f"layer {k} fires at rate {s.mean():.3f}"


def test_converted_layers_carry_settings_weights_and_train_scores():
    torch.manual_seed(0)
    nkw = neuron_kwargs("sj_sigmoid_soft")
    net = sj_vgg(nkw)
    conv, _ = convert(net, prune_rate=0.3, backend="torch")
    first = conv[0]
    assert isinstance(first, binslt.BinSpikeConv2d) and first.mode == "search"
    assert (first.kernel_size, first.stride, first.padding) == (3, 1, 1)
    nc = first.neuron
    assert (nc.tau, nc.decay_input, nc.v_threshold, nc.v_reset, nc.detach_reset) == (
        2.0, True, 0.5, None, False)
    assert (nc.surrogate, nc.surrogate_alpha) == ("sigmoid", 3.0)
    assert first.prune_rate == 0.3 and first.bn.affine
    torch.testing.assert_close(first.weight, net[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(first.bn.weight, net[1].weight, rtol=0, atol=0)
    assert isinstance(conv[1], nn.Identity) and isinstance(conv[2], nn.Identity)
    # the original is untouched (inplace=False); the logits layer (with its bias) becomes a
    # masked sign layer followed by the bias
    assert isinstance(net[0], layer.Conv2d) and type(conv[10][0]) is binslt.BinLinear
    torch.testing.assert_close(conv[10][1].bias, net[10].bias, rtol=0, atol=0)
    out = conv(torch.rand(2, 3, 2, 8, 8))
    out.sum().backward()
    for m in conv.modules():
        if isinstance(m, (binslt.BinSpikeConv2d, binslt.BinSpikeLinear)):
            assert m.scores.grad is not None and m.scores.grad.abs().sum() > 0
            assert m.weight.grad is None
    # SpikingJelly's reset_net still works on the converted model
    functional.reset_net(conv)


def test_torch_nn_layers_and_seq_to_ann_containers():
    torch.manual_seed(1)
    nkw = neuron_kwargs("paper")
    net = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)),
        neuron.LIFNode(step_mode="m", **nkw),
        layer.SeqToANNContainer(nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)),
        layer.SeqToANNContainer(nn.BatchNorm2d(6, affine=False)),
        neuron.LIFNode(step_mode="m", **nkw),
        layer.Flatten(step_mode="m"),
        nn.Linear(6 * 3 * 3, 7, bias=False),
        neuron.LIFNode(step_mode="m", **nkw),
        nn.Linear(7, 3, bias=False),
    )
    conv, report = convert(net, prune_rate=0.0, backend="torch")
    assert [type(m).__name__ for m in conv] == [
        "BinSpikeConv2d", "Identity", "BinSpikeConv2d", "Identity", "Identity", "Flatten",
        "BinSpikeLinear", "Identity", "BinLinear"]
    assert conv[2].stride == 2 and conv[2].bn is not None and not conv[2].bn.affine
    expected_net = binarised_copy(net, ["0.0", "2.0", "6", "8"])
    x = torch.rand(2, 3, 1, 6, 6) * 3
    for _, sj_in, sj_out, our_out in recorded_modes(conv, expected_net):
        torch.testing.assert_close(conv(x), expected_net(x), rtol=1e-5, atol=1e-5)
        for xin, s_exp, s in zip(sj_in, sj_out, our_out):
            _, h = ref.lif_multistep(xin.double(), tau=100.0, decay_input=False, return_h=True)
            assert bool(tie_mask(h, 1.0).all())
            assert torch.equal(s, s_exp)


def test_input_kinds_come_from_the_graph_not_the_values():
    nkw = neuron_kwargs("paper")
    net = nn.Sequential(layer.Linear(5, 4, bias=False), neuron.LIFNode(**nkw),
                        layer.Linear(4, 3, bias=False), neuron.LIFNode(**nkw))
    functional.set_step_mode(net, "m")
    spikes = (torch.rand(2, 3, 5) > 0.5).float()
    # binary example values do not make the model's input spikes: it is an input (real)
    conv, report = convert(net, example_input=spikes)
    assert [c["input"] for c in report.converted] == ["real", "spike"]
    assert [c["layer_input"] for c in report.converted] == ["real", "spike"]
    # event data: spike_input=True keeps the first layer on the spike path, checked on the values
    conv, report = convert(net, example_input=spikes, spike_input=True)
    assert [c["input"] for c in report.converted] == ["spike", "spike"]
    assert conv[0].input == "spike"
    with pytest.raises(ValueError, match="spike_input=True, but example_input holds values"):
        convert(net, example_input=torch.rand(2, 3, 5), spike_input=True)
    conv, report = convert(net, example_input=torch.rand(2, 3, 5))
    assert [c["input"] for c in report.converted] == ["real", "spike"]
    # the original model was run in eval mode without keeping state or changing modes
    assert net.training and not isinstance(net[1].v, torch.Tensor)
    # default: first layer real, the rest spike; a spike layer fed real values says so
    conv, report = convert(net)
    assert [c["input"] for c in report.converted] == ["real", "spike"]
    bad = nn.Sequential(conv[2], conv[3])
    with pytest.raises(ValueError, match="input='real'"):
        bad(torch.rand(2, 3, 4))


def test_unsupported_patterns_are_left_alone_with_reasons():
    def lif(**kw):
        return neuron.LIFNode(step_mode=kw.pop("step_mode", "m"), **kw)

    stateful = lif()
    stateful(torch.rand(2, 1, 4))  # now holds a membrane tensor
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=True, step_mode="m"), lif(),
        layer.Conv2d(4, 4, 3, padding=1, bias=False, groups=2, step_mode="m"), lif(),
        layer.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False, step_mode="m"), lif(),
        layer.Conv2d(4, 4, (3, 1), padding=(1, 0), bias=False, step_mode="m"), lif(),
        layer.Conv2d(4, 4, 3, padding=1, bias=False, step_mode="m"), lif(step_mode="s"),
        layer.Conv2d(4, 4, 3, padding=1, bias=False, step_mode="m"),
        lif(surrogate_function=surrogate.PiecewiseExp()),
        layer.Conv2d(4, 4, 3, padding=1, bias=False, step_mode="s"), lif(),
        layer.Flatten(step_mode="m"),
        layer.Linear(4, 4, bias=False, step_mode="m"), stateful,
        layer.Linear(4, 4, bias=False, step_mode="m"), lif(store_v_seq=True),
    )

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, bias=False)
            self.sn = lif()

    net.append(Custom())
    with pytest.raises(ValueError, match=r"hold state from an earlier run: 16 \(v\); call "
                                         r"spikingjelly.activation_based.functional.reset_net"):
        convert(net)
    conv, report = convert(net, strict=False)
    # a conv bias is folded (no BN here: into the layer's per-channel shift)
    assert report.converted[0]["paths"] == ["0", "1"] and report.converted[0]["bias"] == "shift"
    assert report.converted[0]["new"] == "BinSpikeConv2d"
    # convs/linears in front of a neuron binslt does not take become masked sign layers without
    # a neuron, and say why; the neurons stay
    assert [(c["paths"], c["new"]) for c in report.converted[1:]] == [
        (["8"], "BinConv2d"), (["10"], "BinConv2d"), (["12"], "BinConv2d"),
        (["15"], "BinLinear"), (["17"], "BinLinear")]
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    notes = {c["paths"][0]: c.get("note", "") for c in report.converted}
    assert "groups=2" in reasons["2"]
    assert "dilation" in reasons["4"]
    assert "non-square kernel_size" in reasons["6"]
    assert "single-step" in notes["8"] and "single-step" in reasons["9"]
    assert "PiecewiseExp" in notes["10"] and "PiecewiseExp" in reasons["11"]
    assert "step mode 's'" in notes["12"]
    assert "stateful" in notes["15"] and "stateful" in reasons["16"]
    assert "store_v_seq" in notes["17"] and "store_v_seq" in reasons["18"]
    assert "execution order is unknown" in reasons["19.conv"]
    assert "LIFNode not preceded" in reasons["19.sn"]
    for i in (2, 4, 6, 9, 11, 13, 16, 18):
        assert type(conv[i]) is type(net[i]), i
    assert "left" in str(report)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        convert("model")
    net = nn.Sequential(layer.Linear(2, 2, bias=False), neuron.LIFNode(step_mode="m"))
    with pytest.raises(ValueError, match="prune_rate"):
        convert(net, prune_rate=1.0)
    with pytest.raises(ValueError, match="backend"):
        convert(net, backend="gpu")
    assert binslt.convert is convert


# ---------------------------------------------------------------------------------------------
# Training converted models: input kinds from the graph, dropout, strictness, what trains
# ---------------------------------------------------------------------------------------------

def sj_neuron(kind: str):
    """SpikingJelly's neuron class of a kind ("lif" or "if")."""
    return {"lif": neuron.LIFNode, "if": neuron.IFNode}[kind]


def layer_of(model: nn.Module, c: dict) -> nn.Module:
    """The binslt layer of a report's converted entry (at the conv's path, or in the stage at
    the neuron's path)."""
    m = model.get_submodule(c["paths"][0])
    return m if isinstance(m, (binslt.BinSpikeConv2d, binslt.BinSpikeLinear)) else \
        model.get_submodule(c["paths"][-1]).layer


def firing_rates(model: nn.Module) -> dict:
    """Hooks: module -> firing rate of its last output, for every converted spiking layer."""
    rates = {}

    def hook(m, _i, o):
        rates[m] = float(o.detach().float().mean())

    for m in model.modules():
        if isinstance(m, (binslt.BinSpikeConv2d, binslt.BinSpikeLinear)):
            m.register_forward_hook(hook)
    return rates


def search_step(model: nn.Module, x: torch.Tensor, classes: int) -> torch.Tensor:
    """One training-mode SGD step on the parameters that require grad; returns the loss."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    functional.reset_net(model)
    y = model(x)
    loss = nn.functional.cross_entropy(y.mean(0) if y.dim() == 3 else y,
                                       torch.arange(x.shape[1]) % classes)
    opt.zero_grad()
    loss.backward()
    opt.step()
    functional.reset_net(model)
    return loss.detach()


@pytest.mark.parametrize("cnf,nkind", [("ADD", "lif"), ("ADD", "if"), ("AND", "lif"),
                                       ("IAND", "lif")])
def test_sew_resnet_converts_and_trains(cnf, nkind):
    """SpikingJelly's SEW ResNet (its own class, one BasicBlock per stage, 3x32x32 input): ADD
    feeds spike sums (0, 1, 2) to the next block's convs, which take them on the real-input path;
    AND / IAND give spikes, which stay on the spike path. A training-mode search step runs with
    every converted layer firing, and the converted ADD model's training-mode logits equal the
    SpikingJelly model's with the same sign weights."""
    from spikingjelly.activation_based.model import sew_resnet

    torch.manual_seed(0)
    net = sew_resnet.SEWResNet(sew_resnet.BasicBlock, [1, 1, 1, 1], cnf=cnf,
                               spiking_neuron=sj_neuron(nkind), num_classes=10)
    functional.set_step_mode(net, "m")
    with torch.no_grad():  # BN scales and shifts with which every layer fires in training mode
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(1.0, 2.0)
                m.bias.uniform_(0.2, 0.6)
    x = torch.rand(2, 2, 3, 32, 32)
    conv, report = convert(net, prune_rate=0.0, example_input=x)
    fused = {c["paths"][0]: c for c in report.converted if c["new"] == "BinSpikeConv2d"}
    assert len(fused) == 1 + 4 * 2 + 3  # the stem, two per block, three shortcut neurons
    assert not report.skipped and [c["new"] for c in report.converted][-1] == "BinLinear"
    sums = {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "downsample.0")}
    for path, c in fused.items():
        want = ("real" if path == "conv1" else
                "spike-sum" if cnf == "ADD" and path in sums else "spike")
        assert c["input"] == want, (path, c["input"])
        assert c["layer_input"] == ("spike" if want == "spike" else "real")
        assert layer_of(conv, c).input == c["layer_input"]
    expected = binarised_copy(net, [c["paths"][0] for c in report.converted])
    if cnf == "ADD" and nkind == "lif":  # the spike-sum path is exact in training mode too
        expected.train()
        conv.train()
        functional.reset_net(expected)
        with torch.no_grad():
            y_exp, y = expected(x).mean(0), conv(x).mean(0)
        functional.reset_net(conv)
        assert torch.equal(y.argmax(-1), y_exp.argmax(-1))
        assert_close_rel(y, y_exp, 1e-3, "SEW ADD, training mode")
    rates = firing_rates(conv)
    peaks = []
    for c in fused.values():
        if c["input"] == "spike-sum":
            layer_of(conv, c).register_forward_pre_hook(
                lambda _m, args: peaks.append(float(args[0].detach().max())))
    scores = {n: p for n, p in conv.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in scores.items()}
    loss = search_step(conv, x, 10)
    assert torch.isfinite(loss)
    assert len(peaks) == (6 if cnf == "ADD" else 0) and all(p <= 3 for p in peaks)
    assert cnf != "ADD" or max(peaks) == 2.0  # spike sums reached the layers
    assert len(rates) == len(fused) and all(0 < r < 1 for r in rates.values()), rates
    assert all(n.endswith("scores") for n in scores)
    assert all(not torch.equal(p, before[n]) for n, p in scores.items())


@pytest.mark.parametrize("nkind", ["lif", "if"])
def test_spiking_vgg_with_dropout_trains_and_equals_spikingjelly(nkind):
    """The zoo's spiking_vgg11_bn (classifier shrunk as in test_zoo): in training mode the
    classifier's dropouts are active. The first one, between two converted layers, becomes a
    SpikeDropout (the mask on the spikes, 1/(1-p) in the next layer's gain: the packed spike
    path); the last one feeds the logits layer and stays. With the same seed (the same masks) the
    converted model's training-mode logits equal SpikingJelly's; then a search step runs."""
    from test_zoo import build

    net = build("spiking_vgg11_bn", nkind)
    x = torch.rand(2, 2, 3, 32, 32)
    conv, report = convert(net, prune_rate=0.0, example_input=x[:, :1])
    by_path = {c["paths"][0]: c for c in report.converted}
    c3 = by_path["classifier.3"]
    assert (c3["input"], c3["layer_input"], c3["dropout"]) == ("spike-dropout", "spike",
                                                                "classifier.2")
    assert isinstance(conv.classifier[2], SpikeDropout)
    assert type(conv.classifier[5]) is layer.Dropout  # before the logits layer: left as it is
    assert by_path["classifier.0"]["input"] == "real"  # after the average pool
    assert any("classifier.2 -> SpikeDropout" in n for n in report.notes)
    expected = binarised_copy(net, list(by_path))
    for m in (expected, conv):
        m.train()
    for seed in (1, 2):
        functional.reset_net(expected)
        functional.reset_net(conv)
        torch.manual_seed(seed)
        with torch.no_grad():
            y_exp = expected(x).mean(0)
        torch.manual_seed(seed)
        with torch.no_grad():
            y = conv(x).mean(0)
        assert expected.classifier[2].mask is not None  # the dropout was active
        assert torch.equal(y.argmax(-1), y_exp.argmax(-1))
        assert_close_rel(y, y_exp, 1e-3, f"spiking_vgg11_bn, training mode, seed {seed}")
    rates = firing_rates(conv)
    assert torch.isfinite(search_step(conv, x, 10))
    assert all(r > 0 for r in rates.values()) and conv.classifier[3].input_gain == 2.0
    back = to_spikingjelly(conv)
    assert type(back.classifier[2]) is layer.Dropout


def dropout_net() -> nn.Sequential:
    """Linear-LIF pairs with a SpikingJelly layer.Dropout (one mask over T until reset) and a
    torch nn.Dropout (a new mask every call, over all of [T, N, F]) between them."""
    net = nn.Sequential(
        layer.Linear(6, 24, bias=False), neuron.LIFNode(tau=2.0), layer.Dropout(0.5),
        layer.Linear(24, 24, bias=False), neuron.LIFNode(tau=2.0), nn.Dropout(0.25),
        layer.Linear(24, 16, bias=False), neuron.LIFNode(tau=2.0), layer.Linear(16, 3))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for i, f in ((0, 4.0), (3, 4.0), (6, 8.0)):
            net[i].weight.mul_(f)
    return net


@pytest.mark.parametrize("recorded,backend", [(True, "torch"), (False, "torch"), (True, "cpu"),
                                              (True, "triton")],
                         ids=["recorded-torch", "sequential-torch", "recorded-cpu",
                              "recorded-triton"])
def test_dropout_spikes_equal_spikingjelly_with_the_same_masks(recorded, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    torch.manual_seed(4)
    net = dropout_net()
    x = torch.rand(4, 5, 6) * 2
    conv, report = convert(net, prune_rate=0.0, example_input=x if recorded else None,
                           backend=backend)
    assert [c["input"] for c in report.converted] == ["real", "spike-dropout", "spike-dropout",
                                                      None]
    assert isinstance(conv[2], SpikeDropout)
    assert isinstance(conv[5], SpikeDropout)
    expected = binarised_copy(net, ["0", "3", "6", "8"])
    expected.train()
    conv.train()
    for seed in (0, 1, 2):
        functional.reset_net(expected)
        functional.reset_net(conv)
        sj_in, sj_out = record(expected, neuron.LIFNode)
        _, our_out = record(conv, binslt.BinSpikeLinear)
        torch.manual_seed(seed)
        y_exp = expected(x)
        torch.manual_seed(seed)
        y = conv(x)
        for k, (xin, s_exp, s) in enumerate(zip(sj_in, sj_out, our_out)):
            _, h = ref.lif_multistep(xin.double(), tau=2.0, decay_input=True, return_h=True)
            assert bool(tie_mask(h, 1.0).all()), f"layer {k}: a near-tie; pick another seed"
            assert torch.equal(s, s_exp), f"layer {k}, seed {seed}"
            assert 0.05 < s.mean() < 0.95
        torch.testing.assert_close(y, y_exp, rtol=1e-5, atol=1e-5)
    assert (conv[3].input_gain, conv[6].input_gain) == (2.0, 1.0 / 0.75)
    conv.eval()
    functional.reset_net(conv)
    conv(x)
    assert conv[3].input_gain == conv[6].input_gain == 1.0  # no dropout in eval mode
    # layer.Dropout: one mask over all T steps and over calls until reset; nn.Dropout: per call
    conv.train()
    spikes = (torch.rand(3, 5, 24) > 0.3).float()
    sj_drop, our_drop = copy.deepcopy(net[2]), conv[2]
    functional.reset_net(conv)
    torch.manual_seed(9)
    a, b = our_drop(spikes), our_drop(spikes)
    torch.manual_seed(9)
    sj = sj_drop(spikes)
    assert torch.equal(a, b) and torch.equal(a * 2.0, sj) and set(a.unique().tolist()) == {0, 1}
    functional.reset_net(conv)
    assert not torch.equal(our_drop(spikes), a)
    torch.manual_seed(9)
    c, d = conv[5](spikes), conv[5](spikes)
    torch.manual_seed(9)
    sj_c = net[5](spikes)
    assert torch.equal(c / 0.75, sj_c) and not torch.equal(c, d)


class DropoutTwoUses(nn.Module):
    """A dropout's output feeds a converted layer and the model's output: it cannot become a
    SpikeDropout, so the layer after it takes real input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = layer.Linear(4, 8, bias=False), neuron.LIFNode()
        self.drop = layer.Dropout(0.5)
        self.fc2, self.sn2 = layer.Linear(8, 8, bias=False), neuron.LIFNode()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        s = self.drop(self.sn1(self.fc1(x)))
        return self.sn2(self.fc2(s)) + s


def test_a_dropout_used_elsewhere_stays_and_its_layer_takes_real_input():
    torch.manual_seed(2)
    net = DropoutTwoUses()
    with torch.no_grad():
        net.fc1.weight.mul_(6.0)
        net.fc2.weight.mul_(6.0)
    x = torch.rand(3, 4, 4)
    conv, report = convert(net, prune_rate=0.0, example_input=x, backend="torch")
    c = report.converted[1]
    assert (c["paths"][0], c["input"], c["layer_input"]) == ("fc2", "spike-dropout", "real")
    assert type(conv.drop) is layer.Dropout and "goes elsewhere too" in report.notes[0]
    expected = binarised_copy(net, ["fc1", "fc2"])
    for m in (expected, conv):
        m.train()
        functional.reset_net(m)
    torch.manual_seed(5)
    y_exp = expected(x)
    torch.manual_seed(5)
    y = conv(x)
    assert (y_exp == 2).any()  # the dropout was active: its output reached 2
    torch.testing.assert_close(y, y_exp, rtol=1e-5, atol=1e-5)


def test_failed_example_run_and_held_state_stop_convert_in_one_line():
    torch.manual_seed(0)
    net = sj_vgg(neuron_kwargs("paper"))
    x = torch.rand(3, 2, 2, 8, 8)
    with pytest.raises(ExampleRunError, match="add the T axis") as err:
        convert(net, example_input=x[0])  # [N, C, H, W]: no T axis
    assert "\n" not in str(err.value) and "(2, 2, 8, 8)" in str(err.value)
    # strict=False: today's best effort, the fall-back over nn.Sequentials, and it says why
    conv, report = convert(net, example_input=x[0], strict=False)
    assert report.method.startswith("sequential (the example run failed")
    assert [c["new"] for c in report.converted] == ["BinSpikeConv2d", "BinSpikeConv2d",
                                                    "BinSpikeLinear", "BinLinear"]
    # a model that ran (with autograd) and was not reset
    net.train()
    net(x).sum().backward()
    with pytest.raises(ExampleRunError, match=r"call spikingjelly\.activation_"
                                                            r"based\.functional\.reset_net") as err:
        convert(net, example_input=x)
    assert "\n" not in str(err.value) and "2 (v)" in str(err.value)
    conv, report = convert(net, example_input=x, strict=False)
    assert report.method == "recorded run"
    assert {s["path"] for s in report.skipped} == {"2", "5", "9"}
    assert all("stateful" in s["reason"] for s in report.skipped)
    functional.reset_net(net)
    conv, report = convert(net, example_input=x)
    assert not report.skipped


class HalfSpikeLIF(neuron.LIFNode):
    """A neuron whose output is 0 or 0.5: a SpikingJelly BaseNode the graph reads as spikes."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_example_runs_confirm_the_graph_kinds():
    net = nn.Sequential(layer.Linear(4, 8, bias=False), HalfSpikeLIF(),
                        layer.Linear(8, 8, bias=False), neuron.LIFNode(),
                        layer.Linear(8, 3, bias=False))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.mul_(8.0)
    x = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match=r"the graph says 2's input holds spike values, but "
                                         r"the example run in eval and training mode gave it "
                                         r"values \[0.0, 0.5\]"):
        convert(net, example_input=x)
    conv, report = convert(net, example_input=x, strict=False)
    (c,) = [c for c in report.converted if c["paths"][0] == "2"]
    assert c["paths"] == ["2", "3"] and (c["input"], c["layer_input"]) == ("real", "real")
    assert conv[2].input == "real" and "converted as a real-input layer" in report.notes[0]
    conv.train()(x).sum().backward()  # and it trains


def test_search_mode_trains_the_scores_only():
    torch.manual_seed(0)
    net = sj_vgg(neuron_kwargs("sj_sigmoid_soft"))
    extra = nn.BatchNorm1d(5)  # a module binslt leaves as it is: frozen in search mode too
    net.append(layer.SeqToANNContainer(extra))
    x = torch.rand(2, 3, 2, 8, 8)
    conv, report = convert(net, example_input=x)
    trainable = {n for n, p in conv.named_parameters() if p.requires_grad}
    scores = {n for n, _ in conv.named_parameters() if n.endswith(".scores")}
    assert trainable == scores and len(scores) == 4
    assert "BatchNorm affine frozen" in report.trainable and "11.0.weight" in report.frozen
    assert "trains in search mode: scores" in str(report)
    conv, report = convert(net, example_input=x, train_bn=True)
    trainable = {n for n, p in conv.named_parameters() if p.requires_grad}
    bn = {f"{i}.bn.{w}" for i in (0, 3) for w in ("weight", "bias")} | {"11.0.weight",
                                                                        "11.0.bias"}
    assert trainable == scores | bn and "train_bn=True" in report.trainable
    assert not conv[10][1].bias.requires_grad  # a folded bias is never trained
    search_step(conv, x, 3)
    back = to_spikingjelly(convert(net, example_input=x)[0])
    assert all(p.requires_grad for p in back.parameters())


# ---------------------------------------------------------------------------------------------
# binslt search --model FILE.py:FACTORY
# ---------------------------------------------------------------------------------------------

USER_MODEL = '''
from torch import nn
from spikingjelly.activation_based import layer, neuron, surrogate


def lif():
    return neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)


class Block(nn.Module):
    """A residual block in the user's own forward: bn(conv(x)) + x -> neuron."""

    def __init__(self, c):
        super().__init__()
        self.conv = layer.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = layer.BatchNorm2d(c)
        self.sn = lif()

    def forward(self, x):
        out = self.bn(self.conv(x))
        out = out + x
        return self.sn(out)


def small(num_classes=10):
    return nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1), layer.BatchNorm2d(8), lif(), Block(8),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, num_classes))


def not_a_model():
    return 3
'''

TINY_RUN = ["--train-subset", "96", "--test-subset", "48", "--batch-size", "32", "--epochs",
            "2", "--no-progress"]


def _run_cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "binslt", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def user_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_model.py"
    path.write_text(USER_MODEL)
    return path


def test_search_model_end_to_end_and_resume_after_kill(user_model_file, tmp_path, capsys):
    import json

    from binslt import cli

    spec = f"{user_model_file}:small"
    out = tmp_path / "run"
    assert cli.main(["search", "--model", spec, "--input-shape", "1,8,8", *TINY_RUN,
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BinSpikeConv2d" in printed and "residual" in printed  # the report is printed
    report = (out / "report.txt").read_text()
    assert "3.conv + 3.bn + 3.sn -> BinSpikeConv2d" in report and "residual" in report
    rj = json.loads((out / "report.json").read_text())
    assert [c["new"] for c in rj["converted"]] == ["BinSpikeConv2d", "BinSpikeConv2d",
                                                  "BinLinear"]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["model"] == spec and res["arch"] == "custom"
    assert (out / "ticket.safetensors").is_file()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    bc = ck["build_config"]
    assert bc["factory"].endswith("my_model.py:small") and bc["input_shape"] == [1, 8, 8]

    # reloading rebuilds the model from the recorded factory: eval of the run and the ticket
    from binslt.io.artifacts import load_model
    from binslt.io.tickets import load_ticket

    model, _ = load_model(out)
    ticket = load_ticket(out / "ticket.safetensors", backend="torch")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ticket(x), model(x), rtol=1e-5, atol=1e-5)
    assert cli.main(["eval", str(out / "ticket.safetensors")]) == 0

    # killed in the middle of epoch 2, resumed: the same run
    crashed = tmp_path / "crashed"
    r = _run_cli("search", "--model", spec, *TINY_RUN, "--out", crashed,
                 "--_crash-after-batches", "2:2")
    assert r.returncode == 17, r.stderr
    assert cli.main(["search", "--model", spec, *TINY_RUN, "--out", str(crashed),
                     "--resume"]) == 0
    a = ck["model"]
    b = torch.load(crashed / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((crashed / "results.json").read_text())
    assert (ra["test_acc"], ra["best_test_acc"]) == (res["test_acc"], res["best_test_acc"])


def test_search_model_errors_name_the_file(user_model_file, tmp_path, capsys):
    from binslt import cli

    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('no such layer')\n")
    cases = [
        (f"{tmp_path / 'missing.py'}:small", "no such file"),
        (f"{broken}:small", "fails to import (RuntimeError: no such layer)"),
        (f"{user_model_file}:nothing", "has no function 'nothing'"),
        (f"{user_model_file}:not_a_model", "returned a int, not a SpikingJelly model"),
        (str(user_model_file), "FILE.py:FACTORY"),
    ]
    for spec, msg in cases:
        assert cli.main(["search", "--model", spec, *TINY_RUN, "--out",
                         str(tmp_path / "x")]) == 2, spec
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in lines[0], lines
        if "FILE.py" not in msg:
            assert spec.split(":")[0].rsplit("/", 1)[-1] in lines[0]
    assert cli.main(["search", "--model", f"{user_model_file}:small", "--input-shape", "1,9,9",
                     *TINY_RUN, "--out", str(tmp_path / "y")]) == 2
    assert "does not match the dataset's images (1,8,8)" in capsys.readouterr().err
    assert cli.main(["search", "--model", f"{user_model_file}:small", "--arch", "vgg9",
                     *TINY_RUN, "--out", str(tmp_path / "z")]) == 2
    assert "exclude each other" in capsys.readouterr().err
