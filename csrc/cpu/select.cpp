// Exact top-|s| mask selection (biprop's rule), the CPU kernel of binslt::topk_mask.
//
// The rule is binslt.reference.topk_mask's, bit for bit: keep the `keep` entries with the largest
// |s|; of the entries equal to the keep-th largest |s| (v), the lowest flat indices fill the
// places left after every |s| > v. NaN is ordered as torch.kthvalue orders it (above +inf) but, as
// there, compares false: a NaN is never kept, and with v NaN nothing is.
//
// NaN or inf in the scores is an error (ValueError naming how many): a mask over them would be
// silently short of `keep` entries, and the search that produced them has diverged. The check
// costs no extra pass: the first histogram pass already counts the keys of inf and NaN (its top
// buckets); only when that count is not zero is the tensor scanned again to tell them apart.
//
// |s| of an IEEE float, read as an unsigned integer with the sign bit cleared, orders exactly as
// the value does (+0 and -0 become one key), so v is found by an MSD radix selection on those
// keys: one histogram pass over the keys' top bits (in parallel, one histogram per chunk) finds
// v's bucket, a second pass gathers that bucket's keys and v is selected among them. One last
// pass writes the mask; only when the entries equal to v outnumber the places left does it need
// each chunk's count of them first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "binslt/aligned_vector.h"
#include "binslt/checks.h"
#include "binslt/cpu_algos.h"
#include "binslt/float_key.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"

