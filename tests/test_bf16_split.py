"""The split of the "bf16x3" gradient forms (binslt.ops.cpu_algos.bf16_split): three parts exact
in bfloat16 whose sum times 2^e is the float32 value, on its edge cases, against a split written
here with integer bit operations and against float64 sums."""

from __future__ import annotations

import math

import pytest
import torch

from binslt.ops import library as _ext

pytestmark = pytest.mark.skipif(_ext.module("cpu") is None, reason="the C++ CPU extension is "
                                "not built")

F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).tiny  # smallest normal, 2^-126


def split(x):
    from binslt.ops.cpu_algos import bf16_split
    return bf16_split(x)


def _cut(v: torch.Tensor) -> torch.Tensor:
    """v with its significand cut to bfloat16's 8 bits (the low 16 bits of the word zeroed)."""
    return (v.view(torch.int32) & -65536).view(torch.float32)


def _split_here(x: torch.Tensor, e: int) -> torch.Tensor:
    """The same split from integer bit operations: x * 2^-e (rounded once from float64), hi =
    cut, mid = cut of the rest, lo = what is left, cut (a no-op unless the scaled value is
    subnormal)."""
    v = (x.double() * 2.0 ** -e).float()
    hi = _cut(v)
    r = v - hi
    mid = _cut(r)
    return torch.stack([hi, mid, _cut(r - mid)])


def _exponent(x: torch.Tensor) -> int:
    m = float(x.abs().max()) if x.numel() else 0.0
    return 0 if m == 0.0 else math.frexp(m)[1] - 1


def _check(x: torch.Tensor, exact_above: float | None = None) -> None:
    parts, e = split(x)
    assert parts.shape == (3, *x.shape) and parts.dtype == torch.float32
    assert e == _exponent(x)
    # every part is a bfloat16 value
    assert torch.equal(parts.bfloat16().float(), parts)
    # bit for bit the split written here
    assert torch.equal(parts.view(torch.int32), _split_here(x, e).view(torch.int32))
    # the parts sum to x (in float64, where the sum is exact)
    back = (parts.double()[2] + parts.double()[1] + parts.double()[0]) * 2.0 ** e
    bound = 2.0 ** (e - 100) if exact_above is None else exact_above
    big = x.double().abs() > bound
    assert torch.equal(back[big], x.double()[big])
    # below the bound the error stays below float32's absolute precision at that scale
    assert float((back - x.double()).abs().max()) <= 2.0 ** (e - 100)


def test_random_values_of_every_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-30, 30, (4096,), generator=g))
    _check(x.float())


def test_zeros_and_signed_zeros():
    parts, e = split(torch.zeros(7))
    assert e == 0 and torch.equal(parts, torch.zeros(3, 7))
    x = torch.tensor([0.0, -0.0, 1.5, -0.0])
    _check(x)


def test_subnormal_values_are_split_exactly():
    """A tensor of float32 subnormals: scaled up by 2^-e they are normal, so their parts are
    exact (and stay clear of the subnormals a matrix engine flushes)."""
    x = torch.tensor([F32_TINY / 3, -F32_TINY / 1000, 1e-45, F32_TINY * 0.75], dtype=torch.float32)
    parts, e = split(x)
    assert e < -126
    assert (parts[0][x != 0].abs() >= 0.5 ** 30).all()  # normal after scaling
    _check(x)


def test_huge_values_do_not_overflow():
    """Values up to float32's largest: the cut parts never round up (truncation), and the scaled
    parts are at most 2."""
    x = torch.tensor([F32_MAX, -F32_MAX, F32_MAX / 3, 1e38, -3.4e38], dtype=torch.float32)
    parts, e = split(x)
    assert e == 127
    assert torch.isfinite(parts).all() and float(parts.abs().max()) < 2.0
    _check(x)


def test_every_bit_of_the_significand_is_kept():
    """Values with all 24 significand bits set (and single low bits) come back exactly: hi, mid
    and lo take 8 bits each."""
    ones = torch.tensor([(2 ** 24 - 1) / 2 ** 23, 1 + 2 ** -23, -(1 + 2 ** -16 + 2 ** -23),
                         (2 ** 24 - 1) / 2 ** 40], dtype=torch.float32)
    parts, e = split(ones)
    assert parts[2][0] != 0 and parts[1][0] != 0  # 24 bits set: the third part holds 8
    _check(ones)


