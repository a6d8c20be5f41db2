"""binslt.convert: SpikingJelly models -> BinW-SLT search layers."""

from __future__ import annotations

import pytest
import torch
from helpers import binarised_copy, sj_modules, tie_mask
from torch import nn

import binslt
from binslt import reference as ref
from binslt.convert import convert

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
    for train in (False, True):
        conv.train(train)
        expected_net.train(train)
        functional.reset_net(expected_net)
        sj_in, sj_out = record(expected_net, neuron.LIFNode)
        _, our_out = record(conv, (binslt.BinSpikeConv2d, binslt.BinSpikeLinear))
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
    for train in (False, True):
        conv.train(train)
        expected_net.train(train)
        functional.reset_net(expected_net)
        sj_in, sj_out = record(expected_net, neuron.LIFNode)
        _, our_out = record(conv, (binslt.BinSpikeConv2d, binslt.BinSpikeLinear))
        torch.testing.assert_close(conv(x), expected_net(x), rtol=1e-5, atol=1e-5)
        for xin, s_exp, s in zip(sj_in, sj_out, our_out):
            _, h = ref.lif_multistep(xin.double(), tau=100.0, decay_input=False, return_h=True)
            assert bool(tie_mask(h, 1.0).all())
            assert torch.equal(s, s_exp)


def test_example_input_decides_spike_or_real_inputs():
    nkw = neuron_kwargs("paper")
    net = nn.Sequential(layer.Linear(5, 4, bias=False), neuron.LIFNode(**nkw),
                        layer.Linear(4, 3, bias=False), neuron.LIFNode(**nkw))
    functional.set_step_mode(net, "m")
    spikes = (torch.rand(2, 3, 5) > 0.5).float()
    conv, report = convert(net, example_input=spikes)
    assert [c["input"] for c in report.converted] == ["spike", "spike"]
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
        lif(surrogate_function=surrogate.PiecewiseQuadratic()),
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
    conv, report = convert(net)
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
    assert "PiecewiseQuadratic" in notes["10"] and "PiecewiseQuadratic" in reasons["11"]
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
    from binslt.artifacts import load_model
    from binslt.tickets import load_ticket

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