namespace binslt {
namespace cpu {
namespace {

// Raise the ValueError for `bad` non-finite entries of a tensor of n: how many are NaN and how
// many +-inf (a second scan, on the error path only).
template <typename scalar_t>
[[noreturn]] void raise_non_finite(const char* op, const char* what, const scalar_t* p,
                                   int64_t n) {
  int64_t nan = 0, inf = 0;
  for (int64_t i = 0; i < n; ++i) {
    nan += std::isnan(p[i]);
    inf += std::isinf(p[i]);
  }
  std::string parts;
  if (nan) parts += c10::str("NaN (", nan, " of ", n, ")");
  if (inf) parts += c10::str(nan ? " and " : "", "inf (", inf, " of ", n, ")");
  TORCH_CHECK_VALUE(false, "binslt::", op, ": ", what, " ", parts,
                    "; the values diverged (a learning rate too high, a loss that overflowed) or "
                    "were loaded so: restore a finite checkpoint or re-initialise them");
  __builtin_unreachable();
}

// Counts the entries of p[0, n) that are NaN or +-inf, in parallel chunks.
template <typename scalar_t>
int64_t count_non_finite(const scalar_t* p, int64_t n) {
  return at::parallel_reduce(0, n, 1 << 16, int64_t{0}, [&](int64_t b, int64_t e, int64_t acc) {
    for (int64_t i = b; i < e; ++i) acc += !std::isfinite(p[i]);
    return acc;
  }, std::plus<int64_t>());
}

constexpr int64_t kChunkMin = 1 << 16;  // entries per parallel chunk, at least
// A histogram of the top 16 key bits for large tensors (fewer candidates); of 12 bits below this
// size, where clearing and scanning 65536 buckets would cost more than the pass over the scores.
constexpr int64_t kWideDigitMin = 1 << 18;

// The parallel chunks of [0, n). A loop over one reads its end once (for (i = begin(c),
// e = end(c); ...)): a store through an int64_t pointer in the body (a histogram) may alias the
// fields, and the compiler would recompute end(c), a 64-bit division, every iteration.
struct Chunks {
  int64_t n, count;
  int64_t begin(int64_t i) const { return n * i / count; }
  int64_t end(int64_t i) const { return n * (i + 1) / count; }
};

// The keys of the finite sp[i0, i1) whose top bits (key >> shift) are `bucket`, written at out
// in index order, at most `room` of them (the histogram's count; *over set if there are more or
// fewer: scores written while they are read): 16 floats a step, the bucket's keys
// compress-stored (the scalar loop's branch per entry took longer than the histogram pass).
__attribute__((target("avx512f"))) void gather_bucket_avx512(const float* sp, int64_t i0,
                                                             int64_t i1, int shift,
                                                             uint32_t bucket, uint32_t* out,
                                                             int64_t room, bool* over) {
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int>(KeyOf<float>::kAbs));
  const __m512i want = _mm512_set1_epi32(static_cast<int>(bucket));
  const __m512i by = _mm512_set1_epi32(shift);
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m512i k = _mm512_and_si512(_mm512_loadu_si512(sp + i), abs_mask);  // abs_key
    const __mmask16 in = _mm512_cmpeq_epi32_mask(_mm512_maskz_srlv_epi32(0xFFFF, k, by), want);
    const int got = __builtin_popcount(in);
    if (got > room) {
      *over = true;
      return;
    }
    _mm512_mask_compressstoreu_epi32(out, in, k);
    out += got;
    room -= got;
  }
  for (; i < i1; ++i) {
    const uint32_t k = abs_key(sp[i]);
    if ((k >> shift) != bucket) continue;
    if (room-- == 0) {
      *over = true;
      return;
    }
    *out++ = k;
  }
  *over = *over || room != 0;
}

// The keep-th largest key v of |s| and how the entries equal to it are kept; 0 < keep < n.
template <typename scalar_t>
struct Threshold {
  using key_t = typename KeyOf<scalar_t>::key_t;
  key_t v;        // the key of the keep-th largest |s| (finite: NaN and inf raise first)
  bool all_ties;  // every entry equal to v is kept (else the lowest flat indices, room of them)
  int64_t room;   // places left after every non-NaN key above v
};

// v = the key of ascending rank r = n - keep (the keep-th largest). Pass 1: a histogram of the
// keys' top kTopBits bits finds v's bucket (and counts the non-finite keys: NaN or inf is
// `op`'s ValueError); pass 2 gathers that bucket's keys; v is then selected among those few
// candidates.
template <typename scalar_t>
Threshold<scalar_t> find_threshold(const char* op, const scalar_t* sp, int64_t n, int64_t keep) {
  using K = KeyOf<scalar_t>;
  using key_t = typename K::key_t;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const Chunks ch{n, std::max<int64_t>(1, std::min<int64_t>(nthreads, n / kChunkMin))};
  int64_t r = n - keep;
  constexpr int kKeyBits = 8 * sizeof(key_t);
  const int kTopBits = n >= kWideDigitMin ? 16 : 12;
  const int shift = kKeyBits - kTopBits;
  const int64_t kBuckets = int64_t{1} << kTopBits;
  std::vector<int64_t> hist(ch.count * kBuckets, 0);
  at::parallel_for(0, ch.count, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = hist.data() + c * kBuckets;
      for (int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) ++h[abs_key(sp[i]) >> shift];
    }
  });
  // Every key >= kInf (inf, NaN) lies in the buckets from kInf's to kNaN's (kInf's low bits are
  // 0, and every NaN has the one key kNaN): one or a few buckets per chunk.
  int64_t non_finite = 0;
  for (int64_t c = 0; c < ch.count; ++c)
    for (int64_t b = static_cast<int64_t>(K::kInf >> shift);
         b <= static_cast<int64_t>(K::kNaN >> shift); ++b)
      non_finite += hist[c * kBuckets + b];
  if (non_finite > 0) raise_non_finite(op, "scores contain", sp, n);
  int64_t below = 0;  // entries with key < v
  key_t bucket = 0;
  for (;; ++bucket) {
    int64_t cnt = 0;
    for (int64_t c = 0; c < ch.count; ++c) cnt += hist[c * kBuckets + bucket];
    if (r < below + cnt) break;
    below += cnt;
  }
  r -= below;
  // (No NaN is left: non_finite above counted every key >= kInf.)
  std::vector<std::vector<key_t>> parts(ch.count);
  const bool avx512 = std::is_same_v<scalar_t, float> && active_isa() == Isa::kAvx512;
  std::atomic<bool> changed{false};
  at::parallel_for(0, ch.count, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t* h = hist.data() + c * kBuckets;
      std::vector<key_t>& part = parts[c];
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (avx512) {
          part.resize(static_cast<size_t>(h[bucket]));
          bool over = false;
          gather_bucket_avx512(sp, ch.begin(c), ch.end(c), shift, static_cast<uint32_t>(bucket),
                               part.data(), h[bucket], &over);
          if (over) changed.store(true, std::memory_order_relaxed);
          continue;
        }
      }
      part.reserve(static_cast<size_t>(h[bucket]));
      for (int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) {
        const key_t k = abs_key(sp[i]);
        if ((k >> shift) == bucket) part.push_back(k);
      }
    }
  });
  std::vector<key_t> cand;
  for (const auto& part : parts) cand.insert(cand.end(), part.begin(), part.end());
  TORCH_CHECK(!changed.load() && r < static_cast<int64_t>(cand.size()), "binslt::", op,
              ": the scores changed while they were read (a tensor written by another thread "
              "during the selection)");
  std::nth_element(cand.begin(), cand.begin() + r, cand.end());
  const key_t v = cand[static_cast<size_t>(r)];
  int64_t ties = 0;  // entries with key == v
  for (const key_t k : cand) {
    below += k < v;
    ties += k == v;
  }
  const int64_t room = keep - (n - below - ties);
  return {v, ties <= room, room};
}

