"""NIR export / import of binslt tickets (binslt.nir), and other frameworks running them."""

from __future__ import annotations

import builtins
import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir", reason="the binslt[nir] extra is not installed")

from binslt import BinSpikeConv2d, BinSpikeLinear, SpikeMaxPool2d, models  # noqa: E402
from binslt.interop import nir as bnir  # noqa: E402
from binslt.io.tickets import export_ticket  # noqa: E402


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics = those of one batch (momentum None), so that every layer
    of an untrained network fires at a normal rate; eval mode after."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def binslt_spikes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(logits, {NIR neuron node name: spikes}) of a binslt model. A layer with a fused pool
    (BinSpikeConv2d(pool=2)) outputs its neuron's spikes after the pool."""
    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (BinSpikeConv2d, BinSpikeLinear)):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, o, n=name: out.__setitem__(f"{n}.lif", o)))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, out


def small(arch: str, *, decay_input: bool = False, cin: int = 1, size: int = 8, T: int = 2,
          seed: int = 0, calib: int = 32, neuron_kind: str = "lif", **kw) -> nn.Module:
    torch.manual_seed(seed)
    neuron = dict(decay_input=decay_input) if neuron_kind == "lif" else dict(neuron="if")
    if decay_input:  # the paper's tau=100 barely charges in a few steps with decayed input
        neuron["tau"] = 2.0
    m = models.build(arch, "binwslt", in_channels=cin, input_size=size, timesteps=T,
                     **neuron, **kw)
    # frozen first: the top-|s| selection runs once per layer, not again for the calibration
    models.set_mode(m, "frozen")
    return calibrate(m, torch.randn(calib, cin, size, size))


def check_round_trip(model, path, x, maxpool="threshold"):
    bnir.write_nir(bnir.to_nir(model, maxpool=maxpool), path)
    net = bnir.from_nir(path)
    logits, spikes = binslt_spikes(model, x)
    with torch.no_grad():
        got = net(x, record=True)
    assert set(spikes) <= set(net.spikes), sorted(set(spikes) - set(net.spikes))
    pools = {f"{n}.lif": m.pool for n, m in model.named_modules()
             if isinstance(m, BinSpikeConv2d) and m.pool > 1}
    for name, s in spikes.items():
        theirs = net.spikes[name]
        if name in pools:  # the fused pool's output: the NIR neuron's spikes, max-pooled
            theirs = SpikeMaxPool2d(pools[name])(theirs)
        assert torch.equal(theirs, s), f"spikes of {name} differ"
        # a silent layer would make the comparison vacuous
        assert float(s.mean()) > 0.005, f"{name} hardly fires ({float(s.mean()):.4f})"
    # from_nir rebuilds the same frozen layers with the exported gains and BN statistics, so
    # the logits are the same float computation: bit-identical, not just close
    assert torch.equal(got, logits)
    assert bool((logits != 0).any())
    return net


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay_input", [False, True], ids=["paper-lif", "decay-input-lif"])
@pytest.mark.parametrize("maxpool", ["threshold", "lif"])
def test_round_trip_conv4(tmp_path, decay_input, maxpool):
    m = small("conv4", decay_input=decay_input)
    net = check_round_trip(m, tmp_path / "c4.nir", torch.randn(6, 1, 8, 8), maxpool)
    kinds = {type(u).__name__ for u in net.units.values()}
    assert "_SpikeOr" in kinds  # the max-pool is read back as binslt's spike max-pool
    layers = [u.layer for u in net.units.values() if hasattr(u, "layer")]
    assert layers and all(getattr(lay, "mode", "frozen") == "frozen" for lay in layers)


