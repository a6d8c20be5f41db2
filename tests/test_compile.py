"""torch.compile of the paper's networks: no graph break in the search step or in eval of a
frozen ticket, one compile for repeated steps, and the eager model's loss, gradients, BN
statistics and logits (the ``aot_eager`` backend: cheap on a small CPU; the inductor figure
is ``benchmarks/compile_step.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from binslt.nn import models


def _net(arch: str, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.build(arch, "binwslt", num_classes=10, in_channels=1, input_size=8,
                       timesteps=2).train()
    if mode == "frozen":
        with torch.no_grad():  # BN running statistics of one batch, so that layers fire
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.momentum = None
            net(torch.randn(16, 1, 8, 8))
        models.set_mode(net, "frozen")
        net.eval()
    return net


def _batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["conv4", "resnet19"])
@pytest.mark.parametrize("mode", ["search", "frozen"])
def test_no_graph_break(arch, mode):
    """Search: forward and loss (the backward is AOTAutograd's graph of the same capture);
    frozen: the eval forward with autograd on, as a user calls it without torch.no_grad (the
    no_grad path compiles with fullgraph=True below)."""
    net = _net(arch, mode)
    x, y = _batch()
    if mode == "search":
        ex = torch._dynamo.explain(lambda a, b: F.cross_entropy(net(a), b))(x, y)
    else:
        ex = torch._dynamo.explain(net)(x)
    reasons = [r.reason.splitlines()[0] for r in ex.break_reasons]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, reasons


def _grads(net):
    return {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backward", ["in_graph", "aot"])
def test_compiled_conv4_search_step_matches_eager(backward):
    """fullgraph of the search step: with ``trace_autograd_ops`` the backward is traced into
    the same graph; otherwise the compiled forward's loss runs AOTAutograd's backward graph."""
    net = _net("conv4", "search")
    twin = copy.deepcopy(net)
    x, y = _batch()

    def step(a, b):
        loss = F.cross_entropy(twin(a), b)
        if backward == "in_graph":
            loss.backward()
            return loss.detach()
        return loss

    with torch._dynamo.config.patch(trace_autograd_ops=backward == "in_graph"):
        loss_c = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    if backward == "aot":
        loss_c.backward()
    loss_e = F.cross_entropy(net(x), y)
    loss_e.backward()
    assert torch.equal(loss_c, loss_e.detach())
    ge, gc = _grads(net), _grads(twin)
    assert ge.keys() == gc.keys() and all(n.endswith("scores") for n in ge)
    for n in ge:
        assert gc[n] is not None and torch.equal(gc[n], ge[n]), n
    assert any(bool(g.abs().sum() > 0) for g in ge.values())
    for (n, b), (_, bc) in zip(net.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, bc), n  # the BN running statistics moved alike


def test_search_steps_compile_once():
    """The optimiser changes the scores (the mask), not a shape: no recompile across steps."""
    net = _net("conv4", "search")
    x, y = _batch()
    counter = CompileCounterWithBackend("aot_eager")
    fwd = torch.compile(lambda a, b: F.cross_entropy(net(a), b), fullgraph=True,
                        backend=counter)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    masks = []
    for _ in range(3):
        opt.zero_grad()
        fwd(x, y).backward()
        opt.step()
        masks.append(net.features[0].current_mask().clone())
    assert counter.frame_count == 1
    assert not torch.equal(masks[0], masks[-1])  # the steps did change the selection


# Eager calls between compiled steps: an evaluation (conv4), and a training step inside
# ops.keep_counts(False) (resnet19: its shortcuts hand their recompute function).
_BETWEEN = {
    "eval": ("conv4", """
        net.eval()
        with torch.no_grad():
            net(x)
        net.train()"""),
    "keep_counts_off": ("resnet19", """
        with ops.keep_counts(False):
            F.cross_entropy(net(x), y).backward()"""),
}


@pytest.mark.parametrize("between", sorted(_BETWEEN))
def test_compiled_before_any_eager_call_compiles_once(between, tmp_path):
    """In a fresh process, a model compiled before any eager layer call (no backend chosen, no
    settings read yet), with an eager call after each compiled step: three steps are one
    compile. The first trace used to store binslt's backend settings as a side effect, and
    eager calls to fill auto's caches, the thread-local flags and a shortcut's attribute, each
    making the next compiled call compile again."""
    import subprocess
    import sys
    import textwrap

    arch, eager = _BETWEEN[between]
    script = tmp_path / "first_compile.py"
    script.write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from torch._dynamo.testing import CompileCounterWithBackend
        from binslt import ops
        from binslt.nn import models

        torch.manual_seed(0)
        net = models.build("%s", "binwslt", num_classes=10, in_channels=1, input_size=8,
                           timesteps=2).train()
        x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(lambda a, b: F.cross_entropy(net(a), b), fullgraph=True,
                             backend=counter)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            step(x, y).backward()
            opt.step()%s
        print("frames", counter.frame_count)
    """) % (arch, textwrap.indent(textwrap.dedent(eager), " " * 4)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["frames", "1"], r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("grad", [True, False], ids=["autograd_on", "no_grad"])
def test_compiled_resnet19_frozen_ticket_matches_eager(grad):
    net = _net("resnet19", "frozen")
    x, _ = _batch(3)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(grad):
        got, want = compiled(x), net(x)
    assert torch.equal(got, want) and bool((want != 0).any())


def test_eager_input_validation_still_raises():
    """Validation is skipped only while tracing: eager calls still check their input."""
    from binslt import BinSpikeConv2d

    layer = BinSpikeConv2d(2, 4, 3, padding=1, backend="torch")
    with pytest.raises(ValueError, match="binary spikes"):
        layer(torch.full((2, 1, 2, 4, 4), 0.5))
    torch.compile(layer, fullgraph=True, backend="aot_eager")(torch.ones(2, 1, 2, 4, 4))
    with pytest.raises(ValueError, match="binary spikes"):
        layer(torch.full((2, 1, 2, 4, 4), 0.5))
