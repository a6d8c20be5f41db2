// binslt._C: Python module entry for the CPU kernels. The kernels themselves register with the
// dispatcher through TORCH_LIBRARY_IMPL(binslt, CPU, m) in their own translation units; the op
// schemas are declared once, in Python (binslt/_schemas.py).
#include <torch/extension.h>

#include "binslt/cpu_algos.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = binslt::cpu;
  m.doc() = "binslt CPU kernels (bound to the binslt:: ops through the dispatcher)";
  m.def("_cpu_kernel_isa", &cpu::cpu_kernel_isa,
        "The instruction-set path the CPU kernels take now: 'avx512' (needs avx512f, avx512bw, "
        "avx512vl and avx512vpopcntdq), 'avx2', 'popcnt' or 'scalar'");
  m.def("_cpu_features", &cpu::cpu_feature_flags,
        "The CPU feature flags the kernel paths depend on, {name: bool} (empty off x86-64)");
  m.def("_cpu_openmp", &cpu::cpu_openmp, "Whether this build runs its kernels with OpenMP");
  m.def("_cpu_algorithms", &cpu::cpu_algorithms,
        "The algorithm configuration: {'isa', 'conv', 'grad_x', 'grad_w'} -> name ('auto' = "
        "chosen per call by the measured rules)");
  m.def("_set_cpu_algorithms", &cpu::set_cpu_algorithms, py::arg("isa"), py::arg("conv"),
        py::arg("grad_x"), py::arg("grad_w"),
        "Set the whole configuration (use binslt.ops.cpu_algorithms): isa 'auto', 'scalar', "
        "'popcnt', 'avx2' or 'avx512'; conv 'auto', 'dense' (AND+popcount over every input "
        "word) or 'event' (sum the weight columns of the input spikes); grad_x 'auto', 'dense' "
        "(ATen transposed convolution), 'ternary' (add/subtract of dZ rows, AVX-512, stride 1) "
        "or 'combo' (the same over signed sums of four dZ rows); grad_w 'auto', 'event' (sums "
        "of dZ rows over the input's set bits) or 'dense' (ATen's weight-gradient convolution "
        "of the unpacked input). ValueError for an unknown name, RuntimeError for a path this "
        "CPU cannot run");
}