@pytest.mark.parametrize("decay_input", [False, True], ids=["paper-lif", "decay-input-lif"])
def test_round_trip_resnet19(tmp_path, decay_input):
    m = small("resnet19", decay_input=decay_input, cin=3, size=8, calib=8)
    net = check_round_trip(m, tmp_path / "r19.nir", torch.randn(3, 3, 8, 8))
    g = nir.read(tmp_path / "r19.nir")
    # residual adds are edges: conv2's neuron sums its conv and the shortcut (identity: the
    # block input's spikes; projection: the 1x1 conv + BN)
    into = lambda n: sorted(a for a, b in g.edges if b == n)  # noqa: E731
    assert into("features.1.conv2.lif") == ["features.1.conv2", "features.1.shortcut"]
    assert into("features.2.conv2.lif") == ["features.1.conv2.lif", "features.2.conv2"]
    pool = g.nodes["features.9.avgpool"]
    assert isinstance(pool, nir.AvgPool2d) and list(pool.kernel_size) == [2, 2]
    assert any(type(u).__name__ == "_BinConvSeq" for u in net.units.values())


def test_round_trip_from_ticket_file_and_metadata(tmp_path):
    m = small("conv4", prune_rate=0.7)
    export_ticket(m, tmp_path / "t.safetensors")
    g = bnir.to_nir(tmp_path / "t.safetensors")
    meta = g.metadata
    assert meta["format"] == "binslt-nir" and meta["arch"] == "conv4"
    assert meta["variant"] == "binwslt" and meta["timesteps"] == 2
    assert math.isclose(meta["prune_rate"], 0.7)
    from binslt import __version__

    assert meta["binslt_version"] == __version__
    alphas = json.loads(meta["alpha"])
    frozen = models.set_mode(m, "frozen")
    want = {n: float(mod.packed_weight()[2][0]) for n, mod in frozen.named_modules()
            if hasattr(mod, "packed_weight")}
    assert alphas == pytest.approx(want, rel=0, abs=0)
    node = g.nodes["features.2"]
    rec = json.loads(node.metadata["binslt"])
    assert rec["alpha"][0] == want["features.2"] and rec["prune_rate"] == 0.7
    # conv weights are alpha * sign(w) * M times the folded BN scale, bias = the BN shift
    layer = frozen.features[2]
    scale = torch.rsqrt(layer.bn.running_var + layer.bn.eps)
    w = layer.effective_weight() * scale.view(-1, 1, 1, 1)
    np.testing.assert_array_equal(node.weight, w.numpy())
    np.testing.assert_array_equal(node.bias, (-layer.bn.running_mean * scale).numpy())
    bnir.write_nir(g, tmp_path / "t.nir")
    assert nir.read(tmp_path / "t.nir").metadata["alpha"] == meta["alpha"]


def test_foreign_reading_of_binslt_weights_within_float_tolerance(tmp_path):
    """Without binslt's metadata, from_nir sees only the folded weights: per channel a gain
    g = alpha * bn_scale times {-1, 0, +1}. It rebuilds frozen layers with per-channel gain g
    and the BN shift. The spiking result is the same real-valued function, computed with the
    BN scale applied in another order: a few float32 ulps of the currents (relative 1e-6),
    so logits agree to 1e-5 relative and predictions are the same."""
    m = small("conv4")
    g = bnir.to_nir(m)
    for node in g.nodes.values():
        node.metadata = {}
    g.metadata = {}
    net = bnir.from_nir(g, timesteps=2)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        want = m(x)
        seq = net(x)  # foreign graphs return the output sequence [T, N, classes]
    got = seq.mean(0)
    assert seq.shape == (2, 16, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))
    bins = [u.layer for u in net.units.values() if hasattr(u, "layer")]
    assert bins and all(lay.mode == "frozen" for lay in bins)  # packed masked sign layers


# ---------------------------------------------------------------------------------------------
# What NIR cannot represent
# ---------------------------------------------------------------------------------------------


def test_search_mode_model_exports_unchanged():
    m = models.build("conv4", "binwslt", in_channels=1, input_size=8, timesteps=2)
    g = bnir.to_nir(m)
    assert m.training and {mod.mode for mod in m.modules() if hasattr(mod, "mode")} == {"search"}
    net = bnir.from_nir(g)
    x = torch.randn(2, 1, 8, 8)
    m.eval()
    with torch.no_grad():
        assert torch.equal(net(x), m(x))


def test_soft_reset_is_refused_naming_the_layer():
    m = models.build("conv4", "binwslt", in_channels=1, input_size=8, v_reset=None)
    with pytest.raises(bnir.NIRError, match=r"layer 'features\.0'.*soft reset"):
        bnir.to_nir(m)


