// binslt._C: Python module entry for the CPU kernels. The kernels themselves register with the
// dispatcher through TORCH_LIBRARY_IMPL(binslt, CPU, m) in their own translation units; the op
// schemas are declared once, in Python (binslt/_schemas.py).
#include <torch/extension.h>

#include <string>

namespace binslt {

// Which CPU paths this build can take on this machine (chosen at runtime).
std::string cpu_features() {
  std::string out;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  out += __builtin_cpu_supports("avx2") ? "avx2" : "no-avx2";
  out += __builtin_cpu_supports("popcnt") ? ",popcnt" : ",no-popcnt";
  out += __builtin_cpu_supports("avx512f") ? ",avx512f" : "";
#else
  out += "portable";
#endif
#ifdef _OPENMP
  out += ",openmp";
#endif
  return out;
}

}  // namespace binslt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "binslt CPU kernels (bound to the binslt:: ops through the dispatcher)";
  m.def("cpu_features", &binslt::cpu_features, "CPU features the kernels can use here");
}
