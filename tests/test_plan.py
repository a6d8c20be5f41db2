"""The CPU conv ops' plans (binslt.ops.plan, plan_forward / plan_backward in csrc/cpu/cpu_algos.cpp).

* which plan each of a set of layer shapes takes (the anchor layer, a 1x1 conv, a first layer
  3 -> 64, a linear layer, a 2x2-pooled layer, stride 2) is one of the names expected there;
* forcing each algorithm (binslt.ops.cpu_algorithms) either runs exactly that algorithm (the plan
  log says so) with the reference's result (binslt.ops.reference, float32 tolerance), or raises
  ValueError saying why it cannot, never another algorithm;
* the plan log: BINSLT_VERBOSE=1 (read at each call) and plan.verbose();
* measuring (plan.measure, BINSLT_PLAN_MEASURE): the first call of a key times the candidates
  (the log says "measuring"), later ones take the cached winner ("measured"), always one of the
  call's candidates and with the reference's result; the cache file (keyed by CPU and build,
  a corrupt one ignored with one warning), the opt-out, and BinConv2d's op asking the plan;
* the C++ sources: no function other than a registered op entry point takes more than 10
  parameters, and each entry point takes its schema's arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import onednn_supported

from binslt.ops import cpu_algorithms, plan
from binslt.ops import cpu_algos as _cpu_algos
from binslt.ops import library as _ext
from binslt.ops import reference as ref
from binslt.ops.schemas import AUX_SCHEMAS, SCHEMAS, WEIGHT_SCHEMAS

CPU = _ext.module("cpu")
needs_cpu = pytest.mark.skipif(CPU is None, reason="binslt._C (the C++ CPU kernels) is not built")
OPS = torch.ops.binslt
ROOT = Path(__file__).resolve().parents[1]

# (name, x_shape, weight_shape, stride, padding, rate): the layers asked about.
LAYERS = {
    "anchor": ((4, 16, 128, 16, 16), (128, 128, 3, 3), 1, 1, 0.15),
    "pointwise": ((4, 16, 64, 8, 8), (128, 64, 1, 1), 1, 0, 0.15),
    "first": ((4, 16, 3, 32, 32), (64, 3, 3, 3), 1, 1, 0.5),
    "linear": ((4, 16, 512), (10, 512), 1, 0, 0.15),
    "pool2": ((4, 16, 64, 32, 32), (64, 64, 3, 3), 1, 1, 0.2),
    "stride2": ((4, 16, 64, 16, 16), (128, 64, 3, 3), 2, 1, 0.15),
}

AMX = onednn_supported()
# AMX-BF16 and oneDNN: the bf16x3 gradient forms are measured candidates
BF16_MATRIX = bool(CPU is not None and CPU._cpu_features().get("bf16_matrix", False))


def _expected(name: str, isa: str) -> dict[str, set[str]]:
    """The names each part may take for a layer under "auto" (ISA- and AMX-dependent)."""
    int8 = {"int8"} if AMX else set()
    ternary = {"ternary", "combo"} if isa == "avx512" else set()
    return {
        "anchor": {"forward": {"event"}, "infer": {"event"} | ({"onednn"} if AMX else set()),
                   "grad_x": {"dense"} | ternary | int8, "grad_w": {"event"} | int8},
        "pointwise": {"forward": {"event"}, "infer": {"event"} | ({"onednn"} if AMX else set()),
                      "grad_x": {"pointwise"}, "grad_w": {"event"} | int8},
        # 3 channels in one word: rate 0.5 of 3 channels is ~0.05 of the word's bits
        # (the inference op samples the float spikes: 0.5, above AVX-512's event crossover)
        "first": {"forward": {"event"}, "infer": {"dense" if isa == "avx512" else "event"},
                  "grad_x": {"margined"} | ternary | int8, "grad_w": {"event"} | int8},
        "linear": {"forward": {"event"}, "infer": {"event"}, "grad_x": {"pointwise"},
                   "grad_w": {"event"}},
        "pool2": {"forward": {"event"}, "infer": {"event"} | ({"onednn"} if AMX else set()),
                  "grad_x": {"margined"} | ternary | int8, "grad_w": {"event"} | int8},
        "stride2": {"forward": {"event"}, "infer": {"event"} | ({"onednn"} if AMX else set()),
                    "grad_x": {"dense"} | int8, "grad_w": {"event"} | int8},
    }[name]


@needs_cpu
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layer_takes_an_expected_plan(name):
    x_shape, w_shape, stride, padding, rate = LAYERS[name]
    isa = _ext.cpu_info()["kernel_isa"]
    want = _expected(name, isa)
    fwd = plan.forward_plan(x_shape, w_shape, stride, padding, rate=rate)
    assert fwd == {"isa": isa, "forward": fwd["forward"], "source": "table"}
    assert fwd["forward"] in want["forward"], fwd
    inf = plan.forward_plan(x_shape, w_shape, stride, padding, rate=rate, infer=True)
    assert inf["forward"] in want["infer"], inf
    bwd = plan.backward_plan(x_shape, w_shape, stride, padding, rate=rate, weight_density=0.5)
    assert bwd["grad_x"] in want["grad_x"], bwd
    assert bwd["grad_w"] in want["grad_w"], bwd
    assert plan.backward_plan(x_shape, w_shape, stride, padding, rate=rate,
                              need_grad_x=False)["grad_x"] == "none"


@needs_cpu
def test_the_rules_move_with_rate_and_map_size():
    """The thresholds the plans follow: the forward's event kernel only below a firing rate; the
    dense weight gradient from a rate, in its tap form on maps of at most 4x4 (with AMX-INT8 the
    int8 form there at any rate); the margined input gradient from 32x32 output pixels at stride
    1; the unfold form of both for 3x3 over 2x2; with AMX-INT8 the int8 input gradient from 8x8
    maps, and at stride 1 on 4x4 maps of 128 x 256 channel pairs and more (its unfolded product),
    and the onednn inference forward for packed output only."""
    x, w = (4, 16, 128, 16, 16), (128, 128, 3, 3)
    assert plan.forward_plan(x, w, 1, 1, rate=0.9)["forward"] == "dense"
    dense_w = plan.backward_plan(x, w, 1, 1, rate=0.9)["grad_w"]
    assert dense_w == ("int8" if AMX else "dense")
    small = (4, 16, 128, 4, 4)
    assert plan.backward_plan(small, w, 1, 1, rate=0.9)["grad_w"] == ("int8" if AMX else "taps")
    assert plan.backward_plan(small, w, 1, 1, rate=0.1)["grad_w"] == ("int8" if AMX else "event")
    assert plan.backward_plan(small, w, 1, 1)["grad_x"] in {"dense", "margined"}
    wide = (256, 128, 3, 3)  # from 128 x 256 channel pairs the unfolded int8 product
    assert plan.backward_plan(small, wide, 1, 1)["grad_x"] in (
        {"int8"} if AMX else {"dense", "margined"})
    # at stride 2 onto 4x4 the int8 form would be the class convs, which lose there
    assert plan.backward_plan((4, 16, 128, 8, 8), wide, 2, 1)["grad_x"] in {"dense", "margined"}
    assert plan.backward_plan((4, 16, 128, 8, 8), w, 1, 1)["grad_x"] in (
        {"int8"} if AMX else {"dense", "margined", "ternary", "combo"})
    assert plan.forward_plan(x, w, 1, 1, rate=0.15, infer=True)["forward"] == "event"
    assert plan.forward_plan(x, w, 1, 1, rate=0.15, infer=True, packed_out=True)["forward"] == (
        "onednn" if AMX else "event")
    with pytest.raises(ValueError, match="packed_out must be a bool"):
        plan.forward_plan(x, w, 1, 1, infer=True, packed_out=1)
    assert plan.backward_plan((4, 16, 128, 2, 2), w, 1, 1)["grad_w"] == "unfold"
    assert plan.backward_plan((4, 16, 128, 2, 2), w, 1, 1)["grad_x"] == "unfold"
    if not AMX:
        assert plan.backward_plan((4, 16, 64, 32, 32), (64, 64, 3, 3), 1, 1)["grad_x"] in (
            {"margined", "ternary", "combo"})
        # the dense weight gradient reads dZ in NCHW: the input gradient then stays NCHW too
        assert plan.backward_plan((4, 16, 64, 32, 32), (64, 64, 3, 3), 1, 1, rate=0.9,
                                  weight_density=0.6)["grad_x"] in {"dense", "ternary", "combo"}


@needs_cpu
def test_plan_arguments_are_checked():
    x, w = (4, 16, 128, 16, 16), (128, 128, 3, 3)
    with pytest.raises(ValueError, match="x_shape must have 3 or 5 dimensions"):
        plan.forward_plan((4, 128, 16, 16), w, 1, 1)
    with pytest.raises(ValueError, match="Ci"):
        plan.forward_plan(x, (128, 64, 3, 3), 1, 1)
    with pytest.raises(ValueError, match="rate must be a fraction"):
        plan.forward_plan(x, w, 1, 1, rate=1.5)
    with pytest.raises(ValueError, match="weight_density must be a fraction"):
        plan.backward_plan(x, w, 1, 1, weight_density=-0.1)
    with pytest.raises(ValueError, match="stride"):
        plan.backward_plan(x, w, 0, 1)
    with pytest.raises(ValueError, match="linear layer"):
        plan.forward_plan((4, 16, 512), (10, 512), 2, 0)


# ----------------------------------------------------------------------------------------------
# Forcing each algorithm: exactly it (the log says so) with the reference's result, or an error
# ----------------------------------------------------------------------------------------------

# Small forms of the layers above: (T, N, Ci, Co, H, W, k, stride, padding, pool).
RUN = {
    "anchor": (2, 2, 40, 36, 9, 9, 3, 1, 1, 1),
    "pointwise": (2, 2, 40, 20, 5, 6, 1, 1, 0, 1),
    "first": (2, 2, 3, 24, 10, 10, 3, 1, 1, 1),
    "linear": (2, 3, 70, 10, 1, 1, 1, 1, 0, 1),
    "pool2": (2, 2, 33, 40, 8, 8, 3, 1, 1, 2),
    "stride2": (2, 2, 40, 36, 9, 9, 3, 2, 1, 1),
}
NEURON = (2.0, False, 0.5, 0.0)  # tau, decay_input, v_threshold, v_reset


def _case(geom, seed=0):
    T, N, Ci, Co, H, W, k, s, p, pool = geom
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T * N, Ci, H, W, generator=g) < 0.3).float()
    w = torch.randint(-1, 2, (Co, Ci, k, k), generator=g).float()
    wm, wp = ref.pack_weight_reference(w)
    return dict(x=x, xp=ref.pack_spikes_reference(x), wm=wm, wp=wp,
                alpha=torch.rand(Co, generator=g) * 0.2 + 0.05,
                scale=torch.rand(Co, generator=g) + 0.5,
                shift=torch.rand(Co, generator=g) * 0.4 - 0.1, T=T, N=N, Ci=Ci, stride=s,
                padding=p, pool=pool, g=g)


def _shapes(c):
    x = (c["T"], c["N"], c["Ci"], c["x"].shape[2], c["x"].shape[3])
    return x, (c["wm"].shape[0], c["Ci"], c["wm"].shape[1], c["wm"].shape[2])


def _logged(capfd, fn, *args):
    """fn(*args)'s result and the plan lines it logged."""
    capfd.readouterr()
    with plan.verbose():
        out = fn(*args)
    return out, plan.parse_verbose(capfd.readouterr().err)


