// Launcher for the patchify kernels. Plain C++ interface (no torch types) so that the .cu file
// compiles without the ATen headers; argument checking, allocation and the stream live in
// patchify_op.cpp and patch_embed.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vitkern {

// Shape of one patchify call. All sizes are in elements unless stated otherwise.
struct PatchifyShape {
  int64_t batch;       // B
  int64_t channels;    // C
  int64_t height;      // H (a multiple of patch_h)
  int64_t width;       // W (a multiple of patch_w)
  int64_t patch_h;     // Ph
  int64_t patch_w;     // Pw
  int64_t elem_size;   // bytes per element (2 or 4)
  bool channels_last;  // input memory layout: false = NCHW contiguous, true = NHWC (channels_last)
  int64_t out_ld = 0;  // elements between output rows: 0 for C * Ph * Pw, or more (zero padding)
};

// The K of the CUDA backend's patch GEMMs: C * Ph * Pw pixels rounded up to a multiple of
// 16 bytes of elements, so that every row of the patch matrix and of the weight starts 16-byte
// aligned (588 bf16 pixels of a 14 x 14 x 3 patch -> 592; fp32 588 stays). The padding columns
// hold zeros in both. vitkern/ops/patch_embed/layout.py (_cuda_patch_k) mirrors it for the fakes.
inline int64_t padded_patch_k(int64_t k, int64_t elem_size) {
  const int64_t per = 16 / elem_size;
  return (k + per - 1) / per * per;
}

// Copies a dense image batch `in` (NCHW or NHWC as `shape.channels_last` says) into the patch
// matrix `out` of shape (B * (H/Ph) * (W/Pw), C * Ph * Pw) with rows `out_ld` elements apart (the
// columns from C * Ph * Pw to out_ld are written as zeros), rows ordered (b, patch row, patch
// column) and columns (c, py, px): the layout of a Conv2d weight (D, C, Ph, Pw) flattened to
// (D, C * Ph * Pw).
//
// The copy is dtype-agnostic and moves the widest units (16, 8, 4 or 2 bytes) that the patch
// geometry and the pointers' alignment allow:
//   NCHW: every input row segment of Pw pixels is contiguous in the output (direct copy);
//   NHWC: each patch (Ph rows of Pw * C contiguous elements) is staged in shared memory with
//         wide loads, then written out transposed to (c, py, px) with wide stores; patches too
//         large for the staging buffer take an element-wise gather kernel.
// Enqueues on `stream`; returns cudaErrorInvalidValue for an unsupported element size or an
// out_ld below C * Ph * Pw, else
// cudaSuccess without reading the launch status, which the caller checks
// (C10_CUDA_KERNEL_LAUNCH_CHECK).
cudaError_t launch_patchify(const void* in, void* out, const PatchifyShape& shape, cudaStream_t stream);

// The unit widths (bytes) launch_patchify would use for these pointers: {load, store}. For the
// tests and the documentation of the vectorisation; host-only.
void patchify_unit_bytes(const void* in, const void* out, const PatchifyShape& shape, int* load_bytes,
                         int* store_bytes);

// The __CUDA_ARCH_LIST__ the kernels were compiled for, e.g. "800,900".
const char* patchify_compiled_arch_list();

}  // namespace vitkern
