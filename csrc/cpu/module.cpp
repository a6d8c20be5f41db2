// binslt._C: Python module entry for the CPU kernels. The kernels themselves register with the
// dispatcher through TORCH_LIBRARY_IMPL(binslt, CPU, m) in their own translation units; the op
// schemas are declared once, in Python (binslt/_schemas.py).
#include <torch/extension.h>

#include "binslt/bconv_cpu.h"
#include "binslt/big_tensor.h"
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
  m.def("_bf16_split", &cpu::bf16_split, py::arg("x"),
        "x (float32) as ([3, *x.shape] parts exact in bf16, e): x == (p0 + p1 + p2) * 2^e (the "
        "split of the 'bf16x3' gradient forms); ValueError for NaN or inf");
  m.def("_int8_input_grad", &cpu::int8_input_grad_for, py::arg("gz"), py::arg("w_mask"),
        py::arg("w_pos"), py::arg("alpha"), py::arg("Ci"), py::arg("H"), py::arg("W"),
        py::arg("stride"), py::arg("padding"), py::arg("exec"),
        "The 'int8' input gradient of dZ [B, Co, Ho, Wo] (a CPU with AMX-INT8 or VNNI): "
        "[B, Ci, H, W], or None where dZ holds NaN or inf; exec 'conv' or 'unfolded' forces one "
        "of its two executions (the same integer sums), 'auto' takes the op's");
  m.def("_plan_forward", &cpu::plan_forward_for, py::arg("x_shape"), py::arg("weight_shape"),
        py::arg("stride"), py::arg("padding"), py::arg("rate"), py::arg("op"),
        py::arg("packed_out") = false,
        "The table's forward plan of a conv: x_shape [T, N, Ci, H, W], weight_shape [Co, Ci, "
        "kh, kw], rate the input's fraction of spikes, op 'bconv_lif', 'bconv_lif_infer' or "
        "'bconv_affine_infer', packed_out the inference op's packed spike output -> {'isa', "
        "'forward', 'source'} (use "
        "binslt.ops.plan.forward_plan)");
  m.def("_plan_backward", &cpu::plan_backward_for, py::arg("x_shape"), py::arg("weight_shape"),
        py::arg("stride"), py::arg("padding"), py::arg("rate"), py::arg("weight_density"),
        py::arg("need_grad_x"),
        "The backward plan of a conv -> {'isa', 'grad_x', 'grad_w'} (use "
        "binslt.ops.plan.backward_plan)");
  m.def("_plan_measure_mode", &cpu::measure_mode_name,
        "What the CPU conv ops measure now: 'off', 'forward' or 'all' (binslt.ops.plan.measure)");
  m.def("_set_plan_measure", &cpu::set_measure_mode, py::arg("mode"),
        "Measure 'off', 'forward' or 'all', or 'env' (follow BINSLT_PLAN_MEASURE)");
  m.def("_rate_bucket", &cpu::rate_bucket, py::arg("rate"),
        "The rate bucket of a fraction of set bits in a measured plan's key");
  m.def("_plan_cache_configure", &cpu::plan_cache_configure, py::arg("path"), py::arg("cpu"),
        py::arg("build"), "The file the measured plans are written to, and what they hold for");
  m.def("_plan_cache_insert", &cpu::plan_cache_insert, py::arg("key"), py::arg("winner"),
        py::arg("ms"), "One measured plan (loaded from the file)");
  m.def("_plan_cache_entries", &cpu::plan_cache_entries,
        "The measured plans' times: {key: {candidate: ms}}");
  m.def("_plan_cache_winners", &cpu::plan_cache_winners,
        "The measured plans: {key: winner}");
  m.def("_plan_cache_clear", &cpu::plan_cache_clear,
        "Forget the measured plans in memory (the file stays)");
  m.def("_plan_verbose", &cpu::plan_verbose,
        "Whether the CPU conv ops log their plans now (BINSLT_VERBOSE or binslt.ops.plan.verbose)");
  m.def(
      "_cpu_cache_info",
      [] {
        const cpu::BlockCacheInfo i = cpu::block_cache_info();
        return py::dict(py::arg("held") = i.held, py::arg("limit") = i.limit,
                        py::arg("hits") = i.hits, py::arg("misses") = i.misses);
      },
      "The CPU block cache (big_tensor.h): {'held', 'limit', 'hits', 'misses'}");
  m.def("_set_cpu_cache_limit", &cpu::set_block_cache_limit, py::arg("bytes"),
        "Keep at most bytes of freed blocks (-1: BINSLT_CPU_CACHE_MB again)");
  m.def("_empty_cpu_cache", &cpu::empty_block_cache, "Free every block the CPU cache holds");
  m.def("_set_plan_verbose", &cpu::set_plan_verbose, py::arg("on"),
        "Log each CPU conv op call's plan to stderr (besides BINSLT_VERBOSE=1)");
}
