// |x| of an IEEE float read as an unsigned integer with the sign bit cleared orders exactly as
// the value does (+0 and -0 become one key, +inf is kInf, every NaN above it): the selection's
// radix keys (select.cpp), and the largest |x| of a pass as one integer max, which vectorises
// where a float max or a float finiteness test (without -ffast-math) leaves the loop scalar;
// `max key >= kInf` is then the pass's non-finite test.
#pragma once

#include <cstdint>
#include <cstring>

namespace binslt {
namespace cpu {

template <typename scalar_t>
struct KeyOf;

template <>
struct KeyOf<float> {
  using key_t = uint32_t;
  static constexpr key_t kAbs = 0x7fffffffu, kInf = 0x7f800000u, kNaN = 0x7f800001u;
};

template <>
struct KeyOf<double> {
  using key_t = uint64_t;
  static constexpr key_t kAbs = 0x7fffffffffffffffull, kInf = 0x7ff0000000000000ull,
                         kNaN = 0x7ff0000000000001ull;
};

// |x| as an ordered integer key; every NaN maps to one key above +inf.
template <typename scalar_t>
inline typename KeyOf<scalar_t>::key_t abs_key(scalar_t x) {
  using K = KeyOf<scalar_t>;
  typename K::key_t k;
  std::memcpy(&k, &x, sizeof(k));
  k &= K::kAbs;
  return k > K::kInf ? K::kNaN : k;
}

// The float of a finite key (a largest |x| found as the max of abs_key).
inline float float_of_key(uint32_t k) {
  float v;
  std::memcpy(&v, &k, sizeof(v));
  return v;
}

}  // namespace cpu
}  // namespace binslt