@contextlib.contextmanager
def _forced(**kw):
    """cpu_algorithms(**kw), or None where this CPU cannot run the path at all (RuntimeError:
    no AVX-512 / AMX-INT8 here)."""
    try:
        ctx = cpu_algorithms(**kw)
        ctx.__enter__()
    except RuntimeError as e:
        assert re.search("needs|cannot run", str(e)), e
        yield False
        return
    try:
        yield True
    finally:
        ctx.__exit__(None, None, None)


def _fwd_args(c, bn_train):
    return (c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["T"],
            c["stride"], c["padding"], bn_train, 1e-5, *NEURON)


def _spikes_agree(a, b):
    assert a.shape == b.shape
    # spikes bit for bit but for a rare float tie at the threshold
    assert (a != b).float().mean() <= 1e-3


@needs_cpu
@pytest.mark.parametrize("layer", sorted(RUN))
@pytest.mark.parametrize("conv", _cpu_algos.CHOICES["conv"][1:])
def test_forcing_a_forward_plan_runs_it_or_raises(layer, conv, capfd):
    c = _case(RUN[layer])
    x_shape, w_shape = _shapes(c)
    with _forced(conv=conv) as ok:
        if not ok:
            return
        for infer in (False, True):
            try:
                want = plan.forward_plan(x_shape, w_shape, c["stride"], c["padding"], rate=0.3,
                                         infer=infer)
            except ValueError as e:
                assert "cannot run this call" in str(e) and f"'{conv}'" in str(e)
                with pytest.raises(ValueError, match=re.escape(str(e).splitlines()[0])):
                    if infer:
                        OPS.bconv_lif_infer(c["x"].view(c["T"], c["N"], *c["x"].shape[1:]),
                                            c["wm"], c["wp"], c["alpha"], c["scale"],
                                            c["shift"], None, c["stride"], c["padding"],
                                            *NEURON)
                    else:
                        OPS.bconv_lif(*_fwd_args(c, False))
                continue
            assert want["forward"] == conv
            if infer:
                xf = c["x"].view(c["T"], c["N"], *c["x"].shape[1:])
                args = (xf, c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None,
                        c["stride"], c["padding"], *NEURON, c["pool"], False)
                out, log = _logged(capfd, OPS.bconv_lif_infer, *args)
                _spikes_agree(out, ref.bconv_lif_infer_reference(*args))
                assert [r["op"] for r in log] == ["bconv_lif_infer"]
            else:
                for bn_train in (False, True):
                    args = _fwd_args(c, bn_train)
                    out, log = _logged(capfd, OPS.bconv_lif, *args)
                    want_out = ref.bconv_lif_reference(*args)
                    assert torch.equal(out[1], want_out[1])  # counts
                    _spikes_agree(out[0], want_out[0])
                    assert [r["op"] for r in log] == ["bconv_lif"]
            assert log[0]["forward"] == conv


