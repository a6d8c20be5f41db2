"""backend='auto''s safe fall-back: BINSLT_BACKEND / BINSLT_DISABLE_BACKENDS, a backend whose
first call fails recoverably, and binslt check's verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from binslt import ops
from binslt.nn.layers import BinSpikeConv2d, BinSpikeLinear
from binslt.ops import fallback as fb

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
NO_IMAGE = "CUDA error: no kernel image is available for execution on the device"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("BINSLT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BINSLT_BACKEND", raising=False)
    monkeypatch.delenv("BINSLT_DISABLE_BACKENDS", raising=False)
    ops.reset_backend_state()
    yield
    ops.reset_backend_state()


def _fail_first(monkeypatch, name, exc):
    """torch.ops.binslt.<name> raises ``exc`` on every call; returns the call counter."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise exc

    monkeypatch.setattr(torch.ops.binslt, name, broken)
    return calls


def _pair(**kw):
    torch.manual_seed(5)
    auto = BinSpikeConv2d(33, 6, 3, padding=1, backend="auto", **kw)
    torch.manual_seed(5)
    ref = BinSpikeConv2d(33, 6, 3, padding=1, backend="torch", **kw)
    ref.load_state_dict(auto.state_dict())
    return auto, ref


def test_recoverable_classification():
    from triton.runtime.errors import OutOfResources

    assert fb.recoverable(RuntimeError(NO_IMAGE))
    assert fb.recoverable(OutOfResources(232448, 101376, "shared memory"))
    assert fb.recoverable(RuntimeError("CUDA error: too many resources requested for launch"))
    assert not fb.recoverable(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not fb.recoverable(RuntimeError("CUDA error: an illegal memory access was "
                                           "encountered"))
    assert not fb.recoverable(ValueError("binslt::bconv_lif: x must be ..."))
    assert not fb.recoverable(RuntimeError("something else"))


def test_first_call_failure_falls_back_with_one_warning(monkeypatch):
    """The CPU inference kernel 'has no kernel image': auto warns once, the torch backend takes
    over, and the spikes are the reference's; later calls stay there without a warning."""
    calls = _fail_first(monkeypatch, "bconv_lif_infer", RuntimeError(NO_IMAGE))
    auto, ref = _pair()
    x = (torch.rand(2, 1, 33, 5, 5) < 0.4).float()
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = auto(x)
        again = auto(x)
    fell = [w for w in rec if issubclass(w.category, fb.BackendFallbackWarning)]
    assert len(fell) == 1, [str(w.message) for w in rec]
    assert "'cpu'" in str(fell[0].message) and "no kernel image" in str(fell[0].message)
    assert len(calls) == 1
    with torch.no_grad():
        expect = ref(x)
    assert torch.equal(got, expect) and torch.equal(again, expect)
    assert ops.resolve_backend("auto", CPU) == "torch"
    assert "cpu" in fb.FAILED
    st = ops.backends()["cpu"]
    assert not st["usable"] and "no kernel image" in st["reason"]


def test_first_backward_failure_falls_back(monkeypatch):
    """A real-input layer's backward kernel fails on its first call: the same schema runs on the
    reference, gradients equal the torch backend's."""
    torch.manual_seed(2)
    auto = BinSpikeLinear(12, 5, input="real", bn=True, backend="auto")
    ref = BinSpikeLinear(12, 5, input="real", bn=True, backend="torch")
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(3, 4, 12)
    s = auto(x)  # the forward runs on the cpu kernels
    calls = _fail_first(monkeypatch, "bn_lif_bwd", RuntimeError(NO_IMAGE))
    g = torch.randn(s.shape)
    with pytest.warns(fb.BackendFallbackWarning, match="no kernel image"):
        s.backward(g)
    sr = ref(x)
    sr.backward(g)
    assert len(calls) == 1 and torch.equal(s, sr)
    torch.testing.assert_close(auto.scores.grad, ref.scores.grad, rtol=1e-5, atol=1e-7)


def test_out_of_memory_and_illegal_access_are_raised(monkeypatch):
    auto, _ = _pair()
    x = (torch.rand(2, 1, 33, 5, 5) < 0.4).float()
    _fail_first(monkeypatch, "bconv_lif_infer", torch.OutOfMemoryError("CUDA out of memory"))
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        auto(x)
    _fail_first(monkeypatch, "bconv_lif_infer",
                RuntimeError("CUDA error: an illegal memory access was encountered"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="illegal memory access"):
        auto(x)
    assert not fb.FAILED and ops.resolve_backend("auto", CPU) == "cpu"


def test_no_fall_back_after_the_first_success_or_when_named(monkeypatch):
    auto, _ = _pair()
    x = (torch.rand(2, 1, 33, 5, 5) < 0.4).float()
    with torch.no_grad():
        auto(x)  # the cpu backend's first call succeeds
    _fail_first(monkeypatch, "bconv_lif_infer", RuntimeError(NO_IMAGE))
    with torch.no_grad(), pytest.raises(RuntimeError, match="no kernel image"):
        auto(x)
    ops.reset_backend_state()
    named, _ = _pair()
    named.backend = "cpu"
    with torch.no_grad(), pytest.raises(RuntimeError, match="no kernel image"):
        named(x)
    assert not fb.FAILED


def test_env_backend_and_disable(monkeypatch):
    monkeypatch.setenv("BINSLT_BACKEND", "torch")
    ops.reset_backend_state()
    assert ops.resolve_backend("auto", CPU) == "torch"
    with ops.use_backend("cpu"):  # a use_backend block takes precedence
        assert ops.resolve_backend("auto", CPU) == "cpu"
    monkeypatch.delenv("BINSLT_BACKEND")
    monkeypatch.setenv("BINSLT_DISABLE_BACKENDS", "cpu, triton")
    ops.reset_backend_state()
    assert ops.resolve_backend("auto", CPU) == "torch"
    assert not ops.backends()["cpu"]["usable"] and ops.backends()["cpu"]["built"]
    with pytest.raises(RuntimeError, match="disabled by BINSLT_DISABLE_BACKENDS"):
        ops.resolve_backend("cpu", CPU)
    with pytest.raises(RuntimeError, match="disabled by BINSLT_DISABLE_BACKENDS"):
        BinSpikeConv2d(3, 4, 3, backend="cpu")((torch.rand(1, 1, 3, 4, 4) < .5).float())
    monkeypatch.setenv("BINSLT_DISABLE_BACKENDS", "cpu,gpu")
    ops.reset_backend_state()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.resolve_backend("auto", CPU)
    monkeypatch.setenv("BINSLT_DISABLE_BACKENDS", "torch")
    monkeypatch.setenv("BINSLT_BACKEND", "torch")
    ops.reset_backend_state()
    with pytest.raises(ValueError, match="disables"):
        ops.resolve_backend("auto", CPU)


def test_env_read_at_start_subprocess():
    env = dict(os.environ, BINSLT_DISABLE_BACKENDS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    code = "import torch, binslt; print(binslt.ops.resolve_backend('auto', torch.device('cpu')))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stdout + r.stderr


def _write_verdict(key, ok):
    fb.write_verdict({"key": key, "ok": ok,
                      "backends": {"cpu": {"ok": ok, "failed": [] if ok else ["bconv_lif"]}}})


def test_verdict_with_a_failing_backend_changes_auto():
    _write_verdict(fb.verdict_key(CPU), ok=False)
    assert json.loads(fb.verdict_path().read_text())["verdicts"][0]["ok"] is False
    ops.reset_backend_state()
    with pytest.warns(fb.BackendFallbackWarning, match="bconv_lif failed `binslt check`"):
        assert ops.resolve_backend("auto", CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert ops.resolve_backend("auto", CPU) == "torch"
    assert ops.resolve_backend("cpu", CPU) == "cpu"  # asked for by name: still served


def test_verdict_with_another_key_is_ignored():
    key = fb.verdict_key(CPU)
    for other in ({**key, "torch": "0.0.1"}, {**key, "build": {**key["build"], "files": "x"}},
                  {**key, "device_name": "another CPU"}):
        _write_verdict(other, ok=False)
        ops.reset_backend_state()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops.resolve_backend("auto", CPU) == "cpu"
    _write_verdict(key, ok=True)  # a passing verdict changes nothing either
    ops.reset_backend_state()
    assert ops.resolve_backend("auto", CPU) == "cpu"


def test_compile_traces_the_first_auto_call():
    """torch.compile(fullgraph=True) as the process' first auto call: the choice and the guard
    read no file and set no thread state while tracing."""
    torch._dynamo.reset()
    _write_verdict(fb.verdict_key(CPU), ok=True)
    torch.manual_seed(0)
    m = torch.nn.Sequential(BinSpikeConv2d(3, 8, 3, padding=1, bn=True),
                            BinSpikeConv2d(8, 16, 3, stride=2, padding=1)).eval()
    x = (torch.rand(2, 2, 3, 7, 7) < 0.3).float()
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        want = m(x)
    assert torch.equal(got, want)
    assert ops.resolve_backend("auto", CPU) == "cpu"


def test_compile_takes_the_verdict_as_eager_calls_do():
    """A verdict that finds the cpu backend failing steers a torch.compile trace that is the
    process' first auto call as it steers eager calls: auto's choice is made outside the trace
    (a constant of the graph), reading the verdict."""
    torch._dynamo.reset()
    _write_verdict(fb.verdict_key(CPU), ok=False)
    ops.reset_backend_state()
    torch.manual_seed(0)
    m = torch.nn.Sequential(BinSpikeConv2d(3, 8, 3, padding=1, bn=True)).eval()
    x = (torch.rand(2, 2, 3, 7, 7) < 0.3).float()
    with pytest.warns(fb.BackendFallbackWarning, match="bconv_lif failed `binslt check`"):
        with torch.no_grad():
            got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert ops.resolve_backend("auto", CPU) == "torch"  # what the trace's constant read
    with torch.no_grad(), ops.use_backend("torch"):
        assert torch.equal(got, m(x))