// tie_start[c]: the entries equal to v before range c of `ranges` (ranges[c] to ranges[c + 1]
// of sp), for a selection that keeps only some of them.
template <typename scalar_t, typename key_t>
std::vector<int64_t> tie_starts(const scalar_t* sp, const std::vector<int64_t>& ranges, key_t v) {
  const int64_t count = static_cast<int64_t>(ranges.size()) - 1;
  std::vector<int64_t> start(count, 0);
  at::parallel_for(0, count, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t cnt = 0;
      for (int64_t i = ranges[c], e = ranges[c + 1]; i < e; ++i) cnt += abs_key(sp[i]) == v;
      start[c] = cnt;
    }
  });
  int64_t acc = 0;
  for (int64_t c = 0; c < count; ++c) {
    const int64_t cnt = start[c];
    start[c] = acc;
    acc += cnt;
  }
  return start;
}

// Whether the entry of key k is kept; `seen` counts the entries equal to v met so far in flat
// order (read only when some of them are dropped).
template <typename scalar_t>
static inline bool kept_entry(const Threshold<scalar_t>& th,
                              typename Threshold<scalar_t>::key_t k, int64_t* seen) {
  using K = KeyOf<scalar_t>;
  if (th.all_ties) return k >= th.v && k != K::kNaN;
  if (k == th.v) return (*seen)++ < th.room;
  return k > th.v && k != K::kNaN;
}

template <typename scalar_t>
at::Tensor topk_mask_impl(const at::Tensor& scores, int64_t keep) {
  using K = KeyOf<scalar_t>;
  using key_t = typename K::key_t;
  const int64_t n = scores.numel();
  at::Tensor out = at::empty({n}, scores.options());
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* sp = scores.data_ptr<scalar_t>();
  if (keep >= n || keep <= 0) {  // no selection: the check is the only pass
    if (count_non_finite(sp, n) > 0) raise_non_finite("topk_mask", "scores contain", sp, n);
    return out.fill_(keep >= n ? 1 : 0).view(scores.sizes());
  }
  const Threshold<scalar_t> th = find_threshold("topk_mask", sp, n, keep);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const Chunks ch{n, std::max<int64_t>(1, std::min<int64_t>(nthreads, n / kChunkMin))};
  std::vector<int64_t> tie_start(ch.count, 0);
  if (!th.all_ties) {
    std::vector<int64_t> ranges(ch.count + 1);
    for (int64_t c = 0; c <= ch.count; ++c) ranges[c] = c < ch.count ? ch.begin(c) : n;
    tie_start = tie_starts(sp, ranges, th.v);
  }
  at::parallel_for(0, ch.count, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      if (th.all_ties) {  // the common case, branch-free
        for (int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) {
          const key_t k = abs_key(sp[i]);
          op[i] = (k >= th.v && k != K::kNaN) ? scalar_t(1) : scalar_t(0);
        }
      } else {
        int64_t seen = tie_start[c];
        for (int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i)
          op[i] = kept_entry(th, abs_key(sp[i]), &seen) ? scalar_t(1) : scalar_t(0);
      }
    }
  });
  return out.view(scores.sizes());
}

// scores: any shape, float32 or float64; keep: how many entries to keep -> {0, 1} mask like scores
at::Tensor topk_mask_cpu(const at::Tensor& scores_in, int64_t keep) {
  TORCH_CHECK_VALUE(scores_in.device().is_cpu(), "binslt::topk_mask: scores must be on the CPU, "
                    "got ", scores_in.device());
  TORCH_CHECK_TYPE(scores_in.scalar_type() == at::kFloat || scores_in.scalar_type() == at::kDouble,
                   "binslt::topk_mask: scores must be float32 or float64, got ",
                   scores_in.scalar_type());
  const at::Tensor scores = scores_in.contiguous();
  if (scores.scalar_type() == at::kFloat) return topk_mask_impl<float>(scores, keep);
  return topk_mask_impl<double>(scores, keep);
}


