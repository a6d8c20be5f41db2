"""The op contract: every backend gives the same error for the same bad argument.

The same bad arguments (every row of the contract table that applies to an op) go through the
reference (``binslt.reference.REFERENCE_OPS``), the CPU kernel (``torch.ops.binslt.<op>`` on CPU
tensors), the Triton op (``torch.ops.binslt.<op>_triton``; on CUDA tensors where a GPU is
visible, else on CPU tensors under TRITON_INTERPRET=1) and, with a GPU, the CUDA kernel. Each
must raise the same exception type with the same message up to and including ``got `` (C++ and
Python may print a float differently after it); messages without a ``got `` part are compared whole. The layer-level
checks (backend, prune rate, tau) give one message wherever they are made.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import backend_device, triton_param

import binslt
import binslt.nn.models as M
from binslt import ops
from binslt.ops import contract as C
from binslt.ops import reference as ref

BACKENDS = [
    pytest.param("torch", id="reference"),
    pytest.param("cpu", id="cpu"),
    triton_param(),  # CUDA tensors where a GPU is visible, else the interpreter on the CPU
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]

# The smallest problem: T = 2, N = 1, 3 input channels (one word), 2 output channels, 3x3 input,
# 3x3 kernel with padding 1 (3x3 output).
T, N, CI, CO, H, K = 2, 1, 3, 2, 3, 3
OUT = (T, N, CO, H, H)


def _i32(*shape):
    return torch.zeros(shape, dtype=torch.int32)


def _vec(c=CO, dtype=torch.float32):
    return torch.ones(c, dtype=dtype)


def _bconv_args():
    return dict(x_packed=_i32(T * N, H, H, 1), w_mask=_i32(CO, K, K, 1), w_pos=_i32(CO, K, K, 1),
                alpha=_vec(), scale=_vec(), shift=_vec(), residual=None, T=T, stride=1,
                padding=1, bn_train=False, bn_eps=1e-5, tau=2.0, decay_input=True,
                v_threshold=1.0, v_reset=0.0)


def _bconv_infer_args():
    a = _bconv_args()
    for k in ("x_packed", "T", "bn_train", "bn_eps"):
        del a[k]
    return dict(x=torch.zeros(T, N, CI, H, H), **a, pool=1, packed_out=False)


def _bconv_bwd_args():
    a = _bconv_args()
    del a["T"]
    return dict(grad_spikes=torch.zeros(OUT), counts=torch.zeros(OUT, dtype=torch.int16),
                x_packed=a.pop("x_packed"), w_mask=a.pop("w_mask"), w_pos=a.pop("w_pos"),
                alpha=a.pop("alpha"), scale=a.pop("scale"), shift=a.pop("shift"), mean=_vec(),
                var=_vec(), residual=a.pop("residual"), in_channels=CI, **a,
                detach_reset=False, surrogate=0, surrogate_alpha=2.0, need_grad_x=True)


def _bn_lif_args():
    return dict(z=torch.zeros(OUT), scale=_vec(), shift=_vec(), residual=None, bn_train=False,
                bn_eps=1e-5, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0)


def _bn_lif_bwd_args():
    a = _bn_lif_args()
    return dict(grad_spikes=torch.zeros(OUT), z=a.pop("z"), scale=a.pop("scale"),
                shift=a.pop("shift"), mean=_vec(), var=_vec(), residual=a.pop("residual"), **a,
                detach_reset=False, surrogate=0, surrogate_alpha=2.0)


ARGS = {
    "bconv_lif": _bconv_args,
    "bconv_lif_infer": _bconv_infer_args,
    "bconv_lif_bwd": _bconv_bwd_args,
    "bn_lif": _bn_lif_args,
    "bn_lif_bwd": _bn_lif_bwd_args,
}
NAN, INF = math.nan, math.inf


def _scalar_rows(names):
    """(case id, changes, exception, message) for the scalar rows that apply to an op."""
    table = {
        "tau": [(v, "tau must be finite and > 0 (or +inf with decay_input=False: IF), got ")
                for v in (0.0, -1.0, NAN, -INF)]
        # the base arguments have decay_input=True: +inf there would be H = V
        + [(INF, "tau=inf (an IF neuron, no leak) needs decay_input=False: with "
                 "decay_input=True H = V and the input never reaches the neuron, got "
                 "decay_input=True")],
        "v_threshold": [(v, "v_threshold must be finite, got ") for v in (NAN, INF)],
        "v_reset": [(v, "v_reset must be None (soft reset) or finite, got ") for v in (NAN, -INF)],
        "bn_eps": [(v, "bn_eps must be finite and > 0, got ") for v in (0.0, -1e-5, NAN)],
        "surrogate": [(v, "surrogate must be 0 (atan), 1 (sigmoid), 2 (rect) or 3 "
                          "(piecewise_quadratic), got ") for v in (4, -1)],
        "surrogate_alpha": [(v, "surrogate_alpha must be finite and > 0, got ")
                            for v in (0.0, NAN)],
        "stride": [(0, "stride must be >= 1, got ")],
        "padding": [(-1, "padding must be >= 0, got ")],
    }
    return [(f"{n}={v}", {n: v}, ValueError, msg) for n in names for v, msg in table[n]]


def _vec_rows(names):
    rows = []
    for n in names:
        shape_msg = (f"{n} must have shape [{CO}] (one value per output channel), got ")
        rows.append((f"{n} length", {n: _vec(CO + 1)}, ValueError, shape_msg))
        rows.append((f"{n} 2-d", {n: _vec()[None]}, ValueError, shape_msg))
        rows.append((f"{n} int", {n: torch.ones(CO, dtype=torch.int64)}, TypeError,
                     f"{n} must be a floating tensor, got "))
    return rows


def _weight_rows(x_name):
    return [
        ("w_pos shape", dict(w_pos=_i32(CO, K, K - 1, 1)), ValueError,
         "w_mask and w_pos must have the same shape, got "),
        ("channel words", dict(w_mask=_i32(CO, K, K, 2), w_pos=_i32(CO, K, K, 2)), ValueError,
         f"the weight has 2 words per position but {x_name} has 1 (pack both with the same "
         "in_channels)"),
    ]


_SMALL = "input 2x2 is smaller than the kernel 3x3 with padding 0"
_RES_MSG = f"residual must have shape {list(OUT)}, got "
_BAD_RES = torch.zeros(T, N, CO, H, H - 1)

ROWS = {
    "bconv_lif": _scalar_rows(["tau", "v_threshold", "v_reset", "bn_eps", "stride", "padding"])
    + [
        ("T=3", dict(T=3), ValueError, "T=3 must be >= 1 and divide the packed batch T*N=2"),
        ("T=0", dict(T=0), ValueError, "T=0 must be >= 1 and divide the packed batch T*N=2"),
        ("output size", dict(x_packed=_i32(T * N, 2, 2, 1), padding=0), ValueError, _SMALL),
        ("residual shape", dict(residual=_BAD_RES), ValueError, _RES_MSG),
    ] + _vec_rows(["alpha", "scale", "shift"]) + _weight_rows("x_packed"),
    "bconv_lif_infer": _scalar_rows(["tau", "v_threshold", "v_reset", "stride", "padding"])
    + [
        ("output size", dict(x=torch.zeros(T, N, CI, 2, 2), padding=0), ValueError, _SMALL),
        ("residual shape", dict(residual=_BAD_RES), ValueError, _RES_MSG),
        ("x rank", dict(x=torch.zeros(T, N, CI, H)), ValueError,
         "x must be spikes [T, N, C, H, W] (or packed words [T, N, H, W, Cw] int32), got "),
        ("x dtype", dict(x=torch.zeros(T, N, CI, H, H, dtype=torch.int64)), TypeError,
         "x must be floating-point spikes (0. or 1.) or packed int32 words, got "),
        ("pool=3", dict(pool=3), ValueError, "pool must be 1 or 2, got "),
        ("pool=0", dict(pool=0), ValueError, "pool must be 1 or 2, got "),
        ("pool size", dict(x=torch.zeros(T, N, CI, 1, 3), pool=2), ValueError,
         "pool=2 needs a conv output of at least 2x2, got "),
        ("channel words (packed x)", dict(x=_i32(T, N, H, H, 2)), ValueError,
         "the weight has 1 words per position but x has 2 (pack both with the same "
         "in_channels)"),
    ] + _vec_rows(["alpha", "scale", "shift"]) + _weight_rows("x"),
    "bconv_lif_bwd": _scalar_rows(["tau", "v_threshold", "v_reset", "bn_eps", "surrogate",
                                   "surrogate_alpha", "stride", "padding"])
    + [
        ("T=3", dict(counts=torch.zeros(3, N, CO, H, H, dtype=torch.int16),
                     grad_spikes=torch.zeros(3, N, CO, H, H)), ValueError,
         "T=3 must be >= 1 and divide the packed batch T*N=2"),
        ("output size", dict(x_packed=_i32(T * N, 2, 2, 1), padding=0), ValueError, _SMALL),
        ("residual shape", dict(residual=_BAD_RES), ValueError, _RES_MSG),
    ] + _vec_rows(["alpha", "scale", "shift", "mean", "var"]) + _weight_rows("x_packed"),
    "bn_lif": _scalar_rows(["tau", "v_threshold", "v_reset", "bn_eps"])
    + [("residual shape", dict(residual=_BAD_RES), ValueError, _RES_MSG)]
    + _vec_rows(["scale", "shift"]),
    "bn_lif_bwd": _scalar_rows(["tau", "v_threshold", "v_reset", "bn_eps", "surrogate",
                                "surrogate_alpha"])
    + [("residual shape", dict(residual=_BAD_RES), ValueError, _RES_MSG)]
    + _vec_rows(["scale", "shift", "mean", "var"]),
}

CASES = [pytest.param(op, row[1], row[2], row[3], id=f"{op}-{row[0]}")
         for op, rows in ROWS.items() for row in rows]


def _op(name: str, backend: str):
    return ops.get_op(name, backend)  # triton: loads binslt::<op>_triton first


def _call(name: str, backend: str, args):
    """The op on ``backend`` with ``args`` (a sequence, in schema order), on its device."""
    dev = backend_device(backend)
    return _op(name, backend)(*[a.to(dev) if isinstance(a, torch.Tensor) else a for a in args])


def _expected(op: str, message: str) -> str:
    """The text compared: up to and including 'got ', or the whole message."""
    full = f"binslt::{op}: {message}"
    return full[:full.index("got ") + 4] if "got " in full else full


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, changes, exc, message", CASES)
def test_bad_argument_same_error_on_every_backend(backend, op, changes, exc, message):
    args = ARGS[op]()
    args.update(changes)
    with pytest.raises(Exception) as ei:
        _call(op, backend, list(args.values()))
    want = _expected(op, message)
    got = str(ei.value)
    assert type(ei.value) is exc and got.startswith(want), (
        f"{backend} {op}: expected {exc.__name__}({want!r}...), got "
        f"{type(ei.value).__name__}({got!r})")


def test_every_contract_row_is_driven():
    """Each op is driven through every row of the contract table that applies to it."""
    ids = {op: {c.id.split("-", 1)[1].split("=")[0].split(" ")[0] for c in CASES
                if c.id.startswith(op + "-")} for op in ROWS}
    common = {"tau", "v_threshold", "v_reset", "residual", "scale", "shift"}
    bconv = common | {"stride", "padding", "output", "alpha", "w_pos", "channel"}
    want = {
        "bconv_lif": bconv | {"bn_eps", "T"},
        "bconv_lif_infer": bconv | {"x", "pool"},
        "bconv_lif_bwd": bconv | {"bn_eps", "T", "surrogate", "surrogate_alpha", "mean", "var"},
        "bn_lif": common | {"bn_eps"},
        "bn_lif_bwd": common | {"bn_eps", "surrogate", "surrogate_alpha", "mean", "var"},
    }
    assert ids == want


# ---------------------------------------------------------------------------------------------
# Per-channel vectors of any floating dtype are converted to float32 on every backend
# ---------------------------------------------------------------------------------------------


def _problem(gen):
    x = (torch.rand(T * N, CI, H, H, generator=gen) < 0.5).float()
    w = torch.sign(torch.randn(CO, CI, K, K, generator=gen)) * (
        torch.rand(CO, CI, K, K, generator=gen) < 0.7)
    xp = ref.pack_spikes_reference(x)
    wm, wp = ref.pack_weight_reference(w)
    alpha = torch.rand(CO, generator=gen) + 0.5
    scale = torch.rand(CO, generator=gen) + 0.5
    shift = torch.randn(CO, generator=gen) * 0.1
    return xp, wm, wp, alpha, scale, shift


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_per_channel_vectors_of_any_float_dtype(backend, dtype):
    """alpha, scale and shift in float64 or float16 give the float32 result of their float32
    values (float16 values rounded first): every backend converts them to float32."""
    gen = torch.Generator().manual_seed(7)
    xp, wm, wp, alpha, scale, shift = _problem(gen)
    alpha, scale, shift = (v.to(dtype).float() for v in (alpha, scale, shift))
    rest = (None, T, 1, 1, False, 1e-5, 2.0, True, 1.0, 0.0)
    f32 = _call("bconv_lif", backend, (xp, wm, wp, alpha, scale, shift) + rest)
    other = _call("bconv_lif", backend,
                  (xp, wm, wp, alpha.to(dtype), scale.to(dtype), shift.to(dtype)) + rest)
    for a, b in zip(f32, other):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    assert f32[0].dtype == torch.float32 and f32[0].sum() > 0  # spikes, not an all-zero output
    z = torch.randn(OUT, generator=gen) + 0.8
    zrest = (None, False, 1e-5, 2.0, True, 1.0, 0.0)
    s32 = _call("bn_lif", backend, (z, scale, shift) + zrest)
    s_other = _call("bn_lif", backend, (z, scale.to(dtype), shift.to(dtype)) + zrest)
    for a, b in zip(s32, s_other):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    assert s32[0].sum() > 0


# ---------------------------------------------------------------------------------------------
# Layer-level checks: one message wherever they are made
# ---------------------------------------------------------------------------------------------

_BACKEND_MSG = ("backend must be one of ('auto', 'torch', 'cpu', 'triton', 'cuda'), "
                "got 'gpu'")
_PRUNE_MSG = "prune_rate is the fraction of weights removed and must be in [0, 1), got 1.0"


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(2))


@pytest.mark.parametrize("where", ["use_backend", "resolve_backend", "BinSpikeConv2d",
                                   "BinSpikeLinear", "LIF", "build", "set_backend", "convert"])
def test_backend_check_is_one_message(where):
    calls = {
        "use_backend": lambda: binslt.use_backend("gpu").__enter__(),
        "resolve_backend": lambda: ops.resolve_backend("gpu", torch.device("cpu")),
        "BinSpikeConv2d": lambda: binslt.BinSpikeConv2d(4, 3, 3, backend="gpu"),
        "BinSpikeLinear": lambda: binslt.BinSpikeLinear(4, 3, backend="gpu"),
        "LIF": lambda: binslt.LIF(backend="gpu"),
        "build": lambda: M.build("conv4", "snn", backend="gpu"),
        "set_backend": lambda: M.set_backend(torch.nn.Sequential(), "gpu"),
        "convert": lambda: binslt.convert(_Net(), backend="gpu"),
    }
    with pytest.raises(ValueError) as ei:
        calls[where]()
    assert str(ei.value) == _BACKEND_MSG


@pytest.mark.parametrize("where", ["num_pruned", "BinSpikeConv2d", "BinConv2d", "build",
                                   "convert"])
def test_prune_rate_check_is_one_message(where):
    calls = {
        "num_pruned": lambda: ref.num_pruned(10, 1.0),
        "BinSpikeConv2d": lambda: binslt.BinSpikeConv2d(4, 3, 3, prune_rate=1.0),
        "BinConv2d": lambda: binslt.BinConv2d(4, 3, 3, prune_rate=1.0),
        "build": lambda: M.build("conv4", "bnn", prune_rate=1.0),
        "convert": lambda: binslt.convert(_Net(), prune_rate=1.0),
    }
    with pytest.raises(ValueError) as ei:
        calls[where]()
    assert str(ei.value) == _PRUNE_MSG


@pytest.mark.parametrize("tau", [NAN, -1.0, 0.0])
def test_layer_tau_uses_the_op_rule(tau):
    with pytest.raises(ValueError) as ei:
        binslt.BinSpikeConv2d(4, 3, 3, tau=tau)
    assert str(ei.value).startswith("binslt::BinSpikeConv2d: tau must be finite and > 0 (or "
                                    "+inf with decay_input=False: IF), got ")
    with pytest.raises(ValueError, match=r"tau must be >= 1 \(lambda"):
        binslt.BinSpikeLinear(4, 3, tau=0.5)  # a layer also needs SpikingJelly's tau >= 1


def test_shared_rules():
    assert C.counts_dtype(_i32(1, 1, 1, 1023)) == torch.int16  # 32 * 1023 = 32736
    assert C.counts_dtype(_i32(1, 1, 1, 1024)) == torch.int32  # 32768 does not fit
    assert C.counts_dtype(_i32(1, 3, 3, 113)) == torch.int16  # 32 * 9 * 113 = 32544
    assert C.counts_dtype(_i32(1, 3, 3, 114)) == torch.int32
    for h, k, s, p in [(5, 3, 1, 0), (5, 3, 2, 1), (8, 1, 3, 0), (4, 5, 1, 2), (7, 7, 2, 3)]:
        want = torch.nn.functional.conv2d(torch.zeros(1, 1, h, h + 1),
                                          torch.zeros(1, 1, k, k), stride=s, padding=p).shape
        assert C.out_hw(h, h + 1, k, k, s, p) == tuple(want[2:])


# ---------------------------------------------------------------------------------------------
# tau = +inf with decay_input=False: the IF neuron (H = V + X), accepted by every op
# ---------------------------------------------------------------------------------------------


def _assert_same(a, b) -> None:
    """Equal outputs: integer tensors (and spikes, 0/1) exactly, float gradients to float32
    rounding (the kernels sum in their own order)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a.cpu(), b.cpu())
    else:
        assert a == b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(ARGS))
