"""Compile every binslt Triton kernel ahead of time for a CUDA architecture, without a GPU.

The interpreter tests check the maths on the CPU; this checks that the same kernels also get
through Triton's GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for, by default,
sm_90 (H100/H200): int8 ``tl.dot`` on tensor cores, tf32x3 float dots, int64/float64 atomics,
register reshapes. It cannot check speed or numerics on the device.

    python -m binslt.kernels.aot_check [--arch 90] [--all-configs] [--kernel 3] [--fresh-cache]

Run it with TRITON_INTERPRET unset (the module refuses otherwise). Prints one line per
compiled variant with its compile time and the count of ``fma.rn.f32`` in its PTX, then per
kernel the count and the min/median/max/total seconds, and the total wall time; exits 1 if any
variant failed. Each variant is compiled with the options ``kernels._common.launch`` uses on a
GPU (``launch_options``). Triton caches compiled kernels (``TRITON_CACHE_DIR``, default
``~/.triton/cache``), so a second run times cache hits: ``--fresh-cache`` compiles into an empty
temporary cache instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _types_for(jit, ptr_types: dict) -> dict:
    out = {}
    for n in jit.arg_names:
        if n in ptr_types:
            out[n] = ptr_types[n]
        elif n in ("tau", "v_threshold", "v_reset", "surrogate_alpha", "surrogate_alpha_sq",
                   "surrogate_bound", "bn_eps"):
            out[n] = "fp32"
        else:
            out[n] = "i32"
    return out


def variants(k: int = 3) -> list[tuple]:
    """Every kernel variant the check compiles: (label, kernel, pointer types, constexprs).
    ``kernel`` is the launched object (a JITFunction or an Autotuner), ``k`` the conv size."""
    from . import bconv as B
    from . import lif as L
    from . import pack as P

    out = []
    fwd_ptrs = dict(x_ptr="*i32", w_mask_ptr="*i32", w_pos_ptr="*i32", alpha_ptr="*fp32",
                    scale_ptr="*fp32", shift_ptr="*fp32", res_ptr="*fp32", spk_ptr="*fp32",
                    cnt_ptr="*i16", sum_ptr="*i64", sq_ptr="*i64")
    for fuse, store in ((True, True), (False, True), (True, False)):
        out.append((f"bconv_fwd fuse_lif={fuse} store_counts={store}", B._bconv_fwd_kernel,
                    fwd_ptrs, dict(KH=k, KW=k, FUSE_LIF=fuse, STORE_COUNTS=store, HAS_RES=fuse,
                                   DECAY_INPUT=True, HARD=fuse)))
    out.append(("bconv_dgrad", B._bconv_dgrad_kernel,
                dict(gz_ptr="*fp32", w_mask_ptr="*i32", w_pos_ptr="*i32", alpha_ptr="*fp32",
                     gx_ptr="*fp32"), dict(KH=k, KW=k, PRECISION=B.DOT_PRECISION)))
    out.append(("bconv_wgrad", B._bconv_wgrad_kernel,
                dict(gz_ptr="*fp32", x_ptr="*i32", gw_ptr="*fp32"),
                dict(KH=k, KW=k, PRECISION=B.DOT_PRECISION)))
    blk = dict(BLOCK_R=4, BLOCK_S=256)
    out.append(("channel_sums", L._channel_sums_kernel,
                dict(src_ptr="*fp32", sum_ptr="*fp64", sq_ptr="*fp64"), blk))
    lp = dict(alpha_ptr="*fp32", scale_ptr="*fp32", shift_ptr="*fp32", mean_ptr="*fp32",
              var_ptr="*fp32", res_ptr="*fp32", spk_ptr="*fp32")
    for has_alpha, bn_train, decay, hard in ((True, True, True, True), (False, True, False, False),
                                             (False, False, True, True)):
        out.append((f"bn_lif_fwd counts={has_alpha} bn_train={bn_train} decay_input={decay} "
                    f"hard={hard}", L._bn_lif_fwd_kernel,
                    dict(lp, src_ptr="*i16" if has_alpha else "*fp32"),
                    dict(blk, HAS_ALPHA=has_alpha, BN_TRAIN=bn_train, HAS_RES=True,
                         DECAY_INPUT=decay, HARD=hard)))
    bp = dict(grad_spk_ptr="*fp32", src_ptr="*i16", alpha_ptr="*fp32", scale_ptr="*fp32",
              shift_ptr="*fp32", mean_ptr="*fp32", var_ptr="*fp32", res_ptr="*fp32",
              grad_x_ptr="*fp32", grad_z_ptr="*fp32", grad_shift_ptr="*fp64",
              grad_scale_ptr="*fp64")
    for sur, hard, det in ((0, True, False), (0, False, False), (1, False, True), (2, True, False),
                           (3, False, True)):
        out.append((f"lif_bwd surrogate={sur} hard={hard} detach={det}", L._lif_bwd_kernel, bp,
                    dict(blk, HAS_ALPHA=True, BN_TRAIN=not det, HAS_RES=True, DECAY_INPUT=det,
                         HARD=hard, DETACH_RESET=det, SURROGATE=sur)))
    out.append(("bn_train_bwd", L._bn_train_bwd_kernel,
                dict(grad_x_ptr="*fp32", src_ptr="*fp32", alpha_ptr="*fp32", scale_ptr="*fp32",
                     mean_ptr="*fp32", var_ptr="*fp32", mean_gx_ptr="*fp32",
                     mean_gx_zhat_ptr="*fp32", grad_z_ptr="*fp32"), dict(blk, HAS_ALPHA=False)))
    out.append(("pack_bits", P._pack_bits_kernel,
                dict(x_ptr="*fp32", mask_ptr="*i32", pos_ptr="*i32"),
                dict(WITH_POS=True, BLOCK_P=128)))
    out.append(("unpack_bits", P._unpack_bits_kernel, dict(packed_ptr="*i32", out_ptr="*fp32"),
                dict(BLOCK_C=32, BLOCK_P=128)))
    return out


def compile_variant(kernel, ptrs: dict, consts: dict, arch: int = 90, config=None):
    """triton.compile one variant for sm_<arch> with the options ``launch`` uses on a GPU
    (``kernels._common.launch_options``: no FMA contraction for the exact kernels) -> the
    CompiledKernel (``.asm['ptx']``). ``config``: a triton.Config of an autotuned kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._common import launch_options

    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    c = dict(consts)
    nw, ns = 4, 3
    if config is not None:
        c.update(config.kwargs)
        nw, ns = config.num_warps, config.num_stages
    sig = {n: ("constexpr" if n in c else t) for n, t in _types_for(jit, ptrs).items()}
    return triton.compile(ASTSource(fn=jit, signature=sig, constexprs=c),
                          target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=nw, num_stages=ns, **launch_options(kernel)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every autotune configuration (slow), not only the first")
    ap.add_argument("--kernel", type=int, default=3, help="conv kernel size to specialize for")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="compile into an empty temporary Triton cache (time real compiles, "
                         "not cache hits)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    if not args.fresh_cache:
        return _compile_all(args)
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="binslt-aot-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp  # triton's knobs read it at each compile
        try:
            return _compile_all(args)
        finally:
            if before is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def _summary(times: dict[str, list[float]], wall: float) -> list[str]:
    """One line per kernel (count, min/median/max/total compile seconds), then all of them."""
    lines = []
    every = [t for ts in times.values() for t in ts]
    for name, ts in list(times.items()) + [("all", every)]:
        if not ts:
            continue
        lines.append(f"time {name:<14} n={len(ts):<3} min={min(ts):.1f}s "
                     f"median={statistics.median(ts):.1f}s max={max(ts):.1f}s "
                     f"total={sum(ts):.1f}s")
    lines.append(f"wall {wall:.1f}s")
    return lines


def _compile_all(args) -> int:
    import triton

    from ._common import launch_options

    failures = 0
    times: dict[str, list[float]] = {}
    start = time.perf_counter()
    print(f"triton {triton.__version__}, sm_{args.arch}, kernel size {args.kernel}, "
          f"{'all' if args.all_configs else 'first'} autotune config(s)", flush=True)
    for label, kernel, ptrs, consts in variants(args.kernel):
        cfgs = list(getattr(kernel, "configs", None) or [None])
        if not args.all_configs:
            cfgs = cfgs[:1]
        for cfg in cfgs:
            nw, ns = (cfg.num_warps, cfg.num_stages) if cfg is not None else (4, 3)
            opts = " no-fp-fusion" if launch_options(kernel) else ""
            desc = f"{label} {cfg.kwargs if cfg else ''} warps={nw} stages={ns}{opts}"
            t0 = time.perf_counter()
            try:
                kern = compile_variant(kernel, ptrs, consts, args.arch, cfg)
            except Exception as exc:  # report every failure, then exit 1
                failures += 1
                print(f"FAIL {desc}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                continue
            dt = time.perf_counter() - t0
            times.setdefault(label.split()[0], []).append(dt)
            ptx = kern.asm.get("ptx", "")
            tc = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no-mma")
            print(f"OK   {desc}: {dt:.1f}s shared={kern.metadata.shared} {tc} "
                  f"fma.f32={ptx.count('fma.rn.f32')}", flush=True)
    for line in _summary(times, time.perf_counter() - start):
        print(line)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
