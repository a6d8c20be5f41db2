// empty_big and its block cache (big_tensor.h). A block is a page-aligned allocation of a size
// rounded up to whole 4 KiB pages; a freed one goes to the front of the free list, and an
// allocation of the same rounded size takes the most recently freed such block. Held blocks go
// back to the C allocator from the least recently freed end: on a miss, as many bytes as the
// miss allocates (trim(held - bytes)), and past the limit.
#include "binslt/big_tensor.h"

#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>

#if defined(__unix__)
#include <pthread.h>
#endif

namespace binslt {
namespace cpu {

namespace {

constexpr size_t kPage = 4096;
constexpr int64_t kDefaultLimitMiB = 256;

int64_t limit_from_env() {
  const char* env = std::getenv("BINSLT_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mib >= 0,
                    "binslt: BINSLT_CPU_CACHE_MB must be a whole number of MiB >= 0 (0 turns the "
                    "CPU block cache off), got '", env, "'");
  return static_cast<int64_t>(mib) << 20;
}

class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = [] {
      auto* c = new BlockCache();  // never destroyed: deleters may run at exit
#if defined(__unix__)
      // A child forked while another thread held the lock (a DataLoader worker) gets a fresh
      // lock; the blocks are its copies of the parent's, its own to reuse.
      pthread_atfork(nullptr, nullptr, [] { new (&get().mu_) std::mutex(); });
#endif
      return c;
    }();
    return *cache;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->first == bytes) {
          void* p = it->second;
          held_ -= static_cast<int64_t>(bytes);
          free_.erase(it);
          ++hits_;
          return p;
        }
      ++misses_;
      trim(std::max<int64_t>(0, held_ - static_cast<int64_t>(bytes)));  // the exchange
    }
    void* p = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kPage, bytes) == 0 && p != nullptr,
                     "binslt: could not allocate ", bytes, " bytes of CPU memory");
    std::lock_guard<std::mutex> lock(mu_);
    size_[p] = bytes;
    return p;
  }

  void give(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = size_.find(p);
    TORCH_INTERNAL_ASSERT(it != size_.end(), "binslt: a block the CPU cache did not allocate");
    free_.emplace_front(it->second, p);
    held_ += static_cast<int64_t>(it->second);
    trim(limit());
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {held_, limit(), hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes < 0 ? limit_from_env() : bytes;
    trim(limit_);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mu_);
    trim(0);
  }

 private:
  int64_t limit() {
    if (limit_ < 0) limit_ = limit_from_env();
    return limit_;
  }
  // Free the least recently freed blocks until at most `keep` bytes are held (lock held).
  void trim(int64_t keep) {
    while (held_ > keep && !free_.empty()) {
      const auto [bytes, p] = free_.back();
      free_.pop_back();
      held_ -= static_cast<int64_t>(bytes);
      size_.erase(p);
      std::free(p);
    }
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> size_;  // every block allocated here and not yet freed
  std::list<std::pair<size_t, void*>> free_;  // freed blocks, most recently freed first
  int64_t held_ = 0, limit_ = -1, hits_ = 0, misses_ = 0;
};

void give_back(void* p) {
  if (p != nullptr) BlockCache::get().give(p);
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &give_back, c10::Device(c10::DeviceType::CPU)};
    void* p = BlockCache::get().take((n + kPage - 1) / kPage * kPage);
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts,
                     std::optional<at::MemoryFormat> memory_format) {
  const int64_t bytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(opts.dtype().itemsize());
  if (bytes < kBigTensorBytes || opts.device().type() != c10::DeviceType::CPU ||
      BlockCache::get().info().limit == 0)
    return at::empty(sizes, opts, memory_format);
  static CachingAllocator allocator;
  at::Tensor t = at::detail::empty_generic(sizes, &allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(opts.dtype()),
                                           memory_format);
  // as at::empty does under torch.use_deterministic_algorithms with
  // torch.utils.deterministic.fill_uninitialized_memory
  if (at::globalContext().deterministicAlgorithms() &&
      at::globalContext().deterministicFillUninitializedMemory())
    at::native::fill_empty_deterministic_(t);
  return t;
}

BlockCacheInfo block_cache_info() { return BlockCache::get().info(); }
void set_block_cache_limit(int64_t bytes) { BlockCache::get().set_limit(bytes); }
void empty_block_cache() { BlockCache::get().empty(); }

}  // namespace cpu
}  // namespace binslt
