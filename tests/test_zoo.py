"""binslt.convert on SpikingJelly's own model zoo (``spikingjelly.activation_based.model``).

For each model (LIFNode and IFNode, step mode 'm', tiny input [T=2, N, 3, 32, 32]):

* the report covers every conv, linear and spiking neuron: converted (a fused spiking layer, or a
  masked sign layer without a neuron, with the reason) or left alone with the reason;
* at prune_rate=0, in eval mode, the converted model's logits reproduce the SpikingJelly model
  whose converted layers carry alpha * sign(w) (alpha = mean |w|): the same predictions and a
  relative logit error <= 1e-3;
* ``to_spikingjelly`` gives back a plain SpikingJelly model with the same logits.

The VGGs' two 4096-wide dense classifier layers (100 M weights, 25088 inputs after a 7x7 average
pool) are swapped for 512 -> 64 -> 64 -> 10 layers of the same types in the same places, so that
the tests fit on 2 CPU cores; the convolutional part is the zoo's. Each family beyond its
smallest models is marked slow (``-m "not slow"`` keeps this file near two minutes).

The smallest depth of each family (VGG-11 with and without BN, spiking ResNet-18 and the wide
ResNet-50-2, SEW ResNet-18 with ADD, AND and IAND, MS-ResNet-18, Max-ResNet-18), with LIFNode and
with IFNode, takes one search step in training mode with dropout active, every converted spiking
layer fires in it (a SpikingJelly ``OutputMonitor``), and its ticket exported after the step and
loaded back with ``load_ticket(path, model=factory())`` gives the same eval logits, bit for bit
(``benchmarks/zoo_check.py``, which runs every depth).

A search step runs on every backend on a small model built from the zoo's own residual block
(``spiking_resnet.BasicBlock``): 7x7 stride-2 stem, 1x1 stride-2 shortcut, residual add.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_rel, binarised_copy, sj_modules
from test_kernel_sizes import BACKENDS
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo_check  # noqa: E402  (benchmarks/: the zoo run and its model builders)
import zoo_models  # noqa: E402

import binslt
from binslt.interop.convert import InputTap, SpikeStage, convert, to_spikingjelly

# SpikingJelly is imported when a test first uses it (skipped where it is not installed).
functional, layer, neuron = sj_modules("functional", "layer", "neuron")
ms_resnet, sew_resnet, spiking_resnet, spiking_vgg = sj_modules(
    "model.ms_resnet", "model.sew_resnet", "model.spiking_resnet", "model.spiking_vgg")
#: neuron kind -> the SpikingJelly neuron class's name
NEURONS = {"lif": "LIFNode", "if": "IFNode"}


def _vgg(name):
    return lambda n: zoo_models.shrunk_vgg(name, n)


def _resnet(name):
    return lambda n: getattr(spiking_resnet, name)(spiking_neuron=n, num_classes=10)


def _sew(name):
    return lambda n: getattr(sew_resnet, name)(spiking_neuron=n, cnf="ADD", num_classes=10)


def _ms(name):
    return lambda n: getattr(ms_resnet, name)(T=2, num_classes=10, spiking_neuron=n,
                                              **zoo_models.ms_neuron_kwargs(name, n))


# model -> (factory, whether every neuron fuses with its conv/linear)
ZOO = {
    "spiking_vgg11_bn": (_vgg("spiking_vgg11_bn"), True),
    "spiking_vgg11": (_vgg("spiking_vgg11"), True),
    "spiking_resnet18": (_resnet("spiking_resnet18"), True),
    "sew_resnet18": (_sew("sew_resnet18"), True),
    "ms_resnet18": (_ms("ms_resnet18"), False),
}
SLOW_ZOO = {
    **{f"spiking_vgg{d}{bn}": (_vgg(f"spiking_vgg{d}{bn}"), True)
       for d in (13, 16, 19) for bn in ("", "_bn")},
    "spiking_resnet34": (_resnet("spiking_resnet34"), True),
    "spiking_resnet50": (_resnet("spiking_resnet50"), True),
    "spiking_resnet101": (_resnet("spiking_resnet101"), True),
    "spiking_wide_resnet50_2": (_resnet("spiking_wide_resnet50_2"), True),
    "sew_resnet34": (_sew("sew_resnet34"), True),
    "sew_resnet50": (_sew("sew_resnet50"), True),
    "ms_resnet34": (_ms("ms_resnet34"), False),
    "max_resnet18": (_ms("max_resnet18"), False),
}
CASES = ([pytest.param(m, n, id=f"{m}-{n}") for m in ZOO for n in NEURONS]
         + [pytest.param(m, "lif", id=f"{m}-lif", marks=pytest.mark.slow) for m in SLOW_ZOO])


def build(name: str, nkind: str) -> nn.Module:
    factory, _ = {**ZOO, **SLOW_ZOO}[name]
    torch.manual_seed(7)
    m = factory(getattr(neuron, NEURONS[nkind]))
    functional.set_step_mode(m, "m")
    with torch.no_grad():  # non-trivial BN state and conv biases, so that carrying them is tested
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.6, 1.4)
                mod.bias.uniform_(-0.1, 0.5)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(-0.2, 0.4)
    return m.eval()


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(net)
    with torch.no_grad():
        y = net(x)
    functional.reset_net(net)
    return y.mean(0) if y.dim() == 3 else y  # [T, N, K] (mean over T) or already [N, K]


def check_report(net: nn.Module, report, all_fused: bool) -> None:
    layers = {p for p, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    neurons = {p for p, m in net.named_modules() if isinstance(m, neuron.BaseNode)}
    firsts = [c["paths"][0] for c in report.converted]
    assert len(firsts) == len(set(firsts))
    # every conv and linear is converted: a fused layer, or a masked sign layer with the reason
    assert set(firsts) == layers, sorted(layers ^ set(firsts))
    for c in report.converted:
        if c["new"] in ("BinConv2d", "BinLinear"):
            assert c["note"].startswith("no neuron fused: "), c
        else:
            assert c["new"] in ("BinSpikeConv2d", "BinSpikeLinear") and len(c["paths"]) >= 2
    fused = {p for c in report.converted for p in c["paths"][1:] if p in neurons}
    skipped = {s["path"]: s["reason"] for s in report.skipped}
    assert set(skipped) <= neurons and all(skipped.values())
    assert fused | set(skipped) == neurons  # every neuron: fused, or left with a reason
    if all_fused:
        assert not skipped, skipped
        # only 1x1 shortcuts without their own neuron and the logits layer stay neuron-free
        plain = [c for c in report.converted if c["new"] in ("BinConv2d", "BinLinear")]
        assert all(c["new"] == "BinLinear" or "downsample" in c["paths"][0] for c in plain), plain
    assert "converted" in str(report)


@pytest.mark.parametrize("name,nkind", CASES)
def test_zoo_model_converts_and_reproduces_sign_weight_logits(name, nkind):
    net = build(name, nkind)
    x_example = torch.rand(2, 1, 3, 32, 32)
    conv, report = convert(net, prune_rate=0.0, example_input=x_example, backend="torch")
    check_report(net, report, ZOO.get(name, SLOW_ZOO.get(name))[1])
    assert report.method == "recorded run"
    expected = binarised_copy(net, [c["paths"][0] for c in report.converted])
    torch.manual_seed(11)
    x = torch.rand(2, 2, 3, 32, 32)
    y_exp = logits(expected, x)
    y = logits(conv.eval(), x)
    assert y_exp.abs().max() > 0, "the reference's logits are all zero; the test says nothing"
    assert torch.equal(y.argmax(-1), y_exp.argmax(-1))
    assert_close_rel(y, y_exp, 1e-3, name)
    # back to SpikingJelly: only SJ / torch modules, the same logits
    back = to_spikingjelly(conv)
    assert not any(isinstance(m, (binslt.nn.layers._MaskedSignWeight, SpikeStage, InputTap))
                   for m in back.modules())
    assert_close_rel(logits(back, x), y_exp, 1e-3, f"{name} to_spikingjelly")


def test_resnext_groups_are_reported():
    """ResNeXt's grouped 3x3 convs have no binslt kernel: left dense with the reason; the rest
    converts."""
    net = spiking_resnet.spiking_resnext50_32x4d(spiking_neuron=neuron.LIFNode, num_classes=10)
    functional.set_step_mode(net, "m")
    _, report = convert(net, prune_rate=0.5, example_input=torch.rand(1, 1, 3, 32, 32),
                        backend="torch")
    grouped = [s for s in report.skipped if s["type"] == "Conv2d"]
    assert len(grouped) == 16 and all("groups=32" in s["reason"] for s in grouped)
    assert sum(c["new"] == "BinSpikeConv2d" for c in report.converted) == 1 + 16 * 2


# ---------------------------------------------------------------------------------------------
# The smallest depth of each family: a search step that fires everywhere, the ticket round trip
# ---------------------------------------------------------------------------------------------


SMALLEST = ["spiking_vgg11_bn", "spiking_vgg11", "spiking_resnet18", "sew_resnet18_ADD",
            "sew_resnet18_AND", "sew_resnet18_IAND", "ms_resnet18", "max_resnet18"]
#: heavier: marked slow with the other depths
SMALLEST_SLOW = ["spiking_wide_resnet50_2"]
STEP_CASES = [pytest.param(m, n, id=f"{m}-{n}", marks=pytest.mark.slow)
              for m in SMALLEST + SMALLEST_SLOW for n in NEURONS]


#: (model, neuron) -> whether SpikingJelly's own model, uncalibrated, leaves a neuron silent on the
#: example batch: SEW AND (the AND of sparse spikes empties the identity path), the PLIF net's
#: dense layers (no BN); spiking ResNet-18 fires as built and is left unchanged
CALIBRATION_CASES = {("sew_resnet18_AND", "lif"): True, ("plif_cifar10net", "lif"): True,
                     ("spiking_resnet18", "lif"): False}


@pytest.mark.parametrize("name,nkind", list(CALIBRATION_CASES),
                         ids=[f"{m}-{n}" for m, n in CALIBRATION_CASES])
def test_calibrated_zoo_model_fires_in_spikingjelly(name, nkind):
    """zoo_models.calibrate_firing on the unconverted SpikingJelly model: every neuron fires on
    the example batch afterwards (a SpikingJelly monitor, training mode), where it did not before
    it changed exactly the layers it reports; a model that fires is left as it was."""
    monitor = sj_modules("monitor")[0]
    _, factory, _ = zoo_check.zoo(2)[name]
    x = torch.rand(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def silent(m):
        m.train()
        mon = monitor.OutputMonitor(m, neuron.BaseNode)
        functional.reset_net(m)
        torch.manual_seed(0)
        with torch.no_grad():
            m(x)
        functional.reset_net(m)
        out = [p for p, s in zip(mon.monitored_layers, mon.records) if not s.any()]
        mon.remove_hooks()
        return out, len(mon.monitored_layers)

    plain, _ = zoo_check.build(factory, nkind)
    net, changes = zoo_check.build(factory, nkind, x=x)
    before, after = plain.state_dict(), net.state_dict()
    # the changed layers are the reported ones; the BN running statistics are left as they were
    changed = sorted({k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])})
    assert changed == sorted(c.split(":")[0] for c in changes), (changed, changes)
    assert bool(silent(plain)[0]) == CALIBRATION_CASES[name, nkind]
    still, n_neurons = silent(net)
    assert n_neurons >= 4 and not still, (still, changes)
    assert bool(changes) == CALIBRATION_CASES[name, nkind]


@pytest.mark.parametrize("name,nkind", STEP_CASES)
def test_zoo_search_step_fires_and_the_ticket_reloads(name, nkind, tmp_path):
    family, factory, smallest = zoo_check.zoo(2)[name]
    assert smallest
    row = zoo_check.check_model(name, factory, nkind, timesteps=2, batch=8,
                                ticket_dir=str(tmp_path))
    assert row["error"] == "", row["error"]
    assert row["step"] == "ok" and row["scores_changed"] > 0, row
    assert row["spiking_layers"] >= 7 and row["silent"] == "" and row["min_rate"] > 0, row
    assert row["fused"] == row["spiking_layers"]
    if name.startswith("sew_resnet18_ADD"):
        assert "spike-sum=" in row["kinds"], row["kinds"]
    if name == "spiking_vgg11_bn":
        assert "spike-dropout=" in row["kinds"], row["kinds"]
    assert row["equal"] is True and row["max_abs_diff"] == 0.0, row


# ---------------------------------------------------------------------------------------------
# A search step on every backend: a small model from the zoo's residual block
# ---------------------------------------------------------------------------------------------


class MiniResNet(nn.Module):
    """7x7 stride-2 stem + BN + neuron, one zoo ``BasicBlock`` with a 1x1 stride-2 shortcut,
    average pool, linear logits; SpikingJelly's own layers and forward idiom."""

    def __init__(self, spiking_neuron):
        super().__init__()
        self.conv1 = layer.Conv2d(3, 4, 7, stride=2, padding=3, bias=False)
        self.bn1 = layer.BatchNorm2d(4)
        self.sn1 = spiking_neuron()
        down = nn.Sequential(layer.Conv2d(4, 6, 1, stride=2, bias=False), layer.BatchNorm2d(6))
        self.block = spiking_resnet.BasicBlock(4, 6, stride=2, downsample=down,
                                               spiking_neuron=spiking_neuron)
        self.pool = layer.AdaptiveAvgPool2d((1, 1))
        self.fc = layer.Linear(6, 3)

    def forward(self, x):
        x = self.block(self.sn1(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 2))


