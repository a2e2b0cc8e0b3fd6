// vitkern._C: registers the vitkern_cuda:: ops with the dispatcher and exposes build_info() (and
// the cuBLASLt backend's test hooks) through pybind11. Fake (meta) implementations are registered
// from Python (vitkern/_extension.py) once this module is loaded, autograd from
// vitkern/ops/cuda_backend.py (patchify's in vitkern/_extension.py).

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

#include "dense_epilogue.h"
#include "fused_dense.h"
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
  info["ops"] = std::vector<std::string>{"patchify", "fused_dense_fwd", "fused_dense_bwd", "mlp_fwd", "mlp_bwd",
                                         "patch_embed_fwd", "patch_embed_bwd"};
  return info;
}

py::dict to_dict(const std::map<std::string, int64_t>& m) {
  py::dict d;
  for (const auto& [k, v] : m) d[py::str(k)] = v;
  return d;
}

py::dict cublaslt_describe(const std::string& kind, const std::string& dtype, int64_t m, int64_t n, int64_t k,
                           const std::string& epilogue, bool query_heuristic) {
  std::string status;
  py::dict d = to_dict(vitkern::lt_describe(kind, dtype, m, n, k, epilogue, query_heuristic, &status));
  d["heuristic_status"] = query_heuristic ? py::object(py::str(status)) : py::object(py::none());
  return d;
}

py::tuple patchify_unit_bytes(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch_h,
                              int64_t patch_w, int64_t elem_size, bool channels_last, uintptr_t in_addr,
                              uintptr_t out_addr) {
  const vitkern::PatchifyShape s{batch, channels, height, width, patch_h, patch_w, elem_size, channels_last};
  int load = 0, store = 0;
  vitkern::patchify_unit_bytes(reinterpret_cast<const void*>(in_addr), reinterpret_cast<const void*>(out_addr), s,
                               &load, &store);
  return py::make_tuple(load, store);
}

}  // namespace

TORCH_LIBRARY(vitkern_cuda, m) {
  // Fake implementations live in Python; tell torch where, so a missing import is reported clearly.
  m.set_python_module("vitkern._extension");
  m.def("patchify(Tensor images, int patch_size) -> Tensor");
  // activation: 0 none, 1 "gelu" (erf), 2 "gelu_tanh". "pre" / "branch" are opaque buffers for
  // the backward ops: (M, round_up(width, 8)) when saved, else empty.
  m.def(
      "fused_dense_fwd(Tensor x, Tensor weight, Tensor? bias, int activation, Tensor? residual, "
      "Tensor? residual_scale, Tensor? row_scale, bool save_pre) -> (Tensor, Tensor)");
  m.def(
      "fused_dense_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? residual_scale, Tensor? row_scale, "
      "Tensor pre, int activation, bool need_dx, bool need_dweight, bool need_dbias, bool need_dscale, "
      "bool need_drow_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mlp_fwd(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "int activation, Tensor? residual, Tensor? residual_scale, Tensor? row_scale, bool save_pre, "
      "bool save_branch) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mlp_bwd(Tensor grad, Tensor x, Tensor fc1_weight, Tensor fc2_weight, Tensor? residual_scale, "
      "Tensor? row_scale, Tensor pre, Tensor h, Tensor branch, int activation, bool need_dx, "
      "bool need_dfc1_weight, bool need_dfc1_bias, bool need_dfc2_weight, bool need_dfc2_bias, "
      "bool need_dscale, bool need_drow_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? prefix_tokens) "
      "-> Tensor");
  m.def(
      "patch_embed_bwd(Tensor grad, Tensor images, Tensor weight, int num_prefix_tokens, bool need_dimages, "
      "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitkern_cuda, CUDA, m) {
  m.impl("patchify", &vitkern::patchify_cuda);
  m.impl("fused_dense_fwd", &vitkern::fused_dense_fwd_cuda);
  m.impl("fused_dense_bwd", &vitkern::fused_dense_bwd_cuda);
  m.impl("mlp_fwd", &vitkern::mlp_fwd_cuda);
  m.impl("mlp_bwd", &vitkern::mlp_bwd_cuda);
  m.impl("patch_embed_fwd", &vitkern::patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &vitkern::patch_embed_bwd_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkern CUDA extension: vitkern_cuda:: ops (see torch.ops.vitkern_cuda) and build info";
  m.def("build_info", &build_info,
        "How this extension was built: requested and compiled CUDA archs, CUDA / cuBLAS(Lt) / torch "
        "versions. Host-only; needs no GPU.");
  // Debugging and test hooks of the cuBLASLt backend (csrc/fused_dense.h).
  m.def("_cublaslt_describe", &cublaslt_describe, py::arg("kind"), py::arg("dtype"), py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("epilogue"), py::arg("query_heuristic") = false,
        "Build the descriptors of one of the backend's GEMMs (kind forward / input_grad / weight_grad, row-major "
        "M, N, K as the op sees them) and read every attribute back; host-only. With query_heuristic, also ask "
        "cuBLASLt's heuristics (needs a GPU) and report the status.");
  m.def("_cublaslt_stats", []() { return to_dict(vitkern::lt_stats()); },
        "Counters of the cuBLASLt wrapper: fused / plain matmuls, unfused fallbacks, heuristic queries, cached "
        "algorithms.");
  m.def("_cublaslt_set_force_unfused", &vitkern::lt_set_force_unfused, py::arg("value"),
        "Treat every fused epilogue and C matrix as unsupported (the unfused paths run); returns the previous "
        "setting.");
  m.def("_cublaslt_clear_cache", &vitkern::lt_clear_cache, "Forget the cached cuBLASLt algorithms.");
  m.def("_cublaslt_fallback_log", &vitkern::lt_fallback_log,
        "The most recent GEMMs that cuBLASLt had no fused algorithm for: 'op: status for GEMM'.");
  m.def("_patchify_unit_bytes", &patchify_unit_bytes, py::arg("batch"), py::arg("channels"), py::arg("height"),
        py::arg("width"), py::arg("patch_h"), py::arg("patch_w"), py::arg("elem_size"), py::arg("channels_last"),
        py::arg("in_addr"), py::arg("out_addr"),
        "(load, store) unit widths in bytes that the patchify kernels use for this geometry and these addresses.");
}