def test_nonzero_reset_and_non_spiking_variants_are_refused():
    m = models.build("conv4", "binwslt", in_channels=1, input_size=8, v_reset=-0.5)
    with pytest.raises(bnir.NIRError, match=r"layer 'features\.0'.*v_reset=-0\.5"):
        bnir.to_nir(m)
    with pytest.raises(bnir.NIRError, match="variant 'bnn'"):
        bnir.to_nir(models.build("conv4", "bnn", in_channels=1, input_size=8))
    with pytest.raises(bnir.NIRError, match="maxpool"):
        bnir.to_nir(small("conv4"), maxpool="approx")


def test_missing_nir_package_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "nir" or name.startswith("nir."):
            raise ImportError("No module named 'nir'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "nir", None)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(bnir.NIRDependencyError, match=r"pip install 'binslt\[nir\]'") as e:
        bnir.to_nir(models.build("conv4", "binwslt", in_channels=1, input_size=8))
    assert isinstance(e.value, ImportError)
    with pytest.raises(ImportError, match=r"binslt\[nir\]"):
        bnir.from_nir("x.nir")


# ---------------------------------------------------------------------------------------------
# Bad files and graphs binslt cannot read
# ---------------------------------------------------------------------------------------------


def test_bad_files_give_one_clear_error(tmp_path):
    m = small("conv4")
    good = bnir.write_nir(m, tmp_path / "good.nir")
    with pytest.raises(bnir.NIRError, match=r"'.*missing\.nir': no such NIR file"):
        bnir.from_nir(tmp_path / "missing.nir")
    junk = tmp_path / "junk.nir"
    junk.write_bytes(b"not a nir file at all")
    with pytest.raises(bnir.NIRError, match=r"junk\.nir' is not a NIR file"):
        bnir.from_nir(junk)
    data = good.read_bytes()
    cut = tmp_path / "cut.nir"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(bnir.NIRError, match=r"cut\.nir' is corrupt or truncated"):
        bnir.from_nir(cut)
    flipped = bytearray(data)
    flipped[len(data) // 3: len(data) // 3 + 4096] = b"\xff" * 4096
    bad = tmp_path / "flipped.nir"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(bnir.NIRError, match=r"flipped\.nir' is corrupt or truncated"):
        bnir.from_nir(bad)
    # weights that no longer match the binslt metadata (gain, BN statistics) are refused
    g = bnir.to_nir(m)
    g.nodes["features.2"].weight = g.nodes["features.2"].weight * 2
    with pytest.raises(bnir.NIRError, match=r"node 'features\.2' \(Conv2d\).*does not match"):
        bnir.from_nir(g)


def test_unreadable_nodes_are_named(tmp_path):
    shape = np.array([4])
    g = nir.NIRGraph(nodes={
        "input": nir.Input(input_type={"input": shape}),
        "syn": nir.Affine(weight=np.eye(4, dtype=np.float32), bias=np.zeros(4, np.float32)),
        "cuba": nir.CubaLIF(tau_syn=np.full(4, 2e-4), tau_mem=np.full(4, 2e-4), r=np.ones(4),
                            v_leak=np.zeros(4), v_threshold=np.ones(4)),
        "output": nir.Output(output_type={"output": shape}),
    }, edges=[("input", "syn"), ("syn", "cuba"), ("cuba", "output")])
    path = tmp_path / "cuba.nir"
    nir.write(path, g)
    with pytest.raises(bnir.NIRError, match=r"cuba\.nir'.*node 'cuba' \(CubaLIF\)"):
        bnir.from_nir(path)
    g.nodes["cuba"] = nir.LIF(tau=np.full(4, 2e-4), r=np.ones(4), v_leak=np.zeros(4),
                              v_threshold=np.array([1.0, 1.0, 2.0, 1.0]))
    nir.write(path, g)
    with pytest.raises(bnir.NIRError, match=r"node 'cuba' \(LIF\): v_threshold differs"):
        bnir.from_nir(path)
    g.edges.append(("cuba", "syn"))
    with pytest.raises(bnir.NIRError, match="cycle"):
        bnir.from_nir(g)


# ---------------------------------------------------------------------------------------------
# SpikingJelly: its exporter's files, and its importer on binslt files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("maxpool", ["threshold", "lif"])
def test_round_trip_conv4_if(tmp_path, maxpool):
    """IF layers (neuron='if') export as NIR IF nodes (r = 1/dt) and read back as IF layers."""
    m = small("conv4", neuron_kind="if")
    net = check_round_trip(m, tmp_path / "c4if.nir", torch.randn(6, 1, 8, 8), maxpool)
    g = nir.read(tmp_path / "c4if.nir")
    ifs = [k for k, v in g.nodes.items() if isinstance(v, nir.IF)]
    lifs = [k for k, v in g.nodes.items() if isinstance(v, nir.LIF)]
    n_layers = sum(isinstance(x, (BinSpikeConv2d, BinSpikeLinear)) for x in m.modules())
    n_pools = sum(type(x).__name__ == "SpikeMaxPool2d" or getattr(x, "pool", 1) == 2
                  for x in m.modules())  # separate, or fused into the layer (pool=2)
    assert n_pools and len(ifs) == n_layers  # only the 'lif' max-pool form writes LIF nodes
    assert len(lifs) == (n_pools if maxpool == "lif" else 0)
    node = g.nodes[ifs[0]]
    assert np.all(node.r == np.float32(1.0 / bnir.DEFAULT_DT)) and np.all(node.v_reset == 0)
    assert json.loads(node.metadata["binslt"])["neuron"]["neuron"] == "if"
    layers = [u.layer for u in net.units.values() if hasattr(u, "layer")]
    spiking = [lay for lay in layers if isinstance(lay, (BinSpikeConv2d, BinSpikeLinear))]
    assert spiking and all(lay.neuron.neuron == "if" for lay in spiking)


def test_round_trip_resnet19_if(tmp_path):
    m = small("resnet19", neuron_kind="if", cin=3, size=8, calib=8)
    net = check_round_trip(m, tmp_path / "r19if.nir", torch.randn(3, 3, 8, 8))
    g = nir.read(tmp_path / "r19if.nir")
    assert not any(isinstance(v, nir.LIF) for v in g.nodes.values())
    assert isinstance(g.nodes["features.1.conv2.lif"], nir.IF)
    into = lambda n: sorted(a for a, b in g.edges if b == n)  # noqa: E731
    assert into("features.1.conv2.lif") == ["features.1.conv2", "features.1.shortcut"]
    assert any(type(u).__name__ == "_BinConvSeq" for u in net.units.values())


def test_reads_spikingjelly_export_with_lif_and_if(tmp_path):
    sj = pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1, bias=False), neuron.LIFNode(tau=2.0, decay_input=True),
        layer.Conv2d(8, 8, 3, padding=1), neuron.LIFNode(tau=4.0, decay_input=False),
        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, 10), neuron.IFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():  # make every layer fire
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.mul_(3.0)
    assert sj is not None
    xs = (torch.rand(4, 3, 1, 8, 8) > 0.5).float()
    path = tmp_path / "sj.nir"
    export_to_nir(net, xs, save_path=path)
    ours = bnir.from_nir(path)
    with torch.no_grad():
        functional.reset_net(net)
        want = net(xs)
        got = ours(xs, record=True)
    assert torch.equal(got, want)
    assert len(ours.spikes) == 3
    for name, s in ours.spikes.items():  # every neuron layer fires: the comparison is not vacuous
        assert float(s.mean()) > 0.005, name
    kinds = sorted(type(u).__name__ for u in ours.units.values())
    assert kinds.count("_DenseSpiking") == 3  # dense float weights stay dense layers


