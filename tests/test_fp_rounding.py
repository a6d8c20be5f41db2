"""The GPU kernels round like the CPU kernels: no FMA contraction, IEEE BN inverse std.

The CPU build compiles the LIF / epilogue float maths (csrc/include/binslt/lif.h,
cuda_shared.h, kernels/_common.py) with -ffp-contract=off, so every multiply and add rounds on its
own. A fused multiply-add rounds once, so a neuron within an ulp of its threshold can fire on one
backend and not on another. This file checks, without a GPU:

* the PTX of the Triton kernels whose spikes are claimed bit-exact (sm_90, Triton's AOT path);
* the PTX of the CUDA sources compiled with setup.py's own nvcc flags;
* that ``kernels._common.launch`` passes the no-fusion option and runs on the tensors' device;
* the int32 range checks of the Triton gradient launchers;
* that the planted near-threshold inputs of the GPU tests do tell fused from unfused rounding;

and, on a GPU (marked ``gpu``), Triton and CUDA against the CPU kernel by ``torch.equal`` on every
neuron, with no tie band, on inputs planted within a few ulps of the threshold.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from binslt.kernels import _common
from binslt.kernels import bconv as KB
from binslt.kernels import lif as KL
from helpers import assert_close_rel

from binslt import ops
from binslt.ops import library as _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
gpu = pytest.mark.gpu


def _setup_module():
    """setup.py as a module (its setup() call runs only as __main__): the build's own flags."""
    spec = importlib.util.spec_from_file_location("binslt_setup_flags", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptx_counts(ptx: str) -> dict:
    """Float instruction counts of a PTX text (FMAs of any rounding / ftz flavour, the
    contractible plain mul/add/sub, approximate rsqrt, ex2 of an inlined expf, IEEE sqrt)."""
    return {
        "fma": len(re.findall(r"\bfma(?:\.[a-z]+)*\.f32\b", ptx)),
        "fma.rn.f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "plain": len(re.findall(r"\b(?:mul|add|sub)\.f32\b", ptx)),
        "rsqrt": ptx.count("rsqrt.approx"),
        "ex2": ptx.count("ex2.approx"),
        "sqrt.rn": ptx.count("sqrt.rn.f32"),
        "div.rn": ptx.count("div.rn.f32"),
    }


# ---------------------------------------------------------------------------------------------
# Triton: PTX of the exact kernels
# ---------------------------------------------------------------------------------------------

#: aot_check variants whose float maths is all epilogue / LIF / surrogate, i.e. claimed bit-exact
#: (the conv forward's only other float work is none: its GEMM is an int8 tl.dot).
EXACT_VARIANTS = [
    "bconv_fwd fuse_lif=True store_counts=False",
    "bn_lif_fwd counts=True bn_train=True decay_input=True hard=True",
    "bn_lif_fwd counts=False bn_train=True decay_input=False hard=False",
    "bn_lif_fwd counts=False bn_train=False decay_input=True hard=True",
    "lif_bwd surrogate=0 hard=True detach=False",
    "lif_bwd surrogate=0 hard=False detach=False",
    "lif_bwd surrogate=2 hard=True detach=False",
    "lif_bwd surrogate=3 hard=False detach=True",
    "lif_bwd surrogate=1 hard=False detach=True",  # last: the sigmoid (checked for its expf)
]
#: Compiled a second time with FMA contraction allowed (what the launch did before): the
#: control that shows the PTX check can fail, and that the option is what removes the FMAs.
CONTROL_VARIANTS = EXACT_VARIANTS[1:]

_TRITON_PTX_SCRIPT = r'''
import json, sys, time
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.language.extra import libdevice
from binslt.kernels import _common, aot_check as A

exact, control = json.loads(sys.argv[1]), json.loads(sys.argv[2])

@triton.jit
def _exp_probe(x_ptr):
    i = tl.arange(0, 128)
    tl.store(x_ptr + i, libdevice.exp(tl.load(x_ptr + i)))

out = {}
t0 = time.time()
k = triton.compile(ASTSource(fn=_exp_probe, signature={"x_ptr": "*fp32"}, constexprs={}),
                   target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4, enable_fp_fusion=False))
out["exp_probe"] = dict(ptx=k.asm["ptx"], seconds=time.time() - t0, options={})
variants = {v[0]: v for v in A.variants()}
for fused in (False, True):
    if fused:  # the same kernels compiled as a launch without the option would compile them
        _common._NO_FP_FUSION.clear()
    for label in (control if fused else exact):
        _, kernel, ptrs, consts = variants[label]
        cfgs = getattr(kernel, "configs", None)
        t0 = time.time()
        k = A.compile_variant(kernel, ptrs, consts, 90, cfgs[-1] if cfgs else None)
        out[("fused " if fused else "") + label] = dict(
            ptx=k.asm["ptx"], seconds=time.time() - t0, options=_common.launch_options(kernel))
print("JSON" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def triton_ptx(tmp_path_factory):
    """{label: {ptx, seconds, options}} of the exact kernels compiled for sm_90 by a subprocess
    without TRITON_INTERPRET (the interpreter replaces the compiler), as ``launch`` compiles
    them; plus 'fused <label>' controls and an ``exp_probe`` (libdevice expf alone)."""
    script = tmp_path_factory.mktemp("ptx") / "triton_ptx.py"
    script.write_text(_TRITON_PTX_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(script.parent / "cache")  # compile for real (and time it)
    t0 = time.time()
    out = subprocess.run([sys.executable, str(script), json.dumps(EXACT_VARIANTS),
                          json.dumps(CONTROL_VARIANTS)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    res = json.loads(out.stdout.split("JSON", 1)[1])
    times = ", ".join(f"{k}: {v['seconds']:.1f}s" for k, v in res.items())
    print(f"Triton sm_90 compiles ({time.time() - t0:.0f}s in all): {times}")
    return res


def test_triton_exact_kernels_compile_without_fma(triton_ptx):
    """The PTX of every bit-exact Triton kernel holds no FMA, no contractible plain
    ``mul/add/sub.f32`` (ptxas may fuse those itself; the no-fusion build emits the ``.rn``
    forms, which it may not) and no ``rsqrt.approx``; BN-train variants take 1/sqrt as IEEE
    ``sqrt.rn`` + ``div.rn``.

    Precise rule for the FMAs: the only ones allowed are those inside libdevice's expf (the
    sigmoid surrogate, lif.h's ``expf``; CUDA's expf is the same polynomial with explicit fmaf,
    which -fmad=false does not touch either): #fma == #ex2.approx * (FMAs per expf, measured on
    a probe kernel that computes only libdevice.exp). Kernels without the sigmoid have no ex2,
    hence no FMA at all. The float ``tl.dot`` kernels of the conv backward (dgrad / wgrad, tf32x3
    on tensor cores) are not listed: their sums are not claimed bit-exact (the MMA accumulates
    in its own order), and they keep FMA contraction for speed."""
    probe = _ptx_counts(triton_ptx["exp_probe"]["ptx"])
    assert probe["ex2"] >= 1
    per_exp = probe["fma"] / probe["ex2"]
    for label in EXACT_VARIANTS:
        r = triton_ptx[label]
        c = _ptx_counts(r["ptx"])
        assert r["options"] == {"enable_fp_fusion": False}, label
        assert c["fma.rn.f32"] == 0, (label, c)
        assert c["fma"] == per_exp * c["ex2"], (label, c, per_exp)
        assert c["plain"] == 0, (label, c)
        assert c["rsqrt"] == 0, (label, c)
        if "bn_train=True" in label or ("lif_bwd" in label and "detach=False" in label):
            assert c["sqrt.rn"] > 0 and c["div.rn"] > 0, (label, c)  # 1 / sqrt(var + eps)
    assert _ptx_counts(triton_ptx[EXACT_VARIANTS[-1]]["ptx"])["ex2"] > 0  # the sigmoid's expf


def test_triton_fused_control_has_fma(triton_ptx):
    """Compiled as a plain launch would (FMA contraction on), the same kernels do contain
    ``fma.rn.f32``: the check above can fail, and the launch option is what removes them."""
    for label in CONTROL_VARIANTS:
        c = _ptx_counts(triton_ptx["fused " + label]["ptx"])
        assert triton_ptx["fused " + label]["options"] == {}
        assert c["fma.rn.f32"] > 0, (label, c)


# ---------------------------------------------------------------------------------------------
# CUDA: PTX of csrc/cuda with setup.py's nvcc flags
# ---------------------------------------------------------------------------------------------

_EXP_PROBE_CU = """
__global__ void exp_probe(float* x) { x[threadIdx.x] = expf(x[threadIdx.x]); }
"""


def _nvcc_ptx(src: str, out: str, flags: list[str], includes: list[str]) -> str:
    cmd = [NVCC, "-ptx", "-arch=sm_90", "-std=c++20", *flags, *[f"-I{i}" for i in includes],
           src, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stderr[-4000:]
    with open(out) as f:
        return f.read()


@pytest.mark.skipif(not os.path.exists(NVCC), reason=f"nvcc not found at {NVCC}")
def test_cuda_sources_compile_without_fma(tmp_path):
    """csrc/cuda/bn_lif.cu (the epilogue.cuh kernels: BN + LIF forward, LIF BPTT) and
    bconv_lif.cu (the fused conv epilogue), compiled to sm_90 PTX with setup.py's NVCC_FLAGS,
    hold no contracted FMA and no contractible plain mul/add/sub.f32: their only fma.rn.f32 are
    the explicit ones inside CUDA's expf (sigmoid surrogate), #fma == #ex2 * (FMAs per expf of
    a probe kernel). Without -fmad=false the same check fails (dozens of fma.rn.f32)."""
    from torch.utils.cpp_extension import include_paths

    flags = _setup_module().NVCC_FLAGS
    assert "-fmad=false" in flags
    inc = [os.path.join(ROOT, "csrc", "include"), *include_paths("cuda")]
    probe_src = tmp_path / "probe.cu"
    probe_src.write_text(_EXP_PROBE_CU)
    t0 = time.time()
    jobs = {"probe": (str(probe_src), []), "bn_lif": ("csrc/cuda/bn_lif.cu", inc),
            "bconv_lif": ("csrc/cuda/bconv_lif.cu", inc)}
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        futs = {k: ex.submit(_nvcc_ptx, os.path.join(ROOT, s), str(tmp_path / f"{k}.ptx"), flags,
                             i) for k, (s, i) in jobs.items()}
        ptx = {k: f.result() for k, f in futs.items()}
    print(f"nvcc -ptx sm_90 of bn_lif.cu + bconv_lif.cu + probe: {time.time() - t0:.0f}s")
    probe = _ptx_counts(ptx["probe"])
    assert probe["ex2"] == 1
    for name in ("bn_lif", "bconv_lif"):
        c = _ptx_counts(ptx[name])
        assert c["plain"] == 0, (name, c)
        assert c["rsqrt"] == 0, (name, c)
        assert c["fma"] == probe["fma"] * c["ex2"], (name, c, probe)
    assert _ptx_counts(ptx["bn_lif"])["sqrt.rn"] > 0  # bn_invstd: IEEE sqrt, then a division


def test_setup_exposes_build_flags(tmp_path, monkeypatch):
    """setup.py's flag lists, arch default, CUDA lib folder and the BINSLT_CPU switch."""
    m = _setup_module()
    assert "-ffp-contract=off" in m.CXX_FLAGS
    assert "-fmad=false" in m.NVCC_FLAGS
    assert m.DEFAULT_CUDA_ARCHS == "8.0;9.0+PTX"
    assert m.cuda_lib_dir(str(tmp_path)) is None
    (tmp_path / "lib").mkdir()
    assert m.cuda_lib_dir(str(tmp_path)) == str(tmp_path / "lib")
    (tmp_path / "lib64").mkdir()
    assert m.cuda_lib_dir(str(tmp_path)) == str(tmp_path / "lib64")
    monkeypatch.setenv("BINSLT_CPU", "2")
    with pytest.raises(SystemExit, match="BINSLT_CPU must be 0 or 1"):
        m._extensions()
    monkeypatch.setenv("BINSLT_CPU", "0")
    monkeypatch.setenv("BINSLT_CUDA", "0")
    with pytest.raises(SystemExit, match="BINSLT_CPU=0 skips the CPU extension"):
        m._extensions()
    monkeypatch.setenv("BINSLT_CPU", "1")
    exts, _ = m._extensions()
    assert [e.name for e in exts] == ["binslt._C"]
    assert "-ffp-contract=off" in exts[0].extra_compile_args["cxx"]


# ---------------------------------------------------------------------------------------------
# launch: options and device
# ---------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls, self.devices, self.current = [], [], None

    def wrap_triton(self, kernel):
        rec = self

        class _Launcher:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    rec.calls.append((kernel, grid, args, kwargs, rec.current))
                return run
        return _Launcher()

    def device(self, dev):
        rec = self

        class _Guard:
            def __enter__(self):
                rec.devices.append(dev)
                rec.current = dev

            def __exit__(self, *exc):
                rec.current = None
        return _Guard()


def test_launch_adds_no_fusion_and_guards_the_tensor_device(monkeypatch):
    """launch() runs the kernel under torch.cuda.device(<device of its tensors>) (Triton launches
    on the current device) and adds enable_fp_fusion=False for the exact kernels only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = _Recorder()
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "wrap_triton", rec.wrap_triton)
    monkeypatch.setattr(_common.torch.cuda, "device", rec.device)
    with FakeTensorMode():
        t1 = torch.empty(4, device="cuda:1")
    _common.launch(KL._bn_lif_fwd_kernel, (1,), 3, t1, BLOCK_R=1)
    _common.launch(KB._bconv_dgrad_kernel, (1,), t1, KH=1)
    _common.launch(KB._bconv_fwd_kernel, (1,), 0, x_ptr=t1)
    (k0, _, a0, kw0, d0), (k1, _, _, kw1, d1), (_, _, _, kw2, d2) = rec.calls
    assert k0 is KL._bn_lif_fwd_kernel and a0[1] is t1
    assert kw0 == {"BLOCK_R": 1, "enable_fp_fusion": False} and d0 == torch.device("cuda:1")
    assert kw1 == {"KH": 1} and d1 == torch.device("cuda:1")  # float tl.dot: fusion kept
    assert kw2["enable_fp_fusion"] is False and d2 == torch.device("cuda:1")  # tensor by keyword
    assert rec.devices == [torch.device("cuda:1")] * 3
    cpu = torch.zeros(2)
    _common.launch(KL._lif_bwd_kernel, (1,), cpu)  # no CUDA tensor: no guard
    assert rec.calls[-1][4] is None and len(rec.devices) == 3
    assert _common.launch_options(KL._lif_bwd_kernel) == {"enable_fp_fusion": False}
    assert _common.launch_options(KB._bconv_fwd_kernel.fn) == {"enable_fp_fusion": False}
    assert _common.launch_options(KL._channel_sums_kernel) == {}


# ---------------------------------------------------------------------------------------------
# int32 range checks of the gradient launchers (meta tensors pretend the large shapes)
# ---------------------------------------------------------------------------------------------


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_gradient_launchers_refuse_int32_overflow():
    big = 2**31 // (64 * 64 * 64) + 1  # B with B*64*64*64 > 2**31 - 1
    wm = _meta(64, 3, 3, 2, dtype=torch.int32)
    alpha = _meta(64)
    with pytest.raises(ValueError, match=r"grad_z \[B, Co, Ho, Wo\] has \d+ elements"):
        KB.bconv_dgrad(_meta(big, 64, 64, 64), wm, wm, alpha, 8, 8, 8, 8, 0)  # grad_x is small
    with pytest.raises(ValueError, match="grad_x has"):
        KB.bconv_dgrad(_meta(1, 64, 8, 8), wm, wm, alpha, 64, big * 64, 64, 1, 1)
    xp = _meta(1, 8, 8, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"grad_z \[B, Co, Ho, Wo\] has"):
        KB.bconv_wgrad(_meta(big, 64, 64, 64), xp, 64, 3, 3, 1, 1)
    with pytest.raises(ValueError, match="x_packed has"):
        KB.bconv_wgrad(_meta(1, 64, 8, 8), _meta(big * 64, 64, 64, 2, dtype=torch.int32), 64, 3,
                       3, 1, 1)
    with pytest.raises(ValueError, match="grad_weight has"):
        KB.bconv_wgrad(_meta(1, 2**16, 8, 8), xp, 2**16, 3, 3, 1, 1)
    src = _meta(2, 1, 4, 8)
    v = _meta(4)
    with pytest.raises(ValueError, match="grad_spikes has"):
        KL.lif_bwd(_meta(2, big, 64, 64 * 64), src, None, v, v, v, v, None, False, 1e-5, 2.0,
                   True, 1.0, 0.0, False, 0, 2.0)
    # in range: the checks pass (the interpreter skips the launch for meta tensors)
    assert KB.bconv_dgrad(_meta(1, 64, 8, 8), wm, wm, alpha, 64, 8, 8, 1, 1).shape == (1, 64, 8, 8)


# ---------------------------------------------------------------------------------------------
# Planted near-threshold inputs (used by the GPU tests) and their power on the CPU
# ---------------------------------------------------------------------------------------------

VTH = 1.0
EPS = 1e-5


def _target(tau: float, decay_input: bool) -> float:
    """X with H[0] = X / tau (decay_input) or X at the threshold (V[-1] = v_reset = 0)."""
    return VTH * tau if decay_input else VTH


def planted_eval(tau: float, decay_input: bool, T: int = 3, N: int = 4, C: int = 16, S: int = 64,
                 seed: int = 0):
    """(z [T, N, C, S], scale, shift) float32: z * scale + shift lands within a few ulps of the
    firing input at t = 0 (and stays close after). |shift| is 2-64x the target, so the rounding of
    z * scale is large against the ulp of the sum: a fused z*scale+shift moves many neurons by
    an ulp or more, across the threshold."""
    g = np.random.default_rng(seed)
    tgt = _target(tau, decay_input)
    scale = g.uniform(0.5, 1.5, C).astype(np.float32)
    shift = (-tgt * g.choice([2.0, 8.0, 64.0], C) * g.uniform(1, 2, C)).astype(np.float32)
    z0 = ((tgt - shift.astype(np.float64)) / scale.astype(np.float64)).astype(np.float32)
    z = np.broadcast_to(z0[None, None, :, None], (T, N, C, S)).copy()
    steps = g.integers(-3, 4, size=z.shape)
    for k in range(1, 4):  # nudge each neuron by -3..3 ulps of z
        z = np.where(steps >= k, np.nextafter(z, np.float32(np.inf)), z)
        z = np.where(steps <= -k, np.nextafter(z, np.float32(-np.inf)), z)
    return torch.from_numpy(z), torch.from_numpy(scale), torch.from_numpy(shift)


def planted_train(tau: float, decay_input: bool, T: int = 2, N: int = 2, C: int = 256,
                  S: int = 16, seed: int = 1):
    """(z, scale, shift) for training BN. z is on a 2^-4 grid in [-4, 4) and T*N*S is a power of
    two, so every backend's mean and (one- or two-pass) variance are exact and equal; half of
    each channel's entries share one value z*_c, and shift_c (with scale_c) puts
    ((z*_c - mean) * invstd) * scale + shift within a few ulps of the firing input, so the BN
    inverse std (1/sqrt vs approximate rsqrt) and FMA contraction both decide spikes."""
    g = np.random.default_rng(seed)
    tgt = _target(tau, decay_input)
    z = (g.integers(-64, 64, size=(T, N, C, S)) / 16.0).astype(np.float32)
    zstar = (g.integers(-64, 64, size=C) / 16.0).astype(np.float32)
    half = g.random((T, N, C, S)) < 0.5
    z = np.where(half, zstar[None, None, :, None], z).astype(np.float32)
    zt = torch.from_numpy(z)
    m = zt.double().mean(dim=(0, 1, 3))
    var = ((zt.double() - m[None, None, :, None]) ** 2).mean(dim=(0, 1, 3))
    zhat = torch.from_numpy((zstar - m.float().numpy()) * _invstd(var.float().numpy())).double()
    # |zhat * scale| is 4-64x the target (the rounding of the product and of invstd is large
    # against the ulp of the sum), and shift cancels it to within -3..3 ulps of shift.
    k = torch.from_numpy(g.choice([4.0, 16.0, 64.0], C) * g.uniform(1, 2, C))
    scale = (tgt * k / zhat.abs().clamp_min(0.25)).float()
    shift = (tgt - zhat * scale.double()).float()
    steps = torch.from_numpy(g.integers(-3, 4, C))
    for i in range(1, 4):
        shift = torch.where(steps >= i, torch.nextafter(shift, torch.tensor(np.inf)), shift)
        shift = torch.where(steps <= -i, torch.nextafter(shift, torch.tensor(-np.inf)), shift)
    return zt, scale, shift


def _invstd(var: np.ndarray) -> np.ndarray:
    """1 / sqrt(var + eps) in IEEE float32 (numpy: correctly rounded sqrt and division, like the
    kernels; torch's CPU sqrt here is not always correctly rounded)."""
    var = np.asarray(var, dtype=np.float32)
    return np.float32(1.0) / np.sqrt(var + np.float32(EPS))


def _fused(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c), emulated (exact float64 product, one rounding of the sum)."""
    return (a.double() * b.double() + c.double()).float()


def _first_spike(x: torch.Tensor, tau: float, decay_input: bool) -> torch.Tensor:
    """S[0] from X[0] (V[-1] = 0): H = X / tau or X, IEEE float32."""
    h = x / torch.tensor(tau, dtype=torch.float32) if decay_input else x
    return h - VTH >= 0


@pytest.mark.parametrize("tau,decay_input", [(2.0, True), (100.0, True), (2.0, False),
                                             (100.0, False), (0.5, True), (4.0, True),
                                             (3.0, True)])
def test_planted_inputs_tell_fused_from_unfused(tau, decay_input):
    """The GPU tests' inputs have power: with z*scale+shift fused (one rounding) instead of two
    roundings, many of the t = 0 spikes change (eval); in training BN, an invstd one ulp off
    (what rsqrt.approx gives) or a fused epilogue changes spikes too. And the CPU kernel agrees
    with the unfused float32 formula on every planted neuron (with a power-of-two tau the CPU
    kernels multiply by 1 / tau, exact, instead of dividing: 0.5, 2 and 4 here; 3 and 100 divide).
    """
    z, scale, shift = planted_eval(tau, decay_input)
    sc, sh = scale.view(1, 1, -1, 1), shift.view(1, 1, -1, 1)
    plain = _first_spike(z[0] * sc[0] + sh[0], tau, decay_input)
    fused = _first_spike(_fused(z[0], sc[0], sh[0]), tau, decay_input)
    n = plain.numel()
    assert 0.2 * n < int(plain.sum()) < 0.8 * n  # straddles the threshold
    assert int((plain != fused).sum()) > 0.02 * n, int((plain != fused).sum())
    if _ext.backends()["cpu"]["built"]:
        s = torch.ops.binslt.bn_lif(z, scale, shift, None, False, EPS, tau, decay_input, VTH,
                                    0.0)[0]
        assert torch.equal(s[0].bool(), plain)

    z, scale, shift = planted_train(tau, decay_input)
    mean = z.double().mean(dim=(0, 1, 3)).float().view(1, 1, -1, 1)
    var = z.double().var(dim=(0, 1, 3), unbiased=False).float().view(1, 1, -1, 1)
    invstd = torch.from_numpy(_invstd(var.numpy()))
    sc, sh = scale.view(1, 1, -1, 1), shift.view(1, 1, -1, 1)

    def spikes(inv, fuse):
        zhat = (z - mean) * inv
        x = _fused(zhat, sc, sh) if fuse else zhat * sc + sh
        return _first_spike(x[0], tau, decay_input)

    plain = spikes(invstd, False)
    off_ulp = spikes(torch.nextafter(invstd, torch.full_like(invstd, 2.0)), False)
    fused = spikes(invstd, True)
    c = z.shape[2]
    # per channel, the z*_c neurons decide together: count channels whose spikes change
    assert int((plain != off_ulp).any(dim=(0, 2)).sum()) > 0.05 * c
    assert int((plain != fused).any(dim=(0, 2)).sum()) > 0.05 * c
    if _ext.backends()["cpu"]["built"]:
        s, m, v = torch.ops.binslt.bn_lif(z, scale, shift, None, True, EPS, tau, decay_input, VTH,
                                          0.0)
        assert torch.equal(m, mean.flatten()) and torch.equal(v, var.flatten())
        assert torch.equal(s[0].bool(), plain)


# ---------------------------------------------------------------------------------------------
# GPU: Triton and CUDA against the CPU kernel, bit for bit
# ---------------------------------------------------------------------------------------------


def gpu_planted_cases(test):
    """A GPU test run for each GPU backend (triton, cuda), BN mode, decay_input and tau."""
    for mark in (pytest.mark.parametrize("tau", [2.0, 100.0]),
                 pytest.mark.parametrize("decay_input", [True, False]),
                 pytest.mark.parametrize("bn_train", [False, True]),
                 pytest.mark.parametrize("backend", ["triton", "cuda"]), gpu):
        test = mark(test)
    return test


def _gpu_op(backend: str, name: str):
    if backend == "triton":
        err = ops.load_triton()
        if err is not None:
            pytest.fail(f"the Triton backend does not load: {err}")
        return getattr(torch.ops.binslt, f"{name}_triton")
    if not _ext.backends()["cuda"]["built"]:
        pytest.skip("binslt._C_cuda is not built")
    return getattr(torch.ops.binslt, name)  # CUDA tensors dispatch to the CUDA kernel


@gpu_planted_cases
def test_gpu_bn_lif_matches_cpu_bit_for_bit(backend, bn_train, decay_input, tau):
    """bn_lif forward (spikes, mean, var) and backward (dL/dX per neuron; dL/dz in eval) on the
    GPU equal the CPU kernel's by torch.equal on every neuron, on planted near-threshold inputs.
    (The per-channel gradient sums and the training dL/dz are reductions in another order or
    precision: normwise relative 1e-5.)"""
    fwd, bwd = _gpu_op(backend, "bn_lif"), _gpu_op(backend, "bn_lif_bwd")
    z, scale, shift = (planted_train if bn_train else planted_eval)(tau, decay_input)
    args = (bn_train, EPS, tau, decay_input, VTH, 0.0)
    want = torch.ops.binslt.bn_lif(z, scale, shift, None, *args)
    got = fwd(z.cuda(), scale.cuda(), shift.cuda(), None, *args)
    assert 0 < int(want[0].sum()) < want[0].numel()
    for name, g, w in zip(("spikes", "mean", "var"), got, want):
        assert g.is_cuda
        assert torch.equal(g.cpu(), w), (name, int((g.cpu() != w).sum()))
    gs = torch.randn(z.shape)
    _, mean, var = want
    bargs = (bn_train, EPS, tau, decay_input, VTH, 0.0, False, 0, 2.0)
    wb = torch.ops.binslt.bn_lif_bwd(gs, z, scale, shift, mean, var, None, *bargs)
    gb = bwd(gs.cuda(), z.cuda(), scale.cuda(), shift.cuda(), mean.cuda(), var.cuda(), None,
             *bargs)
    assert torch.equal(gb[1].cpu(), wb[1]), "grad_current"
    if bn_train:  # the CPU evaluates the BN input gradient in double, the GPU in float
        assert_close_rel(gb[0].cpu(), wb[0], 1e-5, "grad_z")
    else:
        assert torch.equal(gb[0].cpu(), wb[0]), "grad_z"
    for i, name in ((2, "grad_scale"), (3, "grad_shift")):
        assert_close_rel(gb[i].cpu(), wb[i], 1e-5, name)


def _planted_conv(tau: float, decay_input: bool, seed: int = 2):
    """A bconv_lif eval case whose epilogue count*alpha*scale+shift lands within a few ulps of
    the firing input for each channel's most common count at t = 0."""
    g = torch.Generator().manual_seed(seed)
    T, N, Ci, Co, H = 2, 2, 64, 32, 8
    x = (torch.rand(T * N, Ci, H, H, generator=g) < 0.3).float()
    w = torch.randint(-1, 2, (Co, Ci, 3, 3), generator=g).float()
    xp = torch.ops.binslt.pack_spikes(x)
    wm, wp = torch.ops.binslt.pack_weight(w)
    counts = torch.nn.functional.conv2d(x, w, padding=1).round().long()[:N]  # t = 0
    mode = counts.transpose(0, 1).reshape(Co, -1).mode(dim=1).values.double()
    tgt = _target(tau, decay_input)
    alpha = (torch.rand(Co, generator=g) * 0.5 + 0.25).float()
    scale = (torch.rand(Co, generator=g) + 0.5).float()
    zmode = (mode.float() * alpha).double()  # count * alpha, float32 as every kernel
    shift = (tgt - zmode * scale.double()).float()
    shift = torch.where(mode == 0, torch.full_like(shift, tgt), shift)
    return xp, wm, wp, alpha, scale, shift, T


@gpu_planted_cases
def test_gpu_bconv_lif_matches_cpu_bit_for_bit(backend, bn_train, decay_input, tau):
    """The fused conv forward (Triton: LIF in the int8 conv's epilogue; CUDA: wmma / popc) on
    planted inputs: spikes and counts equal the CPU kernel's on every neuron; in training BN,
    mean / var (from exact integer sums) first, then spikes."""
    op = _gpu_op(backend, "bconv_lif")
    xp, wm, wp, alpha, scale, shift, T = _planted_conv(tau, decay_input)
    args = (None, T, 1, 1, bn_train, EPS, tau, decay_input, VTH, 0.0)
    want = torch.ops.binslt.bconv_lif(xp, wm, wp, alpha, scale, shift, *args)
    got = op(xp.cuda(), wm.cuda(), wp.cuda(), alpha.cuda(), scale.cuda(), shift.cuda(), *args)
    assert 0 < int(want[0].sum()) < want[0].numel()
    assert torch.equal(got[1].cpu().long(), want[1].long()), "counts"
    if bn_train:
        for name, i in (("mean", 2), ("var", 3)):
            assert torch.equal(got[i].cpu(), want[i]), (name, got[i].cpu() - want[i])
    assert torch.equal(got[0].cpu(), want[0]), ("spikes", int((got[0].cpu() != want[0]).sum()))


@gpu
def test_gpu_triton_launches_on_the_tensor_device():
    """Tensors on the last visible GPU, current device 0: the Triton ops run on the tensors'
    device (launch's device guard) and give the CPU kernel's spikes."""
    if ops.load_triton() is not None:
        pytest.fail("the Triton backend does not load")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    z, scale, shift = planted_eval(2.0, True, T=2, N=2, C=4, S=32)
    want = torch.ops.binslt.bn_lif(z, scale, shift, None, False, EPS, 2.0, True, VTH, 0.0)[0]
    got = torch.ops.binslt.bn_lif_triton(z.to(dev), scale.to(dev), shift.to(dev), None, False,
                                         EPS, 2.0, True, VTH, 0.0)[0]
    assert got.device == dev and torch.cuda.current_device() == 0
    torch.cuda.synchronize(dev)
    assert torch.equal(got.cpu(), want)

