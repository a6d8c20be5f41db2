// binslt._C: Python module entry for the CPU kernels. The kernels themselves register with the
// dispatcher through TORCH_LIBRARY_IMPL(binslt, CPU, m) in their own translation units; the op
// schemas are declared once, in Python (binslt/_schemas.py).
#include <torch/extension.h>

#include <string>

namespace binslt {

namespace cpu {
void set_cpu_isa(const std::string& name);  // bconv_lif.cpp
std::string cpu_isa();
void set_cpu_conv_algo(const std::string& name);
std::string cpu_conv_algo();
void set_cpu_grad_x_algo(const std::string& name);
std::string cpu_grad_x_algo();
}  // namespace cpu

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
  m.def("_set_cpu_isa", &binslt::cpu::set_cpu_isa, py::arg("name"),
        "Force the popcount path of bconv_lif: 'auto', 'scalar', 'popcnt', 'avx2' or 'avx512' "
        "(for tests and benchmarks; raises if this CPU cannot run it)");
  m.def("_cpu_isa", &binslt::cpu::cpu_isa, "The popcount path bconv_lif uses now");
  m.def("_set_cpu_conv_algo", &binslt::cpu::set_cpu_conv_algo, py::arg("name"),
        "Force the forward algorithm of bconv_lif: 'auto' (by input firing rate), 'dense' "
        "(AND+popcount over every input word) or 'event' (sum the weight columns of the input "
        "spikes); for tests and benchmarks");
  m.def("_cpu_conv_algo", &binslt::cpu::cpu_conv_algo, "The forced conv algorithm, or 'auto'");
  m.def("_set_cpu_grad_x_algo", &binslt::cpu::set_cpu_grad_x_algo, py::arg("name"),
        "Force the input-gradient algorithm of bconv_lif_bwd: 'auto', 'dense' (oneDNN "
        "transposed convolution), 'ternary' (add/subtract of dZ rows, AVX-512, stride 1) or "
        "'combo' (the same over signed sums of four dZ rows; its buffer grows with the map, "
        "~65 MB per thread at 224x224); for tests and benchmarks");
  m.def("_cpu_grad_x_algo", &binslt::cpu::cpu_grad_x_algo,
        "The forced input-gradient algorithm, or 'auto'");
}