def test_tau_inf_without_decay_input_is_accepted(backend, op):
    """Every op runs tau=inf when decay_input is False, and gives the reference's result."""
    gen = torch.Generator().manual_seed(3)
    args = ARGS[op]()
    args.update(tau=INF, decay_input=False)
    for k in ("z", "grad_spikes"):  # a current that fires, and a gradient that flows
        if k in args:
            args[k] = torch.randn(args[k].shape, generator=gen) + 0.8
    got = _call(op, backend, list(args.values()))
    _assert_same(got, _call(op, "torch", list(args.values())))


@pytest.mark.parametrize("where", ["NeuronConfig", "BinSpikeConv2d", "BinSpikeLinear", "LIF",
                                   "build"])
@pytest.mark.parametrize("given, text", [(dict(tau=2.0), "tau=2.0"), (dict(decay=0.9), "decay=0.9"),
                                         (dict(decay_input=True), "decay_input=True")])
def test_if_refuses_leak_settings(where, given, text):
    calls = {
        "NeuronConfig": lambda: binslt.nn.layers.NeuronConfig(neuron="if", who="NeuronConfig",
                                                           **given),
        "BinSpikeConv2d": lambda: binslt.BinSpikeConv2d(4, 3, 3, neuron="if", **given),
        "BinSpikeLinear": lambda: binslt.BinSpikeLinear(4, 3, neuron="if", **given),
        "LIF": lambda: binslt.LIF(neuron="if", **given),
        "build": lambda: M.build("conv4", "binwslt", neuron="if", **given),
    }
    with pytest.raises(ValueError) as ei:
        calls[where]()
    assert str(ei.value) == (f"{where}: neuron='if' has no leak (H = V + X) and takes no tau, "
                             f"decay or decay_input=True; drop them or use neuron='lif', got "
                             f"{text}")


def test_if_neuron_names():
    with pytest.raises(ValueError, match=r"neuron must be one of \('lif', 'if'\), got 'IF'"):
        binslt.BinSpikeConv2d(4, 3, 3, neuron="IF")
    with pytest.raises(ValueError, match=r"neuron must be one of \('lif', 'if'\), got 'alif'"):
        M.build("conv4", "snn", neuron="alif")
    # a layer says IF as neuron="if", not as tau=inf
    with pytest.raises(ValueError, match=r"tau=inf is the IF neuron .*neuron='if'"):
        binslt.BinSpikeConv2d(4, 3, 3, tau=INF, decay_input=False)
    cfg = binslt.nn.layers.NeuronConfig(neuron="if", decay_input=False)  # False is harmless
    assert (cfg.tau, cfg.decay_input, cfg.neuron) == (INF, False, "if")
    assert "neuron=IF" in repr(binslt.LIF(neuron="if")) and "tau" not in repr(binslt.LIF(neuron="if"))