def _bwd_case(layer):
    c = _case(RUN[layer], seed=1)
    fwd = OPS.bconv_lif(*_fwd_args(c, True))
    gs = torch.randn(fwd[0].shape, generator=c["g"])
    tail = (None, c["Ci"], c["stride"], c["padding"], True, 1e-5, *NEURON, True, 0, 2.0, True)
    if c["pool"] == 2:
        gp = torch.randn(*fwd[0].shape[:3], fwd[0].shape[3] // 2, fwd[0].shape[4] // 2,
                         generator=c["g"])
        packed = ref.pack_spikes_reference(fwd[0].flatten(0, 1))
        args = (gp, packed, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                c["shift"], fwd[2], fwd[3], *tail)
        return c, "bconv_lif_bwd_pool2", args, ref.bconv_lif_bwd_pool2_reference
    args = (gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], fwd[2],
            fwd[3], *tail)
    return c, "bconv_lif_bwd", args, ref.bconv_lif_bwd_reference


def _grads_close(out, want):
    for name, a, b in zip(("grad_x", "grad_weight", "grad_current", "grad_scale", "grad_shift"),
                          out, want):
        assert a.shape == b.shape, name
        err = float((a.double() - b.double()).norm())
        assert err <= 1e-4 * float(b.double().norm()) + 1e-6, f"{name}: error {err}"


