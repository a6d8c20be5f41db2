"""binslt.energy: MAC counts against the paper's Table 2 and torch's FLOP counter, exact SOPs /
energy for hand-made spikes, eq. (7) on the model zoo, SpikingJelly layers, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from binslt import BinSpikeConv2d, BinSpikeLinear, models
from binslt.analysis import energy

E_MAC, E_SOP = 4.6, 0.9


def _torch_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per sample by PyTorch's own FLOP counter (2 FLOPs per MAC for conv / mm)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2 / x.shape[0]


def _by_name(rep: dict) -> dict:
    return {r["name"]: r for r in rep["layers"]}


# -- ANN totals (Table 2) ----------------------------------------------------------------------


def test_resnet19_ann_matches_table2():
    model = models.build("resnet19", "ann")
    x = torch.randn(1, 3, 32, 32)
    rep = energy.report(model, x)
    assert not rep["spiking"]
    assert all(r["input"] == "real" and r["timesteps"] == 1 and r["sops"] == 0
               for r in rep["layers"])
    # Paper: 2.223 G MACs, 10.225 mJ. The layout of docs/design.md gives 2.2165 G (-0.3 %).
    assert rep["total_macs_g"] == pytest.approx(2.223, rel=0.01)
    assert rep["total_ops_g"] == pytest.approx(rep["total_macs_g"], rel=1e-12)
    assert rep["total_energy_mj"] == pytest.approx(10.225, rel=0.01)
    assert rep["total_energy_mj"] == pytest.approx(E_MAC * rep["total_macs_g"], rel=1e-12)
    # Independent counts: torch's FLOP counter and binslt.models.count_macs.
    assert rep["total_macs_g"] * 1e9 == pytest.approx(_torch_macs(model, x), rel=1e-9)
    assert rep["total_macs_g"] * 1e9 == models.count_macs(model)
    # 1 x 1 shortcuts are counted as layers of their own.
    assert sum("shortcut" in r["name"] for r in rep["layers"]) == 3


def test_vgg11_ann_matches_table2():
    x = torch.randn(1, 3, 32, 32)
    model = models.build("vgg11", "ann")
    rep = energy.report(model, x)
    assert rep["total_macs_g"] == pytest.approx(0.209, rel=0.01)
    assert rep["total_energy_mj"] == pytest.approx(0.966, rel=0.01)
    assert rep["total_macs_g"] * 1e9 == pytest.approx(_torch_macs(model, x), rel=1e-9)


def test_bnn_costs_what_the_ann_costs():
    # BNN-BinAct: +-1 activations are not spikes, so it costs what the ANN costs (Table 2).
    x = torch.randn(2, 1, 8, 8)
    ann = energy.report(models.build("conv4", "ann", in_channels=1, input_size=8), x)
    bnn = energy.report(models.build("conv4", "bnn", in_channels=1, input_size=8), x)
    assert not bnn["spiking"]
    assert all(r["input"] == "real" and r["passes"] == 1 for r in bnn["layers"])
    assert bnn["layers"][1]["input_rate"] == 1.0  # signs are never 0
    assert bnn["total_ops_g"] == pytest.approx(ann["total_ops_g"], rel=1e-12)
    assert bnn["total_energy_mj"] == pytest.approx(ann["total_energy_mj"], rel=1e-12)


# -- hand-made spikes: exact SOPs and energy ----------------------------------------------------


class _Tiny(nn.Module):
    """Direct-encoded real-input BinSpikeConv2d -> BinSpikeConv2d on its spikes; separately a
    BinSpikeLinear fed a hand-made spike tensor of known rate."""

    def __init__(self, spikes: torch.Tensor, T: int):
        super().__init__()
        self.T = T
        self.conv1 = BinSpikeConv2d(2, 3, 3, padding=1, input="real", v_threshold=0.05)
        self.conv2 = BinSpikeConv2d(3, 4, 3, stride=2, padding=1)
        self.fc = BinSpikeLinear(spikes.shape[-1], 5)
        self.register_buffer("spikes", spikes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        s1 = self.conv1(x.unsqueeze(0).expand(self.T, *x.shape))
        self.seen.append(s1)
        self.conv2(s1)
        return self.fc(self.spikes[:, : x.shape[0]]).mean(0)


def test_hand_made_spikes_exact():
    T, N, F, H = 3, 2, 40, 6
    spikes = torch.zeros(T, N, F)
    spikes.view(-1)[torch.randperm(T * N * F)[:57]] = 1.0  # rate 57/240
    model = _Tiny(spikes, T)
    x = torch.randn(N, 2, H, H)
    rep = energy.report(model, x)
    assert rep["spiking"] and rep["samples"] == N
    c1, c2, fc = (_by_name(rep)[k] for k in ("conv1", "conv2", "fc"))

    # First layer: real input repeated over T -> its MACs once (eq. 7's FLOP^1), at 4.6 pJ.
    macs1 = 3 * H * H * (2 * 3 * 3)
    assert (c1["input"], c1["macs"], c1["timesteps"], c1["passes"]) == ("real", macs1, T, 1)
    assert c1["sops"] == 0 and c1["ops"] == macs1
    assert c1["energy_mj"] == pytest.approx(E_MAC * macs1 * 1e-9, rel=1e-12)

    # Second layer: spikes of conv1, rate measured independently from its output.
    rate2 = model.seen[0].double().mean().item()
    assert 0 < rate2 < 1
    macs2 = 4 * 3 * 3 * (3 * 3 * 3)
    assert (c2["input"], c2["macs"], c2["timesteps"]) == ("spike", macs2, T)
    assert c2["input_rate"] == pytest.approx(rate2, rel=1e-12)
    assert c2["sops"] == pytest.approx(rate2 * T * macs2, rel=1e-12)
    assert c2["energy_mj"] == pytest.approx(E_SOP * rate2 * T * macs2 * 1e-9, rel=1e-12)

    # Linear layer on the hand-made spikes: rate 57/240 exactly.
    macs3 = F * 5
    assert (fc["input"], fc["macs"], fc["timesteps"]) == ("spike", macs3, T)
    assert fc["input_rate"] == 57 / 240
    assert fc["sops"] == pytest.approx(57 / 240 * T * macs3, rel=1e-12)
    assert fc["sops"] == pytest.approx(57 * 5 / N, rel=1e-12)  # nonzero inputs x fan-out

    want_e = (E_MAC * macs1 + E_SOP * (rate2 * T * macs2 + 57 / 240 * T * macs3)) * 1e-9
    assert rep["total_energy_mj"] == pytest.approx(want_e, rel=1e-12)
    assert rep["total_ops_g"] * 1e9 == pytest.approx(macs1 + c2["sops"] + fc["sops"], rel=1e-12)
    assert rep["total_macs_g"] * 1e9 == macs1 + macs2 + macs3

    # Forced non-spiking accounting: every layer is MACs; conv2's input varies over time (T
    # passes), conv1's does not (1 pass).
    dense = _by_name(energy.report(model, x, spiking=False))
    assert dense["conv1"]["passes"] == 1 and dense["conv2"]["passes"] == T
    assert dense["conv2"]["energy_mj"] == pytest.approx(E_MAC * macs2 * T * 1e-9, rel=1e-12)

    # Custom energy constants scale linearly.
    rep2 = energy.report(model, x, e_mac_pj=1.0, e_sop_pj=2.0)
    assert rep2["total_energy_mj"] == pytest.approx(
        (macs1 + 2.0 * (c2["sops"] + fc["sops"])) * 1e-9, rel=1e-12)


def test_rates_average_over_batches():
    T, F = 2, 8
    spikes = torch.zeros(T, 3, F)
    spikes[0, 0, :4] = 1  # batch of 1 sees 4 of 16 -> the first sample only
    spikes[:, 1:, :] = 1
    model = _Tiny(spikes, T)
    # Batches of 1 and 2: the fc sees spikes[:, :1] (4 ones / 16) then spikes[:, :2] (4+16 / 32).
    rep = energy.report(model, [torch.randn(1, 2, 4, 4), (torch.randn(2, 2, 4, 4), None)])
    fc = _by_name(rep)["fc"]
    assert rep["samples"] == 3
    assert fc["input_rate"] == (4 + 20) / (16 + 32)
    assert fc["timesteps"] == T
    assert fc["sops"] == pytest.approx((4 + 20) * 5 / 3, rel=1e-12)
    # max_batches stops early.
    assert energy.report(model, [torch.randn(1, 2, 4, 4)] * 3, max_batches=2)["samples"] == 2


# -- the model zoo: eq. (7) -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["snn", "binwslt"])
def test_spiking_models_follow_eq7(variant):
    T = 3
    model = models.build("conv4", variant, in_channels=1, input_size=8, timesteps=T,
                         v_threshold=0.2)
    x = torch.randn(2, 1, 8, 8)
    rep = energy.report(model, x)
    layers = rep["layers"]
    assert rep["spiking"] and [r["timesteps"] for r in layers] == [T] * len(layers)
    first, rest = layers[0], layers[1:]
    assert first["input"] == "real" and first["passes"] == 1
    assert all(r["input"] == "spike" for r in rest)
    assert any(r["input_rate"] > 0 for r in rest)
    # Per-timestep dense MACs agree with binslt.models.layer_macs, layer by layer.
    assert {r["name"]: r["macs"] for r in layers} == models.layer_macs(model)
    e = E_MAC * first["macs"] + E_SOP * sum(r["input_rate"] * T * r["macs"] for r in rest)
    assert rep["total_energy_mj"] == pytest.approx(e * 1e-9, rel=1e-12)
    ops = first["macs"] + sum(r["input_rate"] * T * r["macs"] for r in rest)
    assert rep["total_ops_g"] == pytest.approx(ops / 1e9, rel=1e-12)
    json.dumps(rep)  # JSON-ready
    table = energy.format_table(rep)
    assert "total" in table.splitlines()[-1] and first["name"] in table


def test_layer_built_for_real_input_is_real():
    # binslt.models builds the FC after ResNet-19's global average pool (spike averages) with
    # input='real': it is a real-input layer even when what it saw happens to be 0/1.
    T = 2
    fc = BinSpikeLinear(6, 3, input="real")
    sp = BinSpikeLinear(6, 3)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sp = fc, sp

        def forward(self, x):
            s = (x > 0).float().unsqueeze(0).repeat(T, 1, 1)
            s[1] = 1 - s[1]  # differs over time: T passes
            return self.fc(s) + self.sp(s)

    x = torch.randn(4, 6)
    rep = _by_name(energy.report(Two(), x))
    assert rep["fc"]["input"] == "real" and rep["fc"]["passes"] == T
    assert rep["fc"]["energy_mj"] == pytest.approx(E_MAC * 18 * T * 1e-9, rel=1e-12)
    assert rep["sp"]["input"] == "spike" and rep["sp"]["input_rate"] == 0.5
    assert rep["sp"]["energy_mj"] == pytest.approx(E_SOP * 0.5 * T * 18 * 1e-9, rel=1e-12)


def test_spikingjelly_layers():
    from spikingjelly.activation_based import functional, layer, neuron

    T = 4
    lif = neuron.LIFNode(v_threshold=0.3)
    net = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), lif, layer.Flatten(),
                        layer.Linear(4 * 5 * 5, 3))
    functional.set_step_mode(net, "m")
    outs = []
    lif.register_forward_hook(lambda m, i, o: outs.append(o.detach()))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)

    model = Wrap()
    rep = energy.report(model, torch.randn(2, 1, 5, 5))
    conv, fc = rep["layers"]
    assert rep["spiking"]
    assert (conv["input"], conv["timesteps"], conv["passes"]) == ("real", T, 1)
    assert conv["macs"] == 4 * 25 * 9
    rate = outs[0].double().mean().item()
    assert fc["input"] == "spike" and fc["input_rate"] == pytest.approx(rate, rel=1e-12)
    assert fc["sops"] == pytest.approx(rate * T * 100 * 3, rel=1e-12)


def test_dead_ann_layer_is_still_real():
    # An ANN layer whose input happens to be all zeros (binary!) is not a spike layer.
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    rep = energy.report(model, torch.randn(3, 4))
    assert not rep["spiking"]
    assert [r["input"] for r in rep["layers"]] == ["real", "real"]
    assert rep["layers"][1]["input_rate"] == 0.0
    assert rep["total_energy_mj"] == pytest.approx(E_MAC * (24 + 12) * 1e-9, rel=1e-12)


def test_last_hidden_activations():
    T = 3
    snn = models.build("conv4", "snn", in_channels=1, input_size=8, timesteps=T,
                       v_threshold=0.2)
    x = torch.randn(5, 1, 8, 8)
    captured = []
    h = snn.classifier.layer.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    acts = energy.last_hidden_activations(snn, x)
    h.remove()
    assert acts.shape == (5, 256)
    assert torch.equal(acts, captured[0].sum(0))  # spike counts over T
    assert acts.min() >= 0 and acts.max() <= T and torch.equal(acts, acts.round())
    bnn = energy.last_hidden_activations(models.build("conv4", "bnn", in_channels=1,
                                                      input_size=8), x)
    assert set(bnn.unique().tolist()) <= {-1.0, 1.0}


def test_bad_input():
    with pytest.raises(ValueError, match="no Conv/Linear"):
        energy.report(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="tensor"):
        energy.report(lin, [[1, 2, 3]])
    with pytest.raises(TypeError, match="nn.Module"):
        energy.report(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="e_sop_pj"):
        energy.report(lin, torch.randn(2, 3), e_sop_pj=-1.0)
    with pytest.raises(ValueError, match="max_batches"):
        energy.report(lin, torch.randn(2, 3), max_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        energy.report(lin, [])
    with pytest.raises(TypeError, match="floating point"):
        energy.report(lin, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="none of its Conv/Linear"):
        energy.report(_Unused(), torch.randn(2, 3))


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return x


# -- CLI ---------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from binslt import cli

    return cli.main(argv)


def _tiny_run(tmp_path, variant: str):
    """A run directory as a finished run leaves it for `binslt energy`: the packed ticket and
    results.json with the run config (the dataset the firing rates are measured on)."""
    from binslt.io import artifacts
    from binslt.training import loop as train

    torch.manual_seed(0)
    model = models.build("conv4", variant, in_channels=1, input_size=8, num_classes=10,
                         timesteps=2)
    cfg = train.RunConfig(method=variant, arch="conv4", dataset="digits", timesteps=2)
    out = tmp_path / variant
    out.mkdir()
    train.save_ticket(model, out)
    artifacts.atomic_write_json({"config": cfg.to_dict()}, out / "results.json")
    return out, model


def test_cli_energy_and_plots(tmp_path, capsys):
    from binslt.training import data

    run_dir, model = _tiny_run(tmp_path, "binwslt")
    js = tmp_path / "e.json"
    rc = _cli(["energy", str(run_dir), "--batches", "1", "--batch-size", "8", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "total" in out and "BinSpikeConv2d" in out and "energy (mJ)" in out
    rep = json.loads(js.read_text())
    assert rep["dataset"] == "digits" and rep["samples"] == 8
    # Same numbers as the API on the same 8 test images.
    images = torch.stack([data.load("digits").test[i][0] for i in range(8)])
    want = energy.report(model, images)
    assert rep["total_energy_mj"] == pytest.approx(want["total_energy_mj"], rel=1e-9)
    assert [r["input_rate"] for r in rep["layers"]] == pytest.approx(
        [r["input_rate"] for r in want["layers"]], rel=1e-9)

    # Plots from an ANN and an SNN run (a searched ticket works the same way, only slower).
    ann_dir, _ = _tiny_run(tmp_path, "ann")
    snn_dir, _ = _tiny_run(tmp_path, "snn")
    png = tmp_path / "plots" / "energy.png"
    rc = _cli(["plot", "energy", "--runs", str(ann_dir), str(snn_dir), "--batches", "1",
               "--batch-size", "8", "-o", str(png), "--dpi", "40"])
    out = capsys.readouterr().out
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ANN" in out and "SNN" in out and "normalised 1.0000" in out
    # the runs as positional sources, as `binslt energy SRC` takes them: the same lines
    rc = _cli(["plot", "energy", str(ann_dir), str(snn_dir), "--batches", "1",
               "--batch-size", "8", "-o", str(png), "--dpi", "40"])
    assert rc == 0 and capsys.readouterr().out == out

    png2 = tmp_path / "act.png"
    rc = _cli(["plot", "activations", "--runs", str(ann_dir), str(snn_dir), "--num-inputs", "2",
               "-o", str(png2), "--dpi", "40"])
    assert rc == 0 and png2.read_bytes()[:4] == b"\x89PNG"
    assert "(2, 256)" in capsys.readouterr().out


def test_cli_fresh_model_and_errors(tmp_path, capsys):
    rc = _cli(["energy", "--arch", "conv4", "--method", "ann", "--dataset", "random",
               "--batches", "1", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    total = [ln for ln in out.splitlines() if ln.startswith("total")][0]
    want = models.count_macs(models.build("conv4", "ann")) / 1e9  # 0.0983 G, docs/design.md
    assert math.isclose(float(total.split()[1]), want, abs_tol=1e-6)
    rc = _cli(["energy", str(tmp_path / "missing")])
    assert rc != 0 and "no such run directory" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert _cli(["energy", str(bad)]) != 0
    assert "corrupt" in capsys.readouterr().err
