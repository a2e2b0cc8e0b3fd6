// vitkern._C: registers the CUDA implementations of the vitkern_cuda:: ops with the dispatcher
// and exposes build_info() (and the cuBLASLt backend's test hooks) through pybind11. The ops'
// schemas, fake (meta) implementations and patchify's autograd are declared in Python
// (vitkern/_extension.py), the other ops' autograd in vitkern/ops/cuda_backend.py.

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
                           const std::string& epilogue, bool query_heuristic, bool allow_tf32) {
  const vitkern::Tf32Scope tf32(allow_tf32);
  std::string status;
  py::dict d = to_dict(vitkern::lt_describe(kind, dtype, m, n, k, epilogue, query_heuristic, &status));
  d["heuristic_status"] = query_heuristic ? py::object(py::str(status)) : py::object(py::none());
  return d;
}

py::tuple patchify_unit_bytes(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch_h,
                              int64_t patch_w, int64_t elem_size, bool channels_last, uintptr_t in_addr,
                              uintptr_t out_addr, int64_t out_ld) {
  const vitkern::PatchifyShape s{batch, channels, height, width, patch_h, patch_w, elem_size, channels_last, out_ld};
  int load = 0, store = 0;
  vitkern::patchify_unit_bytes(reinterpret_cast<const void*>(in_addr), reinterpret_cast<const void*>(out_addr), s,
                               &load, &store);
  return py::make_tuple(load, store);
}

py::dict epilogue_block(int64_t nvec, int64_t rows, int64_t max_row_blocks) {
  const vitkern::EpilogueBlock b = vitkern::epilogue_block(nvec, rows, max_row_blocks);
  py::dict d;
  d["bx"] = b.bx;
  d["by"] = b.by;
  d["gx"] = b.gx;
  d["gy"] = b.gy;
  return d;
}

// The backward pass's launch shape for an (M, N) gradient of `elem_size`-byte elements with
// 256-byte-aligned operands (16-byte vectors when N allows), with or without the partial sums.
py::dict dense_bwd_epilogue_block(int64_t rows, int64_t cols, int64_t elem_size, bool partial_sums) {
  TORCH_CHECK(elem_size == 2 || elem_size == 4, "_dense_bwd_epilogue_block: elem_size must be 2 or 4");
  vitkern::DenseBwdEpilogue e;
  e.rows = rows;
  e.cols = cols;
  e.dtype = e.grad_dtype = elem_size == 2 ? vitkern::kDTypeBF16 : vitkern::kDTypeF32;
  auto fake = [](int i) { return reinterpret_cast<void*>(static_cast<uintptr_t>(i) << 32); };
  e.grad = e.pre = fake(1);
  e.dt = fake(2);
  e.grad_stride_row = e.ld_pre = e.ld_dt = cols;
  const vitkern::EpilogueBlock b = vitkern::dense_bwd_epilogue_block(e, partial_sums);
  py::dict d;
  d["bx"] = b.bx;
  d["by"] = b.by;
  d["gx"] = b.gx;
  d["gy"] = b.gy;
  d["vector"] = vitkern::dense_bwd_epilogue_vector(e);
  return d;
}

// The token-row pass's plan (csrc/dense_epilogue.h) for out rows [row0, row0 + rows) of each of
// `batch` blocks `batch_stride` elements apart, from one source whose rows start at src_row0
// (src_elem_size 0: none), at these offsets from a 256-byte-aligned address.
py::dict token_rows_plan(int64_t batch, int64_t batch_stride, int64_t row0, int64_t rows, int64_t dim,
                         int64_t out_elem_size, uintptr_t out_addr, int64_t src_elem_size, uintptr_t src_addr,
                         int64_t src_row0) {
  auto code = [](int64_t es) { return es == 4 ? vitkern::kDTypeF32 : vitkern::kDTypeBF16; };
  constexpr uintptr_t kBase = uintptr_t{1} << 32;  // never null: null means "no operand"
  vitkern::TokenRows t;
  t.out = reinterpret_cast<void*>(kBase + out_addr);
  t.out_dtype = code(out_elem_size);
  t.batch = batch;
  t.batch_stride = batch_stride;
  t.row0 = row0;
  t.rows = rows;
  t.dim = dim;
  if (src_elem_size > 0) {
    t.src_a = reinterpret_cast<const void*>(kBase + src_addr);
    t.a_dtype = code(src_elem_size);
    t.a_row0 = src_row0;
  }
  const vitkern::EpilogueBlock b = vitkern::token_rows_block(t);
  py::dict d;
  d["vector"] = vitkern::token_rows_vector(t);
  d["index_bits"] = vitkern::token_rows_index_bits(t);
  d["bx"] = b.bx;
  d["by"] = b.by;
  d["gx"] = b.gx;
  d["gy"] = b.gy;
  return d;
}

}  // namespace

// The schemas of the vitkern_cuda:: ops are declared once, in Python (vitkern/_extension.py,
// _SCHEMAS), together with their fake implementations and autograd, when the vitkern package is
// imported; this library registers only their CUDA implementations. Importing vitkern._C by any
// route imports the vitkern package first, so the ops are always traceable once they run.
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
        py::arg("k"), py::arg("epilogue"), py::arg("query_heuristic") = false, py::arg("allow_tf32") = false,
        "Build the descriptors of one of the backend's GEMMs (kind forward / input_grad / weight_grad, row-major "
        "M, N, K as the op sees them) and read every attribute back; host-only. With query_heuristic, also ask "
        "cuBLASLt's heuristics (needs a GPU) and report the status; allow_tf32 as the ops take it.");
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
        py::arg("in_addr"), py::arg("out_addr"), py::arg("out_ld") = 0,
        "(load, store) unit widths in bytes that the patchify kernels use for this geometry and these addresses "
        "(out_ld: elements between patch rows, 0 for C * Ph * Pw).");
  m.def("_padded_patch_k", &vitkern::padded_patch_k, py::arg("k"), py::arg("elem_size"),
        "The K of the patch-embedding GEMMs for k pixels of elem_size bytes (csrc/patchify.h); host-only.");
  m.def("_epilogue_block", &epilogue_block, py::arg("nvec"), py::arg("rows"), py::arg("max_row_blocks") = 65535,
        "The launch shape (bx, by, gx, gy) of the elementwise passes of dense_epilogue.cu over rows x nvec column "
        "vectors (csrc/dense_epilogue.h: EpilogueBlock); host-only.");
  m.def("_dense_bwd_epilogue_block", &dense_bwd_epilogue_block, py::arg("rows"), py::arg("cols"),
        py::arg("elem_size"), py::arg("partial_sums"),
        "The launch shape (bx, by, gx, gy, vector) of the backward epilogue pass for an aligned (rows, cols) "
        "gradient, with or without the LayerScale / row-scale partial sums ((gy, cols) and (gx, rows) fp32); "
        "host-only.");
  m.def("_token_rows_plan", &token_rows_plan, py::arg("batch"), py::arg("batch_stride"), py::arg("row0"),
        py::arg("rows"), py::arg("dim"), py::arg("out_elem_size") = 2, py::arg("out_addr") = 0,
        py::arg("src_elem_size") = 0, py::arg("src_addr") = 0, py::arg("src_row0") = 0,
        "The token-row pass's plan (vector, index_bits, bx, by, gx, gy) for this geometry, the operands at these "
        "offsets from an aligned address; "
        "host-only.");
}