def test_tiny_values_beside_huge_ones():
    """Below 2^(e-100) a value is not exact (its scaled form is subnormal or zero) but its error
    stays below 2^(e-100) absolute."""
    x = torch.tensor([1e30, 3e-10, -1e-20, 1.0], dtype=torch.float32)
    _check(x, exact_above=2.0 ** (_exponent(x) - 100))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    x = torch.ones(10)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN or inf, which has no exact bf16 parts"):
        split(x)


def test_other_dtypes_and_devices_are_refused():
    with pytest.raises(TypeError, match="float32 CPU tensor"):
        split(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 CPU tensor"):
        split(torch.ones(3, dtype=torch.bfloat16))


def test_non_contiguous_input_follows_the_logical_order():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).t()
    parts, e = split(x)
    assert parts.shape == (3, 5, 6)
    assert torch.equal(parts, _split_here(x.contiguous(), e))


def _bf16x3_backward():
    """One forced bf16x3 backward of a small conv (both gradients)."""
    from binslt.ops import cpu_algorithms
    from binslt.ops import reference as ref
    g = torch.Generator().manual_seed(3)
    T, N, Ci, Co, H = 2, 2, 16, 16, 8
    x = (torch.rand(T * N, Ci, H, H, generator=g) < 0.3).float()
    w = torch.randint(-1, 2, (Co, Ci, 3, 3), generator=g).float()
    xp = ref.pack_spikes_reference(x)
    wm, wp = ref.pack_weight_reference(w)
    alpha, scale, shift = torch.full((Co,), 0.1), torch.ones(Co), torch.zeros(Co)
    ops = torch.ops.binslt
    fwd = ops.bconv_lif(xp, wm, wp, alpha, scale, shift, None, T, 1, 1, True, 1e-5, 2.0, False,
                        0.5, 0.0)
    gs = torch.randn(fwd[0].shape, generator=g)
    with cpu_algorithms(grad_x="bf16x3", grad_w="bf16x3"):
        return ops.bconv_lif_bwd(gs, fwd[1], xp, wm, wp, alpha, scale, shift, fwd[2], fwd[3],
                                 None, Ci, 1, 1, True, 1e-5, 2.0, False, 0.5, 0.0, True, 0, 2.0,
                                 True)


@pytest.mark.parametrize("before", ["ieee", "none", "bf16"])
def test_the_conv_precision_setting_is_restored(before):
    """The bf16x3 forms set oneDNN's conv precision to bf16 for their own products only: the
    user's torch.backends.mkldnn.conv.fp32_precision is the same after the call."""
    saved = torch.backends.mkldnn.conv.fp32_precision
    try:
        torch.backends.mkldnn.conv.fp32_precision = before
        out = _bf16x3_backward()
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
        assert torch.backends.mkldnn.conv.fp32_precision == before
    finally:
        torch.backends.mkldnn.conv.fp32_precision = saved


def _bf16_matrix() -> bool:
    mod = _ext.module("cpu")
    return mod is not None and bool(mod._cpu_features().get("bf16_matrix", False))


@pytest.mark.skipif(not _bf16_matrix(), reason="needs a CPU with AMX-BF16 (oneDNN computes in "
                    "float32 elsewhere, so there is no bf16 primitive to see)")
def test_oneDNN_runs_the_parts_on_the_bf16_engine(tmp_path):
    """With AMX-BF16, oneDNN's verbose log shows the bf16x3 products (the weight gradient's
    matrix products, the input gradient's transposed convolution) with the bf16 math mode."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    here = str(Path(__file__).parent)
    script = tmp_path / "run.py"
    script.write_text(f"import sys; sys.path.insert(0, {here!r})\n"
                      "from test_bf16_split import _bf16x3_backward\n"
                      "_bf16x3_backward()\n")
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    runs = [ln for ln in out.splitlines() if ",exec," in ln]
    assert any("fpmath:bf16" in ln and ",matmul," in ln for ln in runs), runs  # weight grad
    assert any("fpmath:bf16" in ln and ",deconvolution," in ln for ln in runs), runs  # input