def test_spikingjelly_imports_binslt_resnet19_cifar_shaped():
    """SpikingJelly's import_from_nir reads every node of a ResNet-19 ticket (Conv2d, Affine,
    Linear, LIF, AvgPool2d, Flatten; residuals as summed edges) and gives the same logits."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    m = small("resnet19", cin=3, size=32, T=2, calib=2)
    sj = import_from_nir(bnir.to_nir(m), step_mode="m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
        out, _state = sj(x.unsqueeze(0).expand(2, *x.shape).contiguous())
    got = out.mean(0)
    # SpikingJelly's LIF gets tau = tau_nir / dt (100 up to one rounding) and its own float
    # order; the logits agree to float32 rounding and the predictions are the same
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert bool((want != 0).any())


def test_spikingjelly_imports_binslt_resnet19_with_if_neurons():
    """SpikingJelly's import_from_nir maps binslt's IF nodes (r = 1/dt) to its IFNode: the
    same logits as the binslt IF ticket."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import neuron
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    m = small("resnet19", neuron_kind="if", cin=3, size=32, T=2, calib=2, seed=1)
    sj = import_from_nir(bnir.to_nir(m), step_mode="m")
    assert any(isinstance(mod, neuron.IFNode) for mod in sj.modules())
    assert not any(isinstance(mod, neuron.LIFNode) for mod in sj.modules())
    x = torch.randn(2, 3, 32, 32)
    # In float64 on both sides (binslt's pure-torch reference, SpikingJelly's dense layers), so
    # that no neuron sits within rounding of its threshold: in float32 SpikingJelly's dense convs
    # round H differently from binslt's count * gain, and a flip cascades through 19 layers (it
    # did on one seed and one machine and not on another). The IF arithmetic is the same, so the
    # logits agree to float64 rounding.
    with torch.no_grad():
        want = models.set_backend(copy.deepcopy(m), "torch").double()(x.double())
        out, _state = sj.double()(x.double().unsqueeze(0).expand(2, *x.shape).contiguous())
    torch.testing.assert_close(out.mean(0), want, rtol=1e-9, atol=1e-10)
    assert bool((want != 0).any())


