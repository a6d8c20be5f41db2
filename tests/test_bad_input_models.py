"""Bad numbers, failing models and SpikingJelly's tools on binslt models.

- NaN / inf in scores, weights or BN statistics is an error naming the layer and the parameter
  (the kernels find it in the passes that read the data; the reference likewise).
- A loss that turns NaN stops a run with one line naming the epoch and step; the checkpoint of
  the last finished epoch is kept.
- A model failing inside a ``binslt search --model`` run is one line and exit status 2;
  ``--debug`` shows the traceback.
- ``functional.set_step_mode(net, 's')`` on a binslt layer is an error.
- SpikingJelly's monitors and op counters see binslt models (binslt.interop.sj_tools).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers import small_resnet19_eval
from spikingjelly.activation_based import functional, layer, monitor, neuron
from spikingjelly.activation_based.op_counter import (
    ACCounter,
    DispatchCounterMode,
    MACCounter,
    SynOpCounter,
)
from torch import nn

import binslt
from binslt import cli
from binslt.interop.convert import convert
from binslt.interop.sj_tools import SPIKING_LAYERS, spikingjelly_op_rules, store_v_seq
from binslt.nn.layers import (
    LIF,
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    NonFiniteError,
    SpikeMaxPool2d,
    name_layers,
)
from binslt.ops import reference as ref
from binslt.training import loop as train

BACKENDS = ("cpu", "torch")


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(BinSpikeConv2d(2, 8, 3, padding=1, input="real", bn=True),
                        BinSpikeConv2d(8, 8, 3, padding=1, bn=True), nn.Flatten(2),
                        BinSpikeLinear(8 * 4 * 4, 6, bn=True), BinLinear(6, 3))
    return name_layers(net)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Bad numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", [1, 3, 4])
def test_nan_scores_are_an_error_naming_the_layer(backend, where):
    net = _net()
    m = net[where]
    with torch.no_grad():
        m.scores.view(-1)[[2, 5]] = float("nan")
    want = (rf"^{type(m).__name__} {where}: scores contain NaN \(2 of {m.scores.numel()}\); "
            "the values diverged")
    with binslt.use_backend(backend):
        with pytest.raises(NonFiniteError, match=want):
            net(_x())  # today's bug: a mask of 35 of 72 and a finite loss
        with pytest.raises(NonFiniteError, match=want):
            m.current_mask()
        with torch.no_grad(), pytest.raises(NonFiniteError, match=want):
            net.eval()(_x())
    net.train()
    with torch.no_grad():
        m.scores.view(-1)[[2, 5]] = torch.tensor([0.0, float("-inf")])
    with pytest.raises(NonFiniteError, match=rf"{where}: scores contain inf \(1 of "):
        net(_x())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weight_is_an_error_naming_the_layer(backend):
    net = _net()
    with torch.no_grad():
        net[1].weight[0, 0, 0, 0] = float("inf")
    with binslt.use_backend(backend), pytest.raises(
            NonFiniteError, match=r"^BinSpikeConv2d 1: weight contains inf \(1 of 576\)"):
        net(_x())


def test_non_finite_bn_statistics_are_an_error_naming_the_layer():
    # A finite input whose current overflows float32: the batch variance is inf.
    net = _net()
    x = _x()
    x[0, 0, 0, 0, 0] = 3e38
    with binslt.use_backend("cpu"), pytest.raises(
            NonFiniteError, match=r"^BinSpikeConv2d 0: BN batch statistics are not finite in "
            r"\d+ of 8 channels"):
        net(x)
    # the spike-input conv (bconv_lif) checks the statistics of its counts times the gain
    conv = BinSpikeConv2d(4, 4, 1, bn=True, backend="cpu")
    conv.input_gain = float("inf")  # a constant factor folded into the kernel gain
    with pytest.raises(NonFiniteError, match=r"^BinSpikeConv2d: BN batch statistics are not "
                       "finite"):
        conv(torch.ones(1, 2, 4, 3, 3))
    assert torch.isfinite(conv.bn.running_mean).all()  # nothing entered the running stats


def test_a_checkpoint_with_nan_fails_at_load_naming_the_entry():
    net = _net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["1.scores"].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^BinSpikeConv2d 1: scores in the loaded state "
                       r"dict contain NaN \(1 of 576\)"):
        _net().load_state_dict(sd)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["3.bn.running_var"][2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^BinSpikeLinear 3: bn.running_var in the loaded "
                       r"state dict contains inf \(1 of 6\)"):
        _net().load_state_dict(sd)


def test_kernel_and_reference_refuse_non_finite_scores_alike():
    s = torch.randn(72)
    s[7] = float("nan")
    for select in (torch.ops.binslt.topk_mask, ref.topk_mask_reference):
        with pytest.raises(ValueError, match=r"^binslt::topk_mask: scores contain NaN "
                           r"\(1 of 72\)"):
            select(s, 36)
    s[7] = 0.0
    assert int(torch.ops.binslt.topk_mask(s, 36).sum()) == 36


class _NanAfter(nn.Module):
    """Logits that turn NaN at the ``k``-th training call with a batch of ``batch``."""

    def __init__(self, k: int, batch: int):
        super().__init__()
        self.k, self.batch, self.calls = k, batch, 0
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        y = x.flatten(1)[:, :3] * self.w
        if self.training and x.shape[0] == self.batch:
            self.calls += 1
            if self.calls >= self.k:
                return y * float("nan")
        return y


def test_a_nan_loss_stops_before_the_update_naming_the_step():
    model = _NanAfter(2, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.rand(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    with pytest.raises(train.DivergedError, match=r"^epoch 7, step 2: the training loss is nan"):
        train.train_one_epoch(model, data, opt, torch.device("cpu"), epoch=7)
    w_after_step_1 = model.w.detach().clone()
    assert torch.isfinite(w_after_step_1).all()  # step 2's update did not run


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

TINY = ["--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--no-progress",
        "--timesteps", "2"]

FACTORY = """
import torch
from torch import nn
from spikingjelly.activation_based import layer, neuron