@needs_cpu
@pytest.mark.parametrize("layer", sorted(RUN))
@pytest.mark.parametrize("field", ["grad_x", "grad_w"])
def test_forcing_a_backward_plan_runs_it_or_raises(layer, field, capfd):
    c, op, args, reference = _bwd_case(layer)
    x_shape, w_shape = _shapes(c)
    want_out = reference(*args)
    for name in _cpu_algos.CHOICES[field][1:]:
        with _forced(**{field: name}) as ok:
            if not ok:
                continue
            try:
                want = plan.backward_plan(x_shape, w_shape, c["stride"], c["padding"])
            except ValueError as e:
                assert "cannot run this call" in str(e) and f"'{name}'" in str(e)
                with pytest.raises(ValueError, match=re.escape(str(e).splitlines()[0])):
                    getattr(OPS, op)(*args)
                continue
            assert want[field] == name
            out, log = _logged(capfd, getattr(OPS, op), *args)
            assert [r["op"] for r in log] == [op]
            assert log[0][field] == name, (name, log)
            _grads_close(out, want_out)


@needs_cpu
@pytest.mark.parametrize("layer", sorted(RUN))
def test_the_plan_asked_for_is_the_plan_run(layer, capfd):
    """Under "auto", backward_plan / forward_plan from the shapes and the call's firing rate and
    weight density give the plan the op logs (the table's: measuring off)."""
    with plan.measure(False):
        _asked_is_run(layer, capfd)


def _asked_is_run(layer, capfd):
    c, op, args, _ = _bwd_case(layer)
    x_shape, w_shape = _shapes(c)
    rate = float(c["x"].double().mean())  # the fraction of spikes
    wbits = torch.tensor([bin(int(v) & 0xFFFFFFFF).count("1") for v in c["wm"].flatten()])
    density = float(wbits.sum()) / (w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3])
    _, log = _logged(capfd, getattr(OPS, op), *args)
    want = plan.backward_plan(x_shape, w_shape, c["stride"], c["padding"], rate=rate,
                              weight_density=min(1.0, density))
    assert {k: log[0][k] for k in want} == want and want["source"] == "table"
    _, log = _logged(capfd, OPS.bconv_lif, *_fwd_args(c, False))
    want = plan.forward_plan(x_shape, w_shape, c["stride"], c["padding"], rate=rate)
    assert {k: log[0][k] for k in want} == want


@needs_cpu
def test_forced_algorithms_are_never_rewritten():
    """Where a forced algorithm cannot run the call, the plan raises (with the reason) instead of
    taking another algorithm: the stride-1 forms at stride 2, the pointwise form off 1x1, the
    event forward with int32 counts."""
    x, w = (2, 2, 64, 9, 9), (32, 64, 3, 3)
    for field, name, why in (("grad_x", "margined", "stride 1"),
                             ("grad_x", "pointwise", "1x1 kernel"),
                             ("grad_w", "pointwise", "1x1 kernel")):
        with cpu_algorithms(**{field: name}):
            with pytest.raises(ValueError, match=f"'{name}' cannot run this call: .*{why}"):
                plan.backward_plan(x, w, 2 if "stride" in why else 1, 1)
    with cpu_algorithms(conv="event"):
        with pytest.raises(ValueError, match="'event' cannot run this call: .*int32"):
            plan.forward_plan((2, 2, 4096, 4, 4), (8, 4096, 3, 3), 1, 1)
    with cpu_algorithms(grad_x="dense"):  # the NCHW conv, also where "auto" takes "margined"
        assert plan.backward_plan((4, 16, 64, 32, 32), (64, 64, 3, 3), 1, 1)["grad_x"] == "dense"
    with cpu_algorithms(grad_w="taps"):  # the tap form of the dense gradient, nothing else
        assert plan.backward_plan(x, w, 1, 1)["grad_w"] == "taps"


# ----------------------------------------------------------------------------------------------
# The log
# ----------------------------------------------------------------------------------------------


@needs_cpu
def test_binslt_verbose_logs_one_line_per_call(monkeypatch, capfd):
    c = _case(RUN["anchor"])
    args = _fwd_args(c, False)
    monkeypatch.delenv("BINSLT_VERBOSE", raising=False)
    capfd.readouterr()
    OPS.bconv_lif(*args)
    assert "binslt_verbose" not in capfd.readouterr().err
    monkeypatch.setenv("BINSLT_VERBOSE", "1")  # read at each call
    out = OPS.bconv_lif(*args)
    bwd = OPS.bconv_lif_bwd(torch.ones_like(out[0]), out[1], c["xp"], c["wm"], c["wp"],
                            c["alpha"], c["scale"], c["shift"], out[2], out[3], None, c["Ci"],
                            1, 1, False, 1e-5, *NEURON, True, 0, 2.0, False)
    assert bwd[0].shape == (0,)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("binslt_verbose")]
    assert len(lines) == 2, err
    fwd_rec, bwd_rec = plan.parse_verbose(err)
    assert lines[0].startswith("binslt_verbose,cpu,bconv_lif,x=2x2x64x9x9 w=36x64x3x3 "
                               "stride=1 padding=1,isa=")
    assert fwd_rec["op"] == "bconv_lif" and fwd_rec["forward"] in {"dense", "event"}
    assert fwd_rec["isa"] == _ext.cpu_info()["kernel_isa"]
    assert float(fwd_rec["ms"]) >= 0.0
    assert bwd_rec["op"] == "bconv_lif_bwd" and bwd_rec["grad_x"] == "none"
    assert bwd_rec["grad_w"] in set(_cpu_algos.CHOICES["grad_w"][1:])
    monkeypatch.setenv("BINSLT_VERBOSE", "0")
    OPS.bconv_lif(*args)
    assert "binslt_verbose" not in capfd.readouterr().err