def test_spikingjelly_cannot_import_max_pooling_and_says_why():
    """A 2x2 max of spikes has no NIR node. binslt writes it exactly as
    Threshold(SumPool2d(x), 0.5) or as AvgPool2d into a LIF with tau = dt (memoryless under
    forward Euler). SpikingJelly 2.0's importer has no SumPool2d / Threshold mapping, and it
    requires tau / dt > 1 for LIF nodes, so neither form of Conv-4 loads there."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    m = small("conv4")
    with pytest.raises(ValueError, match="Unknown node type.*(Threshold|SumPool2d)"):
        import_from_nir(bnir.to_nir(m, maxpool="threshold"))
    with pytest.raises(ValueError, match=r"tau / dt must be finite and greater than 1"):
        import_from_nir(bnir.to_nir(m, maxpool="lif"))


# ---------------------------------------------------------------------------------------------
# snnTorch runs the digits ticket
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_ticket():
    """A Conv-4 ticket searched for one short epoch on scikit-learn digits (the paper's
    neuron): enough for well-above-chance predictions to compare."""
    from binslt.training import data

    torch.manual_seed(0)
    bundle = data.load("digits")
    xtr, ytr = bundle.train.tensors
    m = models.build("conv4", "binwslt", in_channels=1, input_size=8, timesteps=4)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    m.train()
    for _epoch in range(1):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 128):
            idx = perm[i: i + 128]
            loss = nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    models.set_mode(m, "frozen")
    return m, bundle.test.tensors


def test_snntorch_runs_the_digits_ticket(tmp_path, digits_ticket):
    """snnTorch's import_from_nir reads the 'lif' max-pool form (AvgPool2d, LIF with tau = dt:
    beta = 0, a memoryless threshold) and the paper's LIF (r = tau: snnTorch's weight scale
    r * dt / tau is 1 and beta = 1 - 1/tau). Two adjustments, both snnTorch's and named here:
    its importer maps NIR's Flatten(start_dim=0), whose dims exclude the batch, to
    torch.nn.Flatten(0), which would flatten the batch too, so the test sets start_dim=1; and
    it runs one time step per call, so the test feeds the image T times and averages."""
    pytest.importorskip("snntorch")
    from snntorch import utils as su
    from snntorch.import_nir import import_from_nir

    m, (xte, yte) = digits_ticket
    path = bnir.write_nir(m, tmp_path / "digits.nir", maxpool="lif")
    net = import_from_nir(nir.read(path))
    flat = [mod for mod in net.modules() if isinstance(mod, nn.Flatten)]
    assert [f.start_dim for f in flat] == [0]
    flat[0].start_dim = 1
    with torch.no_grad():
        want = m(xte)
        su.reset(net)
        got = torch.stack([net(xte)[0] for _ in range(m.timesteps)]).mean(0)
    acc = float((want.argmax(1) == yte).float().mean())
    assert acc > 0.4, f"the ticket only reaches {acc:.2%} (chance: 10%); the comparison needs one"
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the binslt reader gives the same predictions from the same file
    ours = bnir.from_nir(path)
    with torch.no_grad():
        assert torch.equal(ours(xte), want)


def test_snntorch_cannot_import_if_nodes_and_says_why():
    """snnTorch 1.0's importer reads a NIR IF node only with r == 1 (it asserts "r != 1 not
    supported") and then builds snn.Leaky(beta=0.9), a leaky neuron. NIR's IF with forward
    Euler is V += R dt X, so H = V + X needs R = 1/dt (SpikingJelly's exporter writes the
    same): binslt's IF files do not load in snnTorch, and no r would give its neuron no leak."""
    pytest.importorskip("snntorch")
    from snntorch.import_nir import import_from_nir

    m = small("conv4", neuron_kind="if")
    with pytest.raises(AssertionError, match="r != 1 not supported"):
        import_from_nir(bnir.to_nir(m, maxpool="lif"))