// One output channel's W_eff row er[0, n) = (alpha * sign(w)) * m, and the largest key of |v|
// (its bits with the sign cleared: non-negative floats order as these integers, NaN above +inf);
// *wtop gets the largest key of |w| (>= 0x7f800000: the row holds NaN or inf). Branch-free so
// that the compiler vectorises it; compiled for the wider vector units too (the
// baseline build leaves it scalar). The float arithmetic is the same on every path.
inline __attribute__((always_inline)) uint32_t sgp_row_body(int64_t n, float alpha,
                                                            const float* wr, const float* mr,
                                                            float* er, uint32_t* wtop) {
  uint32_t top = 0, wt = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = wr[i];
    uint32_t xkey;
    std::memcpy(&xkey, &x, sizeof(xkey));
    xkey &= 0x7fffffffu;
    wt = xkey > wt ? xkey : wt;
    const float sgn = static_cast<float>((0.0f < x) - (x < 0.0f));
    const float v = (alpha * sgn) * mr[i];
    er[i] = v;
    uint32_t key;
    std::memcpy(&key, &v, sizeof(key));
    key &= 0x7fffffffu;
    top = key > top ? key : top;
  }
  *wtop = wt;
  return top;
}
__attribute__((target("avx512f"))) uint32_t sgp_row_avx512(int64_t n, float alpha,
                                                           const float* wr, const float* mr,
                                                           float* er, uint32_t* wtop) {
  return sgp_row_body(n, alpha, wr, mr, er, wtop);
}
__attribute__((target("avx2"))) uint32_t sgp_row_avx2(int64_t n, float alpha, const float* wr,
                                                      const float* mr, float* er,
                                                      uint32_t* wtop) {
  return sgp_row_body(n, alpha, wr, mr, er, wtop);
}
uint32_t sgp_row(Isa isa, int64_t n, float alpha, const float* wr, const float* mr, float* er,
                 uint32_t* wtop) {
  if (isa == Isa::kAvx512) return sgp_row_avx512(n, alpha, wr, mr, er, wtop);
  if (isa == Isa::kAvx2) return sgp_row_avx2(n, alpha, wr, mr, er, wtop);
  return sgp_row_body(n, alpha, wr, mr, er, wtop);
}

// The bit-plane words of output channel o's W_eff row er: bit j of word cw at tap k is input
// channel 32 cw + j's value, mask bit v != 0 (NaN included), positive bit v > 0.
inline __attribute__((always_inline)) void plane_words_body(int64_t o, int64_t Ci, int64_t KK,
                                                            int64_t Cw, const float* er,
                                                            uint32_t* bm, uint32_t* bp) {
  for (int64_t k = 0; k < KK; ++k)
    for (int64_t cw = 0; cw < Cw; ++cw) {
      const int64_t c0 = cw * 32, n = std::min<int64_t>(Ci, c0 + 32) - c0;
      const float* e = er + c0 * KK + k;
      uint32_t wm = 0, wpos = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float v = e[j * KK];
        wm |= static_cast<uint32_t>(v != 0.0f) << j;
        wpos |= static_cast<uint32_t>(v > 0.0f) << j;
      }
      bm[(o * KK + k) * Cw + cw] = wm;
      bp[(o * KK + k) * Cw + cw] = wpos;
    }
}
void plane_words_base(int64_t o, int64_t Ci, int64_t KK, int64_t Cw, const float* er,
                      uint32_t* bm, uint32_t* bp) {
  plane_words_body(o, Ci, KK, Cw, er, bm, bp);
}
// The same with two 16-lane gathers per word (the values of a word lie KK floats apart).
__attribute__((target("avx512f"))) void plane_words_avx512(int64_t o, int64_t Ci, int64_t KK,
                                                           int64_t Cw, const float* er,
                                                           uint32_t* bm, uint32_t* bp) {
  // (the gather's int32 indices reach 15 * KK)
  if (15 * KK > INT32_MAX) return plane_words_body(o, Ci, KK, Cw, er, bm, bp);
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(KK)));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < KK; ++k)
    for (int64_t cw = 0; cw < Cw; ++cw) {
      const int64_t c0 = cw * 32, n = std::min<int64_t>(Ci, c0 + 32) - c0;
      const float* e = er + c0 * KK + k;
      uint32_t wm = 0, wpos = 0;
      for (int h = 0; h < 2 && 16 * h < n; ++h) {
        const int64_t m = std::min<int64_t>(16, n - 16 * h);
        const __mmask16 live = static_cast<__mmask16>((uint32_t{1} << m) - 1);
        const __m512 v = _mm512_mask_i32gather_ps(zero, live, idx, e + 16 * h * KK, 4);
        wm |= static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(live, v, zero, _CMP_NEQ_UQ))
              << (16 * h);
        wpos |= static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(live, v, zero, _CMP_GT_OQ))
                << (16 * h);
      }
      bm[(o * KK + k) * Cw + cw] = wm;
      bp[(o * KK + k) * Cw + cw] = wpos;
    }
}