@pytest.mark.parametrize("nkind", sorted(NEURONS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_search_step_on_every_backend(backend, device, nkind):
    torch.manual_seed(5)
    net = MiniResNet(getattr(neuron, NEURONS[nkind]))
    functional.set_step_mode(net, "m")
    x = torch.rand(2, 2, 3, 8, 8)
    conv, report = convert(net, prune_rate=0.5, example_input=x, backend=backend)
    assert [c["new"] for c in report.converted] == [
        "BinSpikeConv2d", "BinSpikeConv2d", "BinSpikeConv2d", "BinConv2d", "BinLinear"]
    assert report.converted[2]["residual"] and report.converted[2]["staged"]
    torch.manual_seed(5)
    ref, _ = convert(net, prune_rate=0.5, example_input=x, backend="torch")
    ref.load_state_dict(conv.state_dict())
    conv, ref = conv.to(device).train(), ref.to(device).train()
    xd = x.to(device)
    target = torch.tensor([0, 2], device=device)
    losses = []
    for m in (conv, ref):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        loss = nn.functional.cross_entropy(m(xd).mean(0), target)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        opt.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for (na, a), (_, b) in zip(conv.named_parameters(), ref.named_parameters()):
        assert_close_rel(a.detach(), b.detach(), 1e-4, na)


# ---------------------------------------------------------------------------------------------
# benchmarks/network.py --arch sj-resnet18
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_network_benchmark_sj_resnet18_quick(tmp_path):
    """The converted zoo ResNet-18 against the unconverted one: every mode runs, the ticket
    reproduces the exported network, the step changes the scores (no timing is judged)."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "network.py"), "--quick",
                        "--arch", "sj-resnet18", "--threads", "1", "--no-plot", "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("network_cpu-*.csv")
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    rows = list(csv.DictReader(lines))
    got = {(r["mode"], r["candidate"]) for r in rows}
    assert {("search", "sj-dense"), ("eval", "sj-dense"), ("eval", "sj-dense-compiled"),
            ("memory", "sj-dense"), ("memory", "sj-memopt")} <= got
    assert not any(c == "sj-biprop" for _, c in got)
    for row in rows:
        assert row["arch"] == "sj-resnet18"
        if row["candidate"] != "sj-dense-compiled":  # a compile failure is recorded, not fatal
            assert row["error"] == "", row
        if row["mode"] == "search":
            assert 0.0 < float(row["check"]) <= 1.0
        if row["mode"] == "eval" and row["candidate"].startswith("binslt-"):
            assert float(row["check"]) < 1e-4
        if row["mode"] == "memory":
            assert float(row["bytes"]) > 0
