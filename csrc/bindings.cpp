// Python bindings of memformer_fast._C.
//
// pybind11 rather than a torch.library custom class: the buffer is stateful host-side
// orchestration that MRBP drives from eager Python between autograd.backward calls, never from
// inside a torch.compile graph, TorchScript or an exported program, so what a custom class adds
// (schema-typed methods, serialisation, a fake class for tracing) would buy nothing here. pybind11
// gives keyword arguments, properties and __len__, torch.dtype/torch.device conversions, and
// torch's translation of TORCH_CHECK_INDEX/VALUE/TYPE into IndexError/ValueError/TypeError.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 casters for Tensor, torch.dtype, torch.device
#include <torch/version.h>

#include <string>

#include "cuda/runtime_ops.h"
#include "replay_buffer.h"

namespace {

// Bumped whenever the Python face (memformer_fast/replay.py) needs a different _C: a module
// built from older sources is then rejected with a rebuild hint instead of misbehaving.
constexpr int kApiVersion = 1;

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using memformer_fast::ReplayBuffer;
  namespace cuda = memformer_fast::cuda;

  m.doc() = "Compiled core of memformer_fast: the MRBP replay buffer (CPU and CUDA).";
  m.attr("API_VERSION") = kApiVersion;
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
  m.attr("WITH_CUDA") = cuda::built_with_cuda();
  m.attr("COMPILER") = compiler();
  m.attr("CUDA_VERSION") = cuda::compiled_runtime_version();
  m.attr("CUDA_ARCHS") = cuda::compiled_archs();
  m.def("cuda_runtime_version", &cuda::runtime_version,
        "cudaRuntimeGetVersion of the loaded runtime (0 without CUDA).");

  py::class_<ReplayBuffer>(m, "ReplayBuffer",
                           "Preallocated storage for `capacity` states of one shape and dtype.")
      .def(py::init<int64_t, std::vector<int64_t>, at::ScalarType, at::Device, bool>(),
           py::arg("capacity"), py::arg("shape"), py::arg("dtype"), py::arg("device"),
           py::arg("offload") = false)
      .def("push", &ReplayBuffer::push, py::arg("state"), py::arg("rng_seed") = 0)
      .def("get", &ReplayBuffer::get, py::arg("index"))
      .def("rng_seed", &ReplayBuffer::rng_seed, py::arg("index"))
      .def("prefetch", &ReplayBuffer::prefetch, py::arg("index"))
      .def("pop", &ReplayBuffer::pop)
      .def("clear", &ReplayBuffer::clear)
      .def("nbytes", &ReplayBuffer::nbytes, py::arg("where"))
      .def("__len__", &ReplayBuffer::size)
      .def_property_readonly("capacity", &ReplayBuffer::capacity)
      .def_property_readonly(
          "shape", [](const ReplayBuffer& buffer) { return py::tuple(py::cast(buffer.shape())); })
      .def_property_readonly("dtype", &ReplayBuffer::dtype)
      .def_property_readonly("device", &ReplayBuffer::device)
      .def_property_readonly("offload", &ReplayBuffer::offload)
      .def_property_readonly("fetch_misses", &ReplayBuffer::fetch_misses);
}