struct PlanesOut {  // sign_gain_pack's outputs: mask and positive words, gain per channel
  uint32_t* bm;
  uint32_t* bp;
  float* gain;
};
// Output channel o of sign_gain_pack: its W_eff row er (Ci * KK weights wr, mask mr) first (a
// branch-free loop the compiler vectorises), then each (tap, word of 32 input channels) reads its
// 32 values back from L1 and stores its two bit-plane words once (one scalar pass doing both,
// with a read-modify-write of the words per weight, took ~2-3.6 ns per weight); out.gain[o] =
// max |W_eff|, NaN propagating. False where the weight row holds NaN or inf.
bool sign_gain_channel(Isa isa, int64_t o, int64_t Ci, int64_t KK, float alpha, const float* wr,
                       const float* mr, float* er, const PlanesOut& out) {
  const int64_t Cw = words_for(static_cast<int>(Ci));
  uint32_t wtop = 0;
  const uint32_t top = sgp_row(isa, Ci * KK, alpha, wr, mr, er, &wtop);
  if (isa == Isa::kAvx512)
    plane_words_avx512(o, Ci, KK, Cw, er, out.bm, out.bp);
  else
    plane_words_base(o, Ci, KK, Cw, er, out.bm, out.bp);
  float g;  // max |W_eff|, NaN if any is NaN
  std::memcpy(&g, &top, sizeof(g));
  out.gain[o] = top > 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : g;
  return wtop < 0x7f800000u;
}

// W_eff = (alpha * sign(w)) * M in float32, exactly the reference's expression (torch.sign: +1 for
// w > 0, -1 for w < 0, 0 otherwise, NaN included), with its bit planes and kernel gain in the same
// pass: what pack_weight(W_eff) and ops.max_abs_gain(W_eff) would return.
//   weight, mask: [Co, Ci, kh, kw] float32; alpha: 0-d or [Co] float32
//   -> w_eff like weight, (mask bits, positive bits) [Co, kh, kw, ceil(Ci/32)] int32,
//      kernel gain [Co] float32 (max |W_eff| over each output channel, NaN propagating)
// A weight holding NaN or inf is an error (ValueError), found in the pass that reads it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sign_gain_pack_cpu(
    const at::Tensor& weight_in, const at::Tensor& mask_in, const at::Tensor& alpha_in) {
  for (const auto* t : {&weight_in, &mask_in, &alpha_in})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "binslt::sign_gain_pack: tensors must be on the CPU, "
                      "got ", t->device());
  TORCH_CHECK_VALUE(weight_in.dim() == 4, "binslt::sign_gain_pack: weight must be [Co, Ci, kh, "
                    "kw], got shape ", shape_str(weight_in));
  TORCH_CHECK_VALUE(mask_in.sizes() == weight_in.sizes(), "binslt::sign_gain_pack: mask must "
                    "have the weight's shape ", shape_str(weight_in), ", got ", shape_str(mask_in));
  const int64_t Co = weight_in.size(0), Ci = weight_in.size(1), KH = weight_in.size(2),
                KW = weight_in.size(3);
  TORCH_CHECK_VALUE(alpha_in.dim() == 0 || (alpha_in.dim() == 1 && alpha_in.size(0) == Co),
                    "binslt::sign_gain_pack: alpha must be 0-d or [Co] = [", Co, "], got shape ",
                    shape_str(alpha_in));
  for (const auto* t : {&weight_in, &mask_in, &alpha_in})
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "binslt::sign_gain_pack: tensors must be "
                     "float32, got ", t->scalar_type());
  const at::Tensor w = weight_in.contiguous(), m = mask_in.contiguous();
  const at::Tensor a = alpha_in.contiguous();
  const int64_t Cw = words_for(static_cast<int>(Ci)), KK = KH * KW;
  at::Tensor w_eff = at::empty_like(w);
  at::Tensor bits_m = at::empty({Co, KH, KW, Cw}, w.options().dtype(at::kInt));
  at::Tensor bits_p = at::empty({Co, KH, KW, Cw}, w.options().dtype(at::kInt));
  at::Tensor gain = at::empty({Co}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const bool per_channel = a.dim() == 1;
  float* ep = w_eff.data_ptr<float>();
  uint32_t* bm = reinterpret_cast<uint32_t*>(bits_m.data_ptr<int32_t>());
  uint32_t* bp = reinterpret_cast<uint32_t*>(bits_p.data_ptr<int32_t>());
  float* gp = gain.data_ptr<float>();
  const Isa isa = active_isa();
  std::atomic<bool> weight_bad{false};
  at::parallel_for(0, Co, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Ci * KK)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t at = o * Ci * KK;
      if (!sign_gain_channel(isa, o, Ci, KK, ap[per_channel ? o : 0], wp + at, mp + at, ep + at,
                             {bm, bp, gp}))
        weight_bad.store(true, std::memory_order_relaxed);
    }
  });
  if (weight_bad.load()) raise_non_finite("sign_gain_pack", "weight contains", wp, w.numel());
  return {w_eff, bits_m, bits_p, gain};
}

