// Launcher for the patchify kernel. Plain C++ interface (no torch types) so that the .cu file
// compiles without the ATen headers; argument checking, allocation and the stream live in
// patchify_op.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vitkern {

// Shape of one patchify call. All sizes are in elements unless stated otherwise.
struct PatchifyShape {
  int64_t batch;       // B
  int64_t channels;    // C
  int64_t height;      // H (a multiple of patch)
  int64_t width;       // W (a multiple of patch)
  int64_t patch;       // P
  int64_t elem_size;   // bytes per element (2 or 4)
};

// Copies a contiguous NCHW image batch `in` into the contiguous patch matrix `out` of shape
// (B * (H/P) * (W/P), C * P * P), rows ordered (b, ph, pw) and columns (c, py, px).
// The copy is dtype-agnostic: it moves `vector_bytes`-wide units, where vector_bytes is one of
// 16, 8, 4 or 2, divides P * elem_size and matches the alignment of both pointers
// (patchify_vector_bytes picks it). Enqueues on `stream`; returns cudaErrorInvalidValue for an
// unsupported vector_bytes, else cudaSuccess without reading the launch status, which the caller
// checks (C10_CUDA_KERNEL_LAUNCH_CHECK).
cudaError_t launch_patchify(const void* in, void* out, const PatchifyShape& shape, int vector_bytes,
                            cudaStream_t stream);

// Widest unit (16, 8, 4 or 2 bytes, never narrower than one element) that divides one patch row
// segment (P * elem_size bytes) and to which both pointers are aligned.
int patchify_vector_bytes(const void* in, const void* out, const PatchifyShape& shape);

// The __CUDA_ARCH_LIST__ the kernels were compiled for, e.g. "800,900".
const char* patchify_compiled_arch_list();

}  // namespace vitkern
