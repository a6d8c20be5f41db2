// Entry points of binslt._C_cuda shared between its translation units (the op kernels register
// themselves with TORCH_LIBRARY_IMPL(binslt, CUDA, m); these are the extra module functions).
#pragma once

#include <string>

namespace binslt {
namespace cuda {

// Which binary-conv forward kernel bconv_lif uses: "auto" (int8 tensor cores on sm_80+, else the
// popcount kernel), "wmma" or "popc". Tests switch it to check both paths.
void set_bconv_impl(const std::string& impl);
std::string get_bconv_impl();

// Toolkit version and the GPU architectures this build holds code for (no device needed).
std::string build_info();

}  // namespace cuda
}  // namespace binslt
