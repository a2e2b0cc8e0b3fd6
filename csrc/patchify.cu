// patchify: NCHW images -> (B * N, C * P * P) patch matrix, the layout that the patch-embedding
// GEMM consumes. Reference (vitkern/_extension.py: patchify_ref):
//   images.reshape(B, C, H/P, P, W/P, P).permute(0, 2, 4, 1, 3, 5).reshape(B * N, C * P * P)
//
// Every input row (b, c, h) of W contiguous pixels splits into W/P segments of P pixels; segment
// pw lands contiguously in output row (b, h/P, pw) at column offset (c * P + h % P) * P. The
// kernel is a pure copy, so it moves raw units of 16/8/4/2 bytes independent of the dtype: reads
// are coalesced along the input row, writes are contiguous runs of P * elem_size bytes.
//
// Only CUDA headers are included here (no ATen) to keep the per-arch compile short.

#include <cstdint>

#include <cuda_runtime.h>

#include "patchify.h"

namespace vitkern {
namespace {

constexpr int kThreads = 256;

// One thread row (threadIdx.y) per input row; threadIdx.x walks the units of that row.
template <typename Unit>
__global__ void __launch_bounds__(kThreads)
patchify_kernel(const Unit* __restrict__ in, Unit* __restrict__ out,
                int64_t rows,        // B * C * H
                int64_t channels,    // C
                int64_t height,      // H
                int64_t patch,       // P (pixels)
                int64_t row_units,   // W * elem_size / sizeof(Unit)
                int64_t seg_units,   // P * elem_size / sizeof(Unit)
                int64_t patches_w) { // W / P
  const int64_t patches_h = height / patch;
  const int64_t out_row_units = channels * patch * seg_units;  // C * P * P elements, in units
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += row_step) {
    const int64_t h = row % height;
    const int64_t bc = row / height;
    const int64_t c = bc % channels;
    const int64_t b = bc / channels;
    const int64_t ph = h / patch;
    const int64_t py = h - ph * patch;
    const Unit* src = in + row * row_units;
    Unit* dst = out + (b * patches_h + ph) * patches_w * out_row_units + (c * patch + py) * seg_units;
    for (int64_t j = threadIdx.x; j < row_units; j += blockDim.x) {
      const int64_t pw = j / seg_units;
      const int64_t u = j - pw * seg_units;
      dst[pw * out_row_units + u] = src[j];
    }
  }
}

template <typename Unit>
cudaError_t launch(const void* in, void* out, const PatchifyShape& s, cudaStream_t stream) {
  const int64_t unit = static_cast<int64_t>(sizeof(Unit));
  const int64_t rows = s.batch * s.channels * s.height;
  const int64_t row_units = s.width * s.elem_size / unit;
  const int64_t seg_units = s.patch * s.elem_size / unit;
  // Block: enough x-threads to cover a row (power of two, at most kThreads), the rest in y.
  int tx = 1;
  while (tx < kThreads && tx < row_units) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t blocks_needed = (rows + ty - 1) / ty;
  const int64_t max_blocks = 2147483647;  // grid.x limit; the kernel strides over the rest
  const unsigned int blocks = static_cast<unsigned int>(blocks_needed < max_blocks ? blocks_needed : max_blocks);
  patchify_kernel<Unit><<<blocks, dim3(tx, ty), 0, stream>>>(
      static_cast<const Unit*>(in), static_cast<Unit*>(out), rows, s.channels, s.height, s.patch,
      row_units, seg_units, s.width / s.patch);
  return cudaSuccess;
}

}  // namespace

int patchify_vector_bytes(const void* in, const void* out, const PatchifyShape& s) {
  const int64_t seg_bytes = s.patch * s.elem_size;
  const auto addr_in = reinterpret_cast<uintptr_t>(in);
  const auto addr_out = reinterpret_cast<uintptr_t>(out);
  for (int v : {16, 8, 4}) {
    if (v >= s.elem_size && seg_bytes % v == 0 && addr_in % v == 0 && addr_out % v == 0) return v;
  }
  return static_cast<int>(s.elem_size);  // scalar fallback: one element per unit
}

cudaError_t launch_patchify(const void* in, void* out, const PatchifyShape& s, int vector_bytes,
                            cudaStream_t stream) {
  if (s.batch * s.channels * s.height * s.width == 0) return cudaSuccess;
  switch (vector_bytes) {
    case 16: return launch<uint4>(in, out, s, stream);
    case 8: return launch<uint2>(in, out, s, stream);
    case 4: return launch<uint32_t>(in, out, s, stream);
    case 2: return launch<uint16_t>(in, out, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

#define VITKERN_STR_(...) #__VA_ARGS__
#define VITKERN_STR(...) VITKERN_STR_(__VA_ARGS__)

const char* patchify_compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return VITKERN_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace vitkern