@needs_cpu
def test_verbose_context_manager(monkeypatch, capfd):
    monkeypatch.delenv("BINSLT_VERBOSE", raising=False)
    c = _case(RUN["pool2"])
    xf = c["x"].view(c["T"], c["N"], *c["x"].shape[1:])
    args = (xf, c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, 1, 1, *NEURON, 2,
            True)
    capfd.readouterr()
    with plan.verbose():
        OPS.bconv_lif_infer(*args)
        with plan.verbose(False):
            OPS.bconv_lif_infer(*args)
        OPS.bconv_lif_infer(*args)
    OPS.bconv_lif_infer(*args)
    recs = plan.parse_verbose(capfd.readouterr().err)
    assert len(recs) == 2
    assert all(r["op"] == "bconv_lif_infer" and "pool=2 packed_out" in r["shapes"] for r in recs)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh BINSLT_CACHE_DIR with nothing measured; the session's cache returns after."""
    before = os.environ.get("BINSLT_CACHE_DIR")
    os.environ["BINSLT_CACHE_DIR"] = str(tmp_path)
    plan.reload()
    try:
        yield tmp_path
    finally:
        if before is None:
            del os.environ["BINSLT_CACHE_DIR"]
        else:
            os.environ["BINSLT_CACHE_DIR"] = before
        plan.reload()


def _fwd_candidates(op, c):
    if op == "bconv_affine_infer":
        return {"aten"} | ({"onednn"} if AMX else set())
    event = {"event"} if c["Ci"] * 9 <= 32767 else set()
    return {"dense"} | event | ({"onednn"} if AMX and op == "bconv_lif_infer" else set())


def _affine_args(c, packed=False):
    x = c["xp"] if packed else c["x"]
    return (x, c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], c["stride"], c["padding"])


def _forward_calls(c):
    """(op, run, reference output) of each forward op on case c."""
    xf = c["x"].view(c["T"], c["N"], *c["x"].shape[1:])
    infer = (xf, c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["stride"],
             c["padding"], *NEURON, c["pool"], False)
    lif = _fwd_args(c, True)
    aff = _affine_args(c)
    return [("bconv_lif", lambda: OPS.bconv_lif(*lif), ref.bconv_lif_reference(*lif)),
            ("bconv_lif_infer", lambda: OPS.bconv_lif_infer(*infer),
             ref.bconv_lif_infer_reference(*infer)),
            ("bconv_affine_infer", lambda: OPS.bconv_affine_infer(*aff),
             ref.bconv_affine_infer_reference(*aff))]


def _same_forward(op, out, want):
    if op == "bconv_lif":
        assert torch.equal(out[1], want[1])  # counts
        _spikes_agree(out[0], want[0])
    elif op == "bconv_lif_infer":
        _spikes_agree(out, want)
    else:
        assert torch.equal(out, want)


@needs_cpu
@pytest.mark.parametrize("layer", sorted(RUN))
def test_a_measured_forward_is_a_candidate_with_the_reference_result(layer, cache_dir, capfd):
    """The first call of a key times the candidates ("measuring"), the next takes the cached
    winner ("measured"); both are one of the call's candidates and give the reference's output
    (the forward algorithms are bit-identical, so the outputs are too). With one candidate
    (BinConv2d's op without AMX-INT8: "aten") nothing is timed."""
    c = _case(RUN[layer], seed=2)
    timed = set()
    with plan.measure("forward"):
        for op, run, want in _forward_calls(c):
            first, log1 = _logged(capfd, run)
            second, log2 = _logged(capfd, run)
            assert [r["op"] for r in log1 + log2] == [op, op]
            sources = ("measuring", "measured") if len(_fwd_candidates(op, c)) > 1 else (
                "table", "table")
            assert (log1[0]["source"], log2[0]["source"]) == sources, op
            if sources[0] == "measuring":
                timed.add(op)
            assert log1[0]["forward"] == log2[0]["forward"]
            assert log1[0]["forward"] in _fwd_candidates(op, c), (op, log1)
            _same_forward(op, first, want)
            _same_forward(op, second, want)
            assert torch.equal(first[0] if op == "bconv_lif" else first,
                               second[0] if op == "bconv_lif" else second)
    keys = plan.measured()
    assert len(keys) == len(timed) and {k.split(" ")[0] for k in keys} == timed
    assert {"bconv_lif", "bconv_lif_infer"} <= timed
    for e in keys.values():
        # the fastest, or the table's choice within 5 % of it
        assert e["plan"] in e["ms"] and e["ms"][e["plan"]] <= 1.05 * min(e["ms"].values())


