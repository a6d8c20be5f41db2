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
        "Set the whole configuration (use binslt.ops.cpu_algorithms, which lists the names). "
        "ValueError for an unknown name, RuntimeError for a path this CPU cannot run");
  m.def("_plan_forward", &cpu::plan_forward_for, py::arg("x_shape"), py::arg("weight_shape"),
        py::arg("stride"), py::arg("padding"), py::arg("rate"), py::arg("infer"),
        "The forward plan of a conv: x_shape [T, N, Ci, H, W], weight_shape [Co, Ci, kh, kw], "
        "rate the input's fraction of spikes, infer bconv_lif_infer (else bconv_lif) -> "
        "{'isa', 'forward'} (use binslt.ops.plan.forward_plan)");
  m.def("_plan_backward", &cpu::plan_backward_for, py::arg("x_shape"), py::arg("weight_shape"),
        py::arg("stride"), py::arg("padding"), py::arg("rate"), py::arg("weight_density"),
        py::arg("need_grad_x"),
        "The backward plan of a conv -> {'isa', 'grad_x', 'grad_w'} (use "
        "binslt.ops.plan.backward_plan)");
  m.def("_plan_verbose", &cpu::plan_verbose,
        "Whether the CPU conv ops log their plans now (BINSLT_VERBOSE or binslt.ops.plan.verbose)");
  m.def("_set_plan_verbose", &cpu::set_plan_verbose, py::arg("on"),
        "Log each CPU conv op call's plan to stderr (besides BINSLT_VERBOSE=1)");
}