class Check(nn.Module):
    def forward(self, x):
        if x.shape[1] != 2:
            raise RuntimeError("my check wants a batch of 2")
        return x


class NanAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.training and x.shape[1] == 32:
            self.calls += 1
            if self.calls >= {k}:
                return x * float("nan")
        return x


def make(num_classes=10):
    return nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(),
        {check}layer.Flatten(), layer.Linear(4 * 8 * 8, num_classes), NanAfter())
"""


def _factory(tmp_path, *, check: bool, k: int = 10**9) -> str:
    p = tmp_path / "my.py"
    p.write_text(textwrap.dedent(FACTORY.format(check="Check(), " if check else "", k=k)))
    return f"{p}:make"


def test_a_model_failing_inside_a_run_is_one_line_and_exit_2(tmp_path, capsys):
    spec = _factory(tmp_path, check=True)
    args = ["search", *TINY, "--epochs", "1", "--model", spec, "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("binslt search: error: layer net.3 (Check) raised RuntimeError: my "
                          "check wants a batch of 2 (at "), err
    assert "my.py:" in err and "--debug" in err
    with pytest.raises(train.ModelError) as ei:  # --debug: the exception itself, with its cause
        cli.main(["--debug", *args[:-1], str(tmp_path / "o2")])
    assert isinstance(ei.value.__cause__, RuntimeError)
    with pytest.raises(train.ModelError):  # also after the command's name
        cli.main([*args[:-1], str(tmp_path / "o3"), "--debug"])


def test_a_factory_that_raises_is_one_line_and_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.py"
    p.write_text("def make(num_classes=10):\n    raise KeyError('no such layer')\n")
    assert cli.main(["search", *TINY, "--model", f"{p}:make", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make() in" in err and "KeyError" in err, err


def test_a_nan_loss_in_a_run_keeps_the_last_checkpoint(tmp_path, capsys):
    # 64 images in batches of 32: two steps an epoch; the loss turns NaN at epoch 2, step 1.
    spec = _factory(tmp_path, check=False, k=3)
    out = tmp_path / "o"
    assert cli.main(["search", *TINY, "--epochs", "3", "--model", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "error: epoch 2, step 1: the training loss is nan" in err, err
    assert "keeps epoch 1" in err, err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "results.json").exists()


def test_model_error_names_a_layer_refusing_its_input():
    net = _net()
    with pytest.raises(ValueError) as ei:
        net(torch.rand(3, 2, 4, 4))  # no time dimension
    err = train.model_error(ei.value, user_model=False)
    assert str(err).startswith("BinSpikeConv2d 0 expects a multi-step input [T, N, C, H, W]"), err
    assert "x.unsqueeze(0)" in str(err)
    with pytest.raises(NonFiniteError) as ei:
        with torch.no_grad():
            net[1].scores[0, 0, 0, 0] = float("nan")
        net(_x())
    assert str(train.model_error(ei.value, user_model=False)).startswith(
        "BinSpikeConv2d 1: scores contain NaN (1 of 576)")
    # a kernel failure in a built-in model is not the user's: no one-line error
    assert train.model_error(RuntimeError("internal"), user_model=False) is None


# ---------------------------------------------------------------------------------------------
# Step mode
# ---------------------------------------------------------------------------------------------


def test_set_step_mode_single_step_is_refused_multi_step_accepted():
    net = nn.Sequential(_net(), SpikeMaxPool2d(1), LIF(), BinConv2d(3, 3, 1))
    functional.set_step_mode(net, "m")  # accepted: what the layers are
    for m in (net[0][0], net[0][3], net[0][4], net[1], net[2], net[3]):
        assert m.step_mode == "m"
    with pytest.raises(ValueError, match=r"^BinSpikeConv2d 0 is multi-step only \(step_mode "
                       r"'m'\): it takes whole sequences \[T, N, \.\.\.\]"):
        functional.set_step_mode(net, "s")
    with pytest.raises(ValueError, match="multi-step only"):
        LIF().step_mode = "s"


# ---------------------------------------------------------------------------------------------
# SpikingJelly's monitors and op counters
# ---------------------------------------------------------------------------------------------


def _sj_converted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(layer.Conv2d(2, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(),
                        layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(),
                        layer.Flatten(), layer.Linear(8 * 4 * 4, 8), layer.BatchNorm1d(8),
                        neuron.LIFNode(), layer.Linear(8, 3))
    functional.set_step_mode(net, "m")
    conv, _ = convert(net, 0.5, example_input=_x())
    return conv


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_monitor_records_every_spiking_layer(backend):
    net = _sj_converted()
    mon = monitor.OutputMonitor(net, SPIKING_LAYERS)
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y))
             for n, m in net.named_modules() if isinstance(m, SPIKING_LAYERS)]
    with binslt.use_backend(backend):
        net(_x())
    for h in hooks:
        h.remove()
    assert mon.monitored_layers == ["0", "3", "7"]
    assert [tuple(r.shape) for r in mon.records] == [(2, 3, 8, 4, 4), (2, 3, 8, 4, 4), (2, 3, 8)]
    for name, rec in zip(mon.monitored_layers, mon.records):
        assert torch.equal(rec, outs[name])
        assert set(rec.unique().tolist()) <= {0.0, 1.0}
    rates = [float(r.detach().mean()) for r in mon.records]
    assert any(0.0 < r < 1.0 for r in rates), rates


@pytest.mark.parametrize("backend", BACKENDS)
def test_attribute_monitor_reads_v_with_store_v_seq(backend):
    net = _sj_converted()
    am = monitor.AttributeMonitor("v", False, net, SPIKING_LAYERS)
    with pytest.raises(AttributeError, match=r"BinSpikeConv2d 0 keeps no membrane potential v.*"
                       r"store_v_seq = True"):
        net(_x())
    am.clear_recorded_data()
    store_v_seq(net)
    x = _x()
    with binslt.use_backend(backend):
        y0 = net[0](x)
        assert [tuple(r.shape) for r in am.records] == [(3, 8, 4, 4)]
        net(x)
    assert [tuple(r.shape) for r in am.records[1:]] == [(3, 8, 4, 4), (3, 8, 4, 4), (3, 8)]
    # V equals SpikingJelly's LIFNode(store_v_seq=True) on the same current, and so do the spikes
    m = net[0]
    with torch.no_grad():
        z = nn.functional.conv2d(x.flatten(0, 1), m.effective_weight(), padding=1)
        z = z.view(2, 3, 8, 4, 4)
        cur, _, _ = ref.epilogue(z, m.bn.weight, m.bn.bias, None, True, m.bn.eps)
        node = neuron.LIFNode(tau=m.neuron.tau, decay_input=m.neuron.decay_input,
                              v_reset=m.neuron.v_reset, step_mode="m", store_v_seq=True)
        s_sj = node(cur)
    assert torch.equal(s_sj, y0)
    torch.testing.assert_close(m.v_seq, node.v_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(am.records[0], node.v_seq[-1], rtol=1e-5, atol=1e-5)
    assert net[7].v_seq.shape == (2, 3, 8)  # a linear layer's V: [T, N, F]


def _count(net, counter_cls, backend, x, rules: bool, grad: bool):
    c = counter_cls(extra_rules=spikingjelly_op_rules(counter_cls) if rules else None)
    with binslt.use_backend(backend), torch.set_grad_enabled(grad), DispatchCounterMode([c]):
        net(x)
    return c


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_op_counters_count_binslt_ops_as_the_torch_backend(mode):
    net = _sj_converted()
    x = _x()
    if mode == "eval":
        net.eval()
        with torch.no_grad():  # statistics under which the eval layers spike
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_var.fill_(0.05)
    grad = mode == "train"
    syn_torch = _count(net, SynOpCounter, "torch", x, rules=False, grad=grad)
    syn_cpu = _count(net, SynOpCounter, "cpu", x, rules=True, grad=grad)
    assert syn_torch.get_total() > 0
    assert syn_cpu.get_total() == syn_torch.get_total()
    ops_seen = {getattr(k, "_schema", None) and k._schema.name for k in syn_cpu.records["Global"]}
    assert ops_seen & {"binslt::bconv_lif", "binslt::bconv_lif_infer"}, ops_seen
    # without the rules SpikingJelly misses the binary convolutions
    assert _count(net, SynOpCounter, "cpu", x, rules=False, grad=grad).get_total() < \
        syn_torch.get_total()
    mac_torch = _count(net, MACCounter, "torch", x, rules=False, grad=grad)
    mac_cpu = _count(net, MACCounter, "cpu", x, rules=True, grad=grad)
    assert mac_cpu.get_total() == mac_torch.get_total() > 0  # the real-input first conv
    _assert_conv_acs_as_torch(net, x, grad)


def _assert_conv_acs_as_torch(net, x, grad: bool) -> None:
    """ACs of the convolutions, the counter's aten.convolution rule on both sides: the torch
    backend's convs against the cpu backend's convs and binslt ops (the torch backend's
    elementwise ops count ACs of their own)."""
    conv = torch.ops.aten.convolution.default
    ac_torch = _count(net, ACCounter, "torch", x, rules=False, grad=grad).records["Global"]
    ac_cpu = _count(net, ACCounter, "cpu", x, rules=True, grad=grad).records["Global"]
    binslt_ops = set(spikingjelly_op_rules(ACCounter))
    assert ac_torch[conv] == ac_cpu.get(conv, 0) + sum(v for k, v in ac_cpu.items()
                                                       if k in binslt_ops) > 0


def test_op_counters_count_resnet_eval_as_the_torch_backend():
    """ResNet-19's eval forward (its 1x1 shortcuts, BinConv2d's bconv_affine_infer on the CPU)
    counts as the torch backend's."""
    net = small_resnet19_eval("auto")
    x = torch.randn(2, 3, 16, 16)
    want = _count(net, SynOpCounter, "torch", x, rules=False, grad=False)
    got = _count(net, SynOpCounter, "cpu", x, rules=True, grad=False)
    assert got.get_total() == want.get_total() > 0
    _assert_conv_acs_as_torch(net, x, False)