@needs_cpu
@pytest.mark.parametrize("layer", sorted(RUN))
def test_a_measured_backward_is_a_candidate_with_the_reference_result(layer, cache_dir, capfd):
    c, op, args, reference = _bwd_case(layer)
    want_out = reference(*args)
    with plan.measure(True):
        out1, log1 = _logged(capfd, getattr(OPS, op), *args)
        out2, log2 = _logged(capfd, getattr(OPS, op), *args)
    assert log1[0]["source"] == "measuring" and log2[0]["source"] == "measured", (log1, log2)
    assert {k: log1[0][k] for k in ("grad_x", "grad_w")} == {
        k: log2[0][k] for k in ("grad_x", "grad_w")}
    parts = {k.split(" ")[0] + k.split(" ")[1]: e for k, e in plan.measured().items()
             if k.startswith(op + " ")}
    assert set(parts) == {op + "grad_x", op + "grad_w"}
    for field in ("grad_x", "grad_w"):
        e = parts[op + field]
        assert log1[0][field] == e["plan"] and e["plan"] in e["ms"], (field, e)
        # with a bf16 matrix engine (AMX-BF16) the split-precision form is timed too
        assert ("bf16x3" in e["ms"]) == BF16_MATRIX, (field, e)
        for name in e["ms"]:  # each timed candidate is one a forced choice runs here
            with cpu_algorithms(**{field: name}):
                assert plan.backward_plan(*_shapes(c), c["stride"], c["padding"])[field] == name
    _grads_close(out1, want_out)
    _grads_close(out2, want_out)
    for a, b in zip(out1, out2):  # the cached winner: the same algorithm, the same bits
        assert torch.equal(a, b)


@needs_cpu
def test_measure_mode_default_opt_out_and_env(monkeypatch, cache_dir, capfd):
    """The default measures the forward ops only; BINSLT_PLAN_MEASURE (read at each call) and
    plan.measure() switch it; off, the table decides and nothing is recorded."""
    monkeypatch.delenv("BINSLT_PLAN_MEASURE", raising=False)
    assert plan.measure_mode() == "forward"
    c, op, args, _ = _bwd_case("anchor")
    _, log = _logged(capfd, getattr(OPS, op), *args)
    assert log[0]["source"] == "table"  # the backward does not measure by default
    for value, mode in (("0", "off"), ("off", "off"), ("1", "all"), ("all", "all"),
                        ("forward", "forward")):
        monkeypatch.setenv("BINSLT_PLAN_MEASURE", value)
        assert plan.measure_mode() == mode
    monkeypatch.setenv("BINSLT_PLAN_MEASURE", "0")
    lif = _fwd_args(c, False)  # (the case's bn_train forward was measured above: another key)
    before = plan.measured()
    _, log = _logged(capfd, OPS.bconv_lif, *lif)
    assert log[0]["source"] == "table" and plan.measured() == before
    with plan.measure("forward"):  # over the environment
        assert plan.measure_mode() == "forward"
        _, log = _logged(capfd, OPS.bconv_lif, *lif)
        assert log[0]["source"] == "measuring"
        with plan.measure(False):
            _, log = _logged(capfd, OPS.bconv_lif, *lif)
            assert log[0]["source"] == "table"
    assert plan.measure_mode() == "off"
    with cpu_algorithms(conv="dense"), plan.measure(True):  # a forced choice is never measured
        _, log = _logged(capfd, OPS.bconv_lif, *lif)
        assert log[0]["source"] == "forced" and log[0]["forward"] == "dense"
    with pytest.raises(ValueError, match="mode must be"):
        with plan.measure("sometimes"):
            pass
    monkeypatch.setenv("BINSLT_PLAN_MEASURE", "sometimes")  # warned about once, the default
    assert plan.measure_mode() == "forward"


@needs_cpu
def test_the_cache_file_is_keyed_by_cpu_and_build_and_reloaded(cache_dir, capfd, monkeypatch):
    c = _case(RUN["anchor"])
    lif = _fwd_args(c, False)
    with plan.measure("forward"):
        _logged(capfd, OPS.bconv_lif, *lif)
    path = plan.cache_path()
    assert path.parent == cache_dir and path.name.startswith("plans-")
    data = json.loads(path.read_text())
    assert data["format"] == 1 and list(data["plans"]) == list(plan.measured())
    cpu, build = plan._identity()
    assert (data["cpu"], data["build"]) == (cpu, build)
    from binslt.ops.fallback import cpu_model
    assert cpu.startswith(cpu_model() + " [")
    assert all(f in cpu for f, on in _ext.cpu_info()["features"].items() if on)
    import binslt
    assert f"binslt {binslt.__version__} {Path(CPU.__file__).name}" in build
    (key, entry), = plan.measured().items()
    assert key.startswith("bconv_lif x=2x2x64x9x9 w=36x64x3x3 stride=1 padding=1 bn_eval isa=")
    assert f"threads={torch.get_num_threads()} r0.15-0.20" in key  # 0.3 * 40 / 64 bits set
    # a reload reads it back, and a cache hit takes the file's winner (here: the other one)
    other = next(n for n in entry["ms"] if n != entry["plan"])
    data["plans"][key]["plan"] = other
    path.write_text(json.dumps(data))
    plan.reload()
    assert plan.measured()[key]["plan"] == other
    with plan.measure("forward"):
        _, log = _logged(capfd, OPS.bconv_lif, *lif)
    assert (log[0]["forward"], log[0]["source"]) == (other, "measured")
    # another CPU or build: another file
    monkeypatch.setattr(plan, "_identity", lambda: ("Another CPU [avx2]", build))
    assert plan.cache_path() != path
    monkeypatch.setattr(plan, "_identity", lambda: (cpu, build + " rebuilt"))
    assert plan.cache_path() != path
    monkeypatch.undo()
    # a file that says it holds for another CPU is not read
    data["cpu"] = "Another CPU"
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="another CPU or build"):
        plan.reload()
    assert plan.measured() == {}