// One output channel's row of search_sign_pack's selection pass, every entry equal to v kept
// (the common case): the byte mask mb[i] = (|s_i| >= v) over n scores sr (finite: checked by the
// selection), *kept their count, *wtop the largest key of |w| (>= 0x7f800000: the row holds NaN
// or inf). The sum of |w| over the kept entries, in double, goes into sixteen running sums,
// entry i into sum i % 16, added up by lane_total: the same order on every ISA.
constexpr int kSumLanes = 16;
inline double lane_total(const double* acc) {
  double t[8];
  for (int j = 0; j < 8; ++j) t[j] = acc[j] + acc[j + 8];
  return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}
// Entries [i, n) (at most 16, i a multiple of 16) of a row, entry i + j into running sum j.
inline __attribute__((always_inline)) void select_lanes(int64_t i, int64_t n, uint32_t v,
                                                        const float* sr, const float* wr,
                                                        uint8_t* mb, double* acc, int64_t* cnt,
                                                        uint32_t* wt) {
  for (int j = 0; i < n; ++i, ++j) {
    uint32_t sk, wk;
    std::memcpy(&sk, sr + i, sizeof(sk));
    std::memcpy(&wk, wr + i, sizeof(wk));
    sk &= 0x7fffffffu;
    wk &= 0x7fffffffu;
    *wt = wk > *wt ? wk : *wt;
    float aw;
    std::memcpy(&aw, &wk, sizeof(aw));
    const bool k = sk >= v;
    acc[j] += k ? static_cast<double>(aw) : 0.0;
    *cnt += k;
    mb[i] = k;
  }
}
double select_row_base(int64_t n, uint32_t v, const float* sr, const float* wr, uint8_t* mb,
                       int64_t* kept, uint32_t* wtop) {
  double acc[kSumLanes] = {};
  int64_t cnt = 0;
  uint32_t wt = 0;
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    select_lanes(i, i + kSumLanes, v, sr, wr, mb, acc, &cnt, &wt);
  select_lanes(i, n, v, sr, wr, mb, acc, &cnt, &wt);
  *wtop = wt;
  *kept = cnt;
  return lane_total(acc);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt"))) double select_row_avx512(
    int64_t n, uint32_t v, const float* sr, const float* wr, uint8_t* mb, int64_t* kept,
    uint32_t* wtop) {
  const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff), vv = _mm512_set1_epi32(
      static_cast<int>(v));
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  __m512i wt = _mm512_setzero_si512();
  int64_t cnt = 0;
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    const __m512i sk = _mm512_and_si512(_mm512_loadu_si512(sr + i), abs_bits);
    const __m512i wk = _mm512_and_si512(_mm512_loadu_si512(wr + i), abs_bits);
    wt = _mm512_max_epu32(wt, wk);
    const __mmask16 k = _mm512_cmpge_epu32_mask(sk, vv);
    const __m512 aw = _mm512_maskz_mov_ps(k, _mm512_castsi512_ps(wk));
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(aw)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(
                               _mm512_extractf64x4_pd(_mm512_castps_pd(aw), 1))));
    cnt += __builtin_popcount(static_cast<unsigned>(k));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(mb + i),
                     _mm_maskz_mov_epi8(k, _mm_set1_epi8(1)));
  }
  double acc[kSumLanes];
  _mm512_storeu_pd(acc, lo);
  _mm512_storeu_pd(acc + 8, hi);
  uint32_t top = _mm512_reduce_max_epu32(wt);
  select_lanes(i, n, v, sr, wr, mb, acc, &cnt, &top);
  *wtop = top;
  *kept = cnt;
  return lane_total(acc);
}
double select_row(Isa isa, int64_t n, uint32_t v, const float* sr, const float* wr, uint8_t* mb,
                  int64_t* kept, uint32_t* wtop) {
  if (isa == Isa::kAvx512) return select_row_avx512(n, v, sr, wr, mb, kept, wtop);
  return select_row_base(n, v, sr, wr, mb, kept, wtop);
}

