// One loop body compiled for the wider vector units: run_for_isa(isa, f) calls f() inside a
// target("avx512f,avx512bw,avx512vl") or target("avx2") function (isa kAvx512, which requires
// those, or kAvx2), or directly. With BW and VL, GCC vectorises the loops that mix int16 counts,
// floats and doubles (the LIF/BN backward's second pass) over 512-bit registers; with avx512f
// alone it took 256-bit ones. f is a lambda marked __attribute__((always_inline)), so that its
// body, and the always_inline loops it calls, is compiled and vectorised once per target. The
// float arithmetic is the same on every path: -ffp-contract=off (setup.py) keeps the compiler
// from fusing it into FMAs.
#pragma once

#include "binslt/cpu_algos.h"

namespace binslt {
namespace cpu {

template <class F>
__attribute__((target("avx512f,avx512bw,avx512vl"))) auto run_avx512(const F& f) {
  return f();
}
template <class F>
__attribute__((target("avx2"))) auto run_avx2(const F& f) {
  return f();
}
template <class F>
auto run_for_isa(Isa isa, const F& f) {
  if (isa == Isa::kAvx512) return run_avx512(f);
  if (isa == Isa::kAvx2) return run_avx2(f);
  return f();
}

}  // namespace cpu
}  // namespace binslt