@needs_cpu
def test_a_winner_that_is_not_a_candidate_is_measured_again(cache_dir, capfd):
    c = _case(RUN["anchor"])
    lif = _fwd_args(c, False)
    with plan.measure("forward"):
        _logged(capfd, OPS.bconv_lif, *lif)
        path = plan.cache_path()
        data = json.loads(path.read_text())
        (key,) = data["plans"]
        data["plans"][key]["plan"] = "aten"  # a name, but not a candidate of bconv_lif
        path.write_text(json.dumps(data))
        plan.reload()
        _, log = _logged(capfd, OPS.bconv_lif, *lif)
    assert log[0]["source"] == "measuring" and log[0]["forward"] in {"dense", "event"}
    assert plan.measured()[key]["plan"] == log[0]["forward"]


@needs_cpu
@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 2}',
                                     '{"format": 1, "cpu": 1}', "BAD"])
def test_a_corrupt_cache_file_is_ignored_with_one_warning(content, cache_dir, capfd):
    path = plan.cache_path()
    if content == "BAD":  # an entry with a name no algorithm has
        cpu, build = plan._identity()
        content = json.dumps({"format": 1, "cpu": cpu, "build": build,
                              "plans": {"bconv_lif x": {"plan": "os.system", "ms": {}}}})
    path.write_text(content)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plan.reload()
    assert [str(w.message).startswith("binslt: ignoring the measured CPU plans") for w in seen] \
        == [True]
    assert plan.measured() == {}
    c = _case(RUN["anchor"])
    with plan.measure("forward"):
        _, log = _logged(capfd, OPS.bconv_lif, *_fwd_args(c, False))
    assert log[0]["source"] == "measuring"
    assert len(json.loads(path.read_text())["plans"]) == 1  # rewritten whole
    assert not list(cache_dir.glob("*.tmp*"))


@needs_cpu
def test_the_rate_bucket_is_part_of_the_key(cache_dir, capfd):
    assert CPU._rate_bucket(0.0) == "r0.00-0.02" and CPU._rate_bucket(0.12) == "r0.10-0.15"
    assert CPU._rate_bucket(1.0) == "r0.70-1.00"
    c = _case(RUN["anchor"])
    dense_in = dict(c, xp=ref.pack_spikes_reference(torch.ones_like(c["x"])))
    with plan.measure("forward"):
        _logged(capfd, OPS.bconv_lif, *_fwd_args(c, False))
        _, log = _logged(capfd, OPS.bconv_lif, *_fwd_args(dense_in, False))
    assert log[0]["source"] == "measuring"
    assert len(plan.measured()) == 2


@needs_cpu
def test_binconv2d_op_asks_the_plan(capfd):
    """bconv_affine_infer (BinConv2d's no-grad op) runs the plan's choice and logs it: "onednn"
    with AMX-INT8, ATen's conv ("aten") otherwise, or what is forced."""
    c = _case(RUN["stride2"])
    x_shape, w_shape = _shapes(c)
    x_shape = (1, c["x"].shape[0]) + x_shape[2:]
    table = "onednn" if AMX else "aten"
    assert plan.forward_plan(x_shape, w_shape, 2, 1, op="bconv_affine_infer") == {
        "isa": _ext.cpu_info()["kernel_isa"], "forward": table, "source": "table"}
    want = ref.bconv_affine_infer_reference(*_affine_args(c))
    with plan.measure(False):
        for packed in (False, True):
            out, log = _logged(capfd, OPS.bconv_affine_infer, *_affine_args(c, packed))
            assert torch.equal(out, want)
            assert [r["op"] for r in log] == ["bconv_affine_infer"]
            assert (log[0]["forward"], log[0]["source"]) == (table, "table")
            ci = 64 if packed else 40  # packed words: 32 channels each
            assert log[0]["shapes"].startswith(f"x=1x{c['x'].shape[0]}x{ci}x9x9 w=36x{ci}x3x3")
        for forced in ("dense", "event") + (("onednn",) if AMX else ()):
            with cpu_algorithms(conv=forced):
                got = plan.forward_plan(x_shape, w_shape, 2, 1, op="bconv_affine_infer")
                out, log = _logged(capfd, OPS.bconv_affine_infer, *_affine_args(c))
            name = "onednn" if forced == "onednn" else "aten"
            assert got["forward"] == log[0]["forward"] == name and torch.equal(out, want)
    with pytest.raises(ValueError, match="op must be one of"):
        plan.forward_plan(x_shape, w_shape, 2, 1, op="bconv")