// The search step's weight side in one op: topk_mask's selection of the keep largest |s| (ties
// to the lower flat index), biprop's gain alpha = sum(|w| * M) / sum(M) (per output channel with
// per_channel), and sign_gain_pack's W_eff = (alpha * sign(w)) * M with its bit planes and gain,
// without the float mask: the selection's two passes over the scores, one pass over scores and
// weight writing a byte mask and the gain's sums, one writing W_eff and the planes. The gain's
// sums are taken in double and rounded once (reference.mean_abs_gain's definition).
//   weight, scores: [Co, Ci, kh, kw] float32; keep: how many entries to keep
//   -> what sign_gain_pack(weight, topk_mask(scores, keep), alpha) returns
// NaN or inf in the scores or the weight is an error (ValueError).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search_sign_pack_cpu(
    const at::Tensor& weight_in, const at::Tensor& scores_in, int64_t keep, bool per_channel) {
  for (const auto* t : {&weight_in, &scores_in}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "binslt::search_sign_pack: tensors must be on the "
                      "CPU, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "binslt::search_sign_pack: tensors must be "
                     "float32, got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(weight_in.dim() == 4, "binslt::search_sign_pack: weight must be [Co, Ci, "
                    "kh, kw], got shape ", shape_str(weight_in));
  TORCH_CHECK_VALUE(scores_in.sizes() == weight_in.sizes(), "binslt::search_sign_pack: scores "
                    "must have the weight's shape ", shape_str(weight_in), ", got ",
                    shape_str(scores_in));
  const at::Tensor w = weight_in.contiguous(), sc = scores_in.contiguous();
  const int64_t Co = w.size(0), Ci = w.size(1), KK = w.size(2) * w.size(3), R = Ci * KK;
  const int64_t n = w.numel(), Cw = words_for(static_cast<int>(Ci));
  const float* wp = w.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  // The selection: every entry kept (v = 0), none (v above every finite key) or a threshold.
  Threshold<float> th{0, true, 0};
  if (keep >= n || keep <= 0) {
    if (count_non_finite(sp, n) > 0) raise_non_finite("search_sign_pack", "scores contain", sp, n);
    th.v = keep >= n ? 0u : KeyOf<float>::kInf;
  } else {
    th = find_threshold("search_sign_pack", sp, n, keep);
  }
  std::vector<int64_t> tie_start;
  if (!th.all_ties) {
    std::vector<int64_t> ranges(Co + 1);
    for (int64_t o = 0; o <= Co; ++o) ranges[o] = o * R;
    tie_start = tie_starts(sp, ranges, th.v);
  }
  // Pass 1: the byte mask, the kept count and sum of |w| per output channel.
  at::Tensor mask = at::empty({n}, w.options().dtype(at::kByte));
  uint8_t* mp = mask.data_ptr<uint8_t>();
  std::vector<double> sums(Co);
  std::vector<int64_t> counts(Co);
  const Isa isa = active_isa();
  std::atomic<bool> weight_bad{false};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, R));
  at::parallel_for(0, Co, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* sr = sp + o * R;
      const float* wr = wp + o * R;
      uint8_t* mr = mp + o * R;
      uint32_t wtop = 0;
      if (th.all_ties) {
        sums[o] = select_row(isa, R, th.v, sr, wr, mr, &counts[o], &wtop);
      } else {
        int64_t seen = tie_start[o], cnt = 0;
        double sum = 0.0;
        for (int64_t i = 0; i < R; ++i) {
          const bool k = kept_entry(th, abs_key(sr[i]), &seen);
          const uint32_t wk = abs_key(wr[i]);
          wtop = wk > wtop ? wk : wtop;
          mr[i] = k;
          cnt += k;
          sum += k ? static_cast<double>(std::fabs(wr[i])) : 0.0;
        }
        sums[o] = sum;
        counts[o] = cnt;
      }
      if (wtop >= 0x7f800000u) weight_bad.store(true, std::memory_order_relaxed);
    }
  });
  if (weight_bad.load()) raise_non_finite("search_sign_pack", "weight contains", wp, n);
  // alpha: per output channel, or one over the whole weight (the rows' sums added in order).
  std::vector<float> alpha(per_channel ? Co : 1);
  if (per_channel) {
    for (int64_t o = 0; o < Co; ++o)
      alpha[o] = counts[o] > 0 ? static_cast<float>(sums[o] / static_cast<double>(counts[o]))
                               : 0.0f;
  } else {
    double sum = 0.0;
    int64_t cnt = 0;
    for (int64_t o = 0; o < Co; ++o) {
      sum += sums[o];
      cnt += counts[o];
    }
    alpha[0] = cnt > 0 ? static_cast<float>(sum / static_cast<double>(cnt)) : 0.0f;
  }
  // Pass 2: W_eff, its planes and gain per output channel (sign_gain_pack's channel).
  at::Tensor w_eff = at::empty_like(w);
  at::Tensor bits_m = at::empty({Co, w.size(2), w.size(3), Cw}, w.options().dtype(at::kInt));
  at::Tensor bits_p = at::empty({Co, w.size(2), w.size(3), Cw}, w.options().dtype(at::kInt));
  at::Tensor gain = at::empty({Co}, w.options());
  float* ep = w_eff.data_ptr<float>();
  uint32_t* bm = reinterpret_cast<uint32_t*>(bits_m.data_ptr<int32_t>());
  uint32_t* bp = reinterpret_cast<uint32_t*>(bits_p.data_ptr<int32_t>());
  float* gp = gain.data_ptr<float>();
  at::parallel_for(0, Co, grain, [&](int64_t begin, int64_t end) {
    line_vector<float> row(R);
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* mr = mp + o * R;
      for (int64_t i = 0; i < R; ++i) row[i] = static_cast<float>(mr[i]);
      sign_gain_channel(isa, o, Ci, KK, alpha[per_channel ? o : 0], wp + o * R, row.data(),
                        ep + o * R, {bm, bp, gp});
    }
  });
  return {w_eff, bits_m, bits_p, gain};
}

