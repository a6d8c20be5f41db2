// Large CPU tensors from a block cache: the kernels' big outputs and scratch (spike maps, counts,
// dL/dZ, input gradients) are tens of MiB each and live for a part of one training step. From
// glibc each one is a fresh mapping whose pages the kernel faults in and zeroes on first touch
// (a 128->128 32x32 layer's forward and backward, T=4, N=32, on a 2-core Xeon: 250 ms, 200 ms
// with the cache). empty_big takes such a tensor from a cache of freed blocks of the same size,
// so a step reuses the memory of the step before.
//
// A miss (no freed block of the size) first frees at least as many held bytes as it allocates,
// least recently freed first: the cache turns misses into exchanges, so binslt's own large
// allocations never add to the resident memory on top of what the cache holds (allocations of
// other code made while blocks are held can). It holds at most a limit of freed bytes besides
// (BINSLT_CPU_CACHE_MB in the environment, or binslt.ops.set_cpu_cache_limit; default 256 MiB,
// 0 turns it off); live tensors are not counted.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace binslt {
namespace cpu {

// Tensors of at least this many bytes come from the cache; smaller ones from at::empty.
constexpr int64_t kBigTensorBytes = int64_t{4} << 20;

// at::empty(sizes, opts, memory_format) for a CPU tensor, from the block cache when it is large.
at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts,
                     std::optional<at::MemoryFormat> memory_format = std::nullopt);

// The cache's state: held (freed bytes kept), limit, hits and misses (large allocations served
// from the cache or from the C allocator) since the process started.
struct BlockCacheInfo {
  int64_t held, limit, hits, misses;
};
BlockCacheInfo block_cache_info();
// Set the limit (bytes >= 0; -1: from BINSLT_CPU_CACHE_MB again) and drop what is above it.
void set_block_cache_limit(int64_t bytes);
// Free every held block (the limit stays).
void empty_block_cache();

}  // namespace cpu
}  // namespace binslt