# ----------------------------------------------------------------------------------------------
# The C++ sources: at most 10 parameters, except the ops' registered entry points
# ----------------------------------------------------------------------------------------------

_NOT_NAMES = {"if", "for", "while", "switch", "catch", "return", "sizeof", "decltype", "alignof",
              "static_assert", "defined", "__attribute__", "alignas", "noexcept", "throw",
              "__launch_bounds__", "TORCH_LIBRARY_IMPL", "TORCH_LIBRARY", "PYBIND11_MODULE"}


def _blank(src: str) -> str:
    """Comments, string / char literals and preprocessor lines blanked (offsets kept)."""
    def keep_lines(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    src = re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', keep_lines,
                 src, flags=re.S)
    return re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", keep_lines, src, flags=re.M)


def _params(text: str, i: int) -> tuple[int, int]:
    """text[i] == '(' -> (index after the matching ')', its top-level comma-separated items)."""
    depth, items, nonblank = 0, 0, False
    for j in range(i, len(text)):
        ch = text[j]
        if ch in "([{<":
            depth += 1
            if depth > 1:
                nonblank = True
        elif ch in ")]}>":
            depth -= 1
            if depth == 0:
                return j + 1, items + (1 if nonblank else 0)
        elif ch == "," and depth == 1:
            items, nonblank = items + 1, False
        elif not ch.isspace():
            nonblank = True
    return len(text), 0


def _functions(path: Path):
    """(name, parameters, line) of every function definition or declaration in a C++ / CUDA
    source: a name and a parameter list after a type, followed by a body, ';' or an
    initialiser list (calls are told apart by what precedes them)."""
    src = _blank(path.read_text())
    for m in re.finditer(r"([A-Za-z_~][A-Za-z_0-9:]*)\s*\(", src):
        name = m.group(1)
        if name.split("::")[-1] in _NOT_NAMES:
            continue
        end, n = _params(src, m.end() - 1)
        if not re.match(r"\s*(?:const\s*)?(?:noexcept\s*)?(?:override\s*)?(?:->\s*[\w:<>, ]+)?"
                        r"\s*(\{|;|:(?!:))", src[end:end + 200]):
            continue
        before = re.sub(r"__attribute__\s*\(\(.*?\)\)\s*$", "",
                        src[max(0, m.start() - 200):m.start()].rstrip())
        prev = re.search(r"([\w>*&:]+)\s*$", before)
        if not prev or prev.group(1) in ("return", "else", "new", "delete", "case", "do",
                                         "throw", "co_return"):
            continue
        yield name, n, src.count("\n", 0, m.start()) + 1


def _entry_points(sources) -> set[str]:
    """The functions bound to ops: m.impl("op", &ns::fn) in TORCH_LIBRARY_IMPL blocks."""
    out = set()
    for path in sources:
        for m in re.finditer(r'm\.impl\(\s*"(\w+)"\s*,\s*&([\w:]+)\s*\)', path.read_text()):
            out.add(m.group(2).split("::")[-1])
    return out


def _sources():
    return sorted(p for ext in ("*.cpp", "*.cu", "*.h", "*.cuh")
                  for p in (ROOT / "csrc").rglob(ext))


def test_no_cpp_function_but_an_op_entry_point_takes_more_than_10_parameters():
    sources = _sources()
    assert any(p.suffix == ".cu" for p in sources) and any(p.suffix == ".h" for p in sources)
    entries = _entry_points(sources)
    assert {"bconv_lif_cpu", "bconv_lif_bwd_cpu", "bconv_lif_cuda"} <= entries
    found, over = set(), []
    for path in sources:
        for name, n, line in _functions(path):
            found.add(name)
            if n > 10 and name.split("::")[-1] not in entries:
                over.append(f"{path.relative_to(ROOT)}:{line}: {name} takes {n} parameters")
    # the scan sees the functions it must (a template, an attribute-marked and a CUDA one)
    assert {"lif_counts", "lif_backward_row", "plan_backward", "bconv_lif_run"} <= found
    assert not over, "\n".join(over)


def test_each_op_entry_point_takes_its_schema_arguments():
    schemas = {**SCHEMAS, **WEIGHT_SCHEMAS, **AUX_SCHEMAS}
    n_args = {}
    for name, schema in schemas.items():
        inner = schema[schema.index("(") + 1:schema.index(") ->")]
        n_args[name] = len([a for a in inner.split(",") if a.strip()])
    checked = 0
    for path in _sources():
        text = path.read_text()
        params = {name: n for name, n, _ in _functions(path)}
        for m in re.finditer(r'm\.impl\(\s*"(\w+)"\s*,\s*&([\w:]+)\s*\)', text):
            op, fn = m.group(1), m.group(2).split("::")[-1]
            if fn in params and op in n_args:
                assert params[fn] == n_args[op], f"{path.name}: {fn} takes {params[fn]} " \
                    f"parameters, the schema of {op} {n_args[op]}"
                checked += 1
    assert checked >= 10