def test_snntorch_cannot_import_the_exact_threshold_form(digits_ticket):
    """snnTorch 1.0's importer maps Affine, Linear, Conv2d, Flatten, AvgPool2d, IF, LIF and
    CubaLIF: not SumPool2d and not Threshold, the exact max-pool form."""
    pytest.importorskip("snntorch")
    from snntorch.import_nir import import_from_nir

    with pytest.raises(ValueError, match="Unknown node type.*(SumPool2d|Threshold)"):
        import_from_nir(bnir.to_nir(digits_ticket[0], maxpool="threshold"))


# ---------------------------------------------------------------------------------------------
# Command-line entry points
# ---------------------------------------------------------------------------------------------


def test_export_cli_and_eval_nir_file(tmp_path, digits_ticket):
    from binslt.training import loop as train

    m, (xte, yte) = digits_ticket
    run = tmp_path / "run"
    run.mkdir()
    train.save_ticket(m, run)  # a run directory as `binslt search` leaves it
    line = bnir.export_cli(run)
    out = run / "ticket.nir"
    assert out.is_file() and str(out) in line and "conv4/binwslt" in line
    res = bnir.eval_nir_file(out, "digits")
    with torch.no_grad():
        want = int((m(xte).argmax(1) == yte).sum())
    assert res["examples"] == len(yte) and res["correct"] == want
    assert res["accuracy"] == pytest.approx(100.0 * want / len(yte))
    with pytest.raises(bnir.NIRError, match="no such NIR file"):
        bnir.eval_nir_file(tmp_path / "none.nir")


def test_cli_export_format_nir_and_eval_nir(tmp_path, digits_ticket, capsys):
    """`binslt export RUN --format nir` and `binslt eval FILE.nir` from the command line; a
    truncated .nir file is one line naming the file, exit 2."""
    from binslt import cli
    from binslt.training import loop as train

    m, (xte, yte) = digits_ticket
    run = tmp_path / "run"
    run.mkdir()
    train.save_ticket(m, run)
    assert cli.main(["export", str(run), "--format", "nir"]) == 0
    out = run / "ticket.nir"
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert cli.main(["eval", str(out), "--data", "digits", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        want = int((m(xte).argmax(1) == yte).sum())
    assert res["examples"] == len(yte) and res["correct"] == want
    cut = tmp_path / "cut.nir"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    assert cli.main(["eval", str(cut), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.nir" in err[0] and err[0].startswith("binslt eval: error:")
