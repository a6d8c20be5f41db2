// std::vector whose storage starts on a 64-byte line. The kernels' per-thread scratch rows are
// read and written with 512-bit loads; glibc's malloc aligns to 16 bytes only, so a plain
// std::vector<float> starts at a different offset in its cache line from one process to the next,
// and every 64-byte load of a row then spans two lines or one. The event weight gradient at the
// plan check's anchor (128->128 16x16, T=4, N=16) read ~9 or ~16 ms by that offset alone.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace binslt {
namespace cpu {

template <class T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;
  LineAllocator() = default;
  template <class U>
  LineAllocator(const LineAllocator<U>&) {}  // NOLINT: rebinding, as the standard allocators do
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kAlign}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kAlign}); }
  template <class U>
  bool operator==(const LineAllocator<U>&) const {
    return true;
  }
  template <class U>
  bool operator!=(const LineAllocator<U>&) const {
    return false;
  }
};

template <class T>
using line_vector = std::vector<T, LineAllocator<T>>;

}  // namespace cpu
}  // namespace binslt
