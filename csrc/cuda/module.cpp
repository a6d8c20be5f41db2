// binslt._C_cuda: Python module entry for the CUDA kernels. The kernels bind to the binslt:: op
// schemas (declared in Python, binslt/_schemas.py) through TORCH_LIBRARY_IMPL(binslt, CUDA, m) in
// their own translation units. Importing this module needs no GPU: nothing here touches a device.
#include <torch/extension.h>

#include "api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "binslt CUDA kernels (bound to the binslt:: ops through the dispatcher)";
  m.def("build_info", &binslt::cuda::build_info,
        "CUDA toolkit version and GPU architectures compiled into this extension");
  m.def("set_bconv_impl", &binslt::cuda::set_bconv_impl, py::arg("impl"),
        "Force the bconv_lif forward kernel: 'auto', 'wmma' (int8 tensor cores) or 'popc'");
  m.def("get_bconv_impl", &binslt::cuda::get_bconv_impl, "The forced bconv_lif forward kernel");
}
