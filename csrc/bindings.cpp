// vitkern._C: registers the vitkern_cuda:: ops with the dispatcher and exposes build_info()
// through pybind11. Fake (meta) implementations and autograd are registered from Python
// (vitkern/_extension.py) once this module is loaded.

#include <string>
#include <vector>

#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cublasLt.h>
#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include "ops.h"
#include "patchify.h"

#ifndef VITKERN_BUILD_ARCHS
#define VITKERN_BUILD_ARCHS
#endif
#ifndef VITKERN_BUILD_SYSTEM
#define VITKERN_BUILD_SYSTEM unknown
#endif

#define VITKERN_STR_(...) #__VA_ARGS__
#define VITKERN_STR(...) VITKERN_STR_(__VA_ARGS__)

namespace py = pybind11;

namespace {

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string current;
  for (char ch : text) {
    if (ch == sep) {
      if (!current.empty()) parts.push_back(current);
      current.clear();
    } else {
      current.push_back(ch);
    }
  }
  if (!current.empty()) parts.push_back(current);
  return parts;
}

std::string cuda_version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

// Host-only queries: none of them needs a GPU or the driver.
py::dict build_info() {
  py::dict info;
  info["build_system"] = std::string(VITKERN_STR(VITKERN_BUILD_SYSTEM));
  // TORCH_CUDA_ARCH_LIST the build asked for, e.g. ["8.0", "9.0a"].
  info["archs"] = split(VITKERN_STR(VITKERN_BUILD_ARCHS), ',');
  // __CUDA_ARCH_LIST__ as nvcc compiled the kernels, e.g. [800, 900].
  std::vector<int> compiled;
  for (const auto& item : split(vitkern::patchify_compiled_arch_list(), ',')) compiled.push_back(std::stoi(item));
  info["cuda_arch_list"] = compiled;
  info["cuda_version"] = cuda_version_string(CUDART_VERSION);
  int runtime_version = 0;
  if (cudaRuntimeGetVersion(&runtime_version) == cudaSuccess) {
    info["cuda_runtime_version"] = cuda_version_string(runtime_version);
  } else {
    info["cuda_runtime_version"] = py::none();
  }
  info["torch_version"] = std::string(TORCH_VERSION);
  info["cublaslt_linked"] = true;
  info["cublaslt_version"] = static_cast<size_t>(cublasLtGetVersion());
  info["cublaslt_cudart_version"] = static_cast<size_t>(cublasLtGetCudartVersion());
  int major = 0, minor = 0, patch = 0;
  if (cublasGetProperty(MAJOR_VERSION, &major) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(MINOR_VERSION, &minor) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(PATCH_LEVEL, &patch) == CUBLAS_STATUS_SUCCESS) {
    info["cublas_version"] = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  } else {
    info["cublas_version"] = py::none();
  }
  info["ops"] = std::vector<std::string>{"patchify"};
  return info;
}

}  // namespace

TORCH_LIBRARY(vitkern_cuda, m) {
  // Fake implementations live in Python; tell torch where, so a missing import is reported clearly.
  m.set_python_module("vitkern._extension");
  m.def("patchify(Tensor images, int patch_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitkern_cuda, CUDA, m) {
  m.impl("patchify", &vitkern::patchify_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkern CUDA extension: vitkern_cuda:: ops (see torch.ops.vitkern_cuda) and build info";
  m.def("build_info", &build_info,
        "How this extension was built: requested and compiled CUDA archs, CUDA / cuBLAS(Lt) / torch "
        "versions. Host-only; needs no GPU.");
}