// biprop's score gradient, (grad * w) * sign(s) in float32 (reference.search_score_grad's
// expression, bit for bit), in one pass. grad, weight, scores: one shape, float32.
at::Tensor search_score_grad_cpu(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                 const at::Tensor& scores_in) {
  for (const auto* t : {&grad_in, &weight_in, &scores_in}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "binslt::search_score_grad: tensors must be on the "
                      "CPU, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "binslt::search_score_grad: tensors must "
                     "be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == scores_in.sizes(), "binslt::search_score_grad: grad, weight "
                      "and scores must have one shape, got ", shape_str(grad_in), ", ",
                      shape_str(weight_in), " and ", shape_str(scores_in));
  }
  const at::Tensor g = grad_in.contiguous(), w = weight_in.contiguous(),
                   sc = scores_in.contiguous();
  at::Tensor out = at::empty_like(sc, at::MemoryFormat::Contiguous);
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, sc.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float x = sp[i];
      op[i] = (gp[i] * wp[i]) * static_cast<float>((0.0f < x) - (x < 0.0f));
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("topk_mask", &binslt::cpu::topk_mask_cpu);
  m.impl("sign_gain_pack", &binslt::cpu::sign_gain_pack_cpu);
  m.impl("search_sign_pack", &binslt::cpu::search_sign_pack_cpu);
  m.impl("search_score_grad", &binslt::cpu::search_score_grad_cpu);
}