@pytest.mark.parametrize("counter_cls", [SynOpCounter, ACCounter])
def test_op_rules_count_the_shortcut_op_as_its_two_convolutions(counter_cls):
    """bconv_lif_infer_shortcut (a ResNet block's conv2 with its shortcut inside, the whole
    network's no-grad forward) counts as bconv_affine_infer followed by bconv_lif_infer."""
    g = torch.Generator().manual_seed(5)
    T, n, ci, co = 2, 2, 12, 8
    bx = (torch.rand(T, n, ci, 8, 8, generator=g) < 0.3).float()
    x = (torch.rand(T, n, co, 4, 4, generator=g) < 0.3).float()
    wm, wp = torch.ops.binslt.pack_weight(torch.randint(-1, 2, (co, co, 3, 3), generator=g).float())
    sm, sp = torch.ops.binslt.pack_weight(torch.randint(-1, 2, (co, ci, 1, 1), generator=g).float())
    one = torch.ones(co)
    conv, sc, neuron = (wm, wp, one, one, one * 0), (sm, sp, one * 0.5, one, one * 0), (
        2.0, False, 1.0, 0.0)
    ops_ = torch.ops.binslt
    fused = counter_cls(extra_rules=spikingjelly_op_rules(counter_cls))
    with torch.no_grad(), DispatchCounterMode([fused]):
        ops_.bconv_lif_infer_shortcut(x, *conv, bx, *sc, 2, 0, 1, 1, *neuron, 1, False)
    apart = counter_cls(extra_rules=spikingjelly_op_rules(counter_cls))
    with torch.no_grad(), DispatchCounterMode([apart]):
        r = ops_.bconv_affine_infer(bx.flatten(0, 1), *sc, 2, 0).view(T, n, co, 4, 4)
        ops_.bconv_lif_infer(x, *conv, r, 1, 1, *neuron, 1, False)
    assert fused.get_total() == apart.get_total() > 0


def test_op_rules_refuse_an_unknown_counter():
    with pytest.raises(ValueError, match="synop"):
        spikingjelly_op_rules("flops per watt")
