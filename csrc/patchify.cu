// patchify: NCHW or NHWC images -> (B * N, C * Ph * Pw) patch matrix, the layout that the
// patch-embedding GEMM consumes. Reference (vitkern/_extension.py: patchify_ref):
//   images.reshape(B, C, H/Ph, Ph, W/Pw, Pw).permute(0, 2, 4, 1, 3, 5).reshape(B * N, C * Ph * Pw)
//
// NCHW: every input row (b, c, h) of W contiguous pixels splits into W/Pw segments of Pw pixels;
// segment pw lands contiguously in output row (b, h/Ph, pw) at column offset (c * Ph + h % Ph) * Pw.
// The kernel is a pure copy, so it moves raw units of 16/8/4/2 bytes independent of the dtype:
// reads are coalesced along the input row, writes are contiguous runs of Pw * elem_size bytes.
//
// NHWC (channels_last): a patch is Ph input rows of Pw * C contiguous elements, ordered (px, c),
// while its output row is ordered (c, py, px). One block stages a whole patch in shared memory
// with wide loads, then writes the output row (C * Ph * Pw contiguous elements) with wide stores,
// gathering each store unit's Pw-contiguous run from the stage. Patches larger than the stage
// take a plain element-wise gather kernel.
//
// Only CUDA headers are included here (no ATen) to keep the per-arch compile short.

#include <climits>
#include <cstdint>
#include <numeric>

#include <cuda_runtime.h>

#include "patchify.h"

namespace vitkern {
namespace {

constexpr int kThreads = 256;
constexpr int kStageThreads = 128;
constexpr int64_t kMaxStageBytes = 48 * 1024;  // no opt-in needed for this much dynamic smem

// Elements between two rows of the patch matrix (its padding columns included).
int64_t out_row_elems(const PatchifyShape& s) {
  return s.out_ld > 0 ? s.out_ld : s.channels * s.patch_h * s.patch_w;
}

// ------------------------------------------------------------------------------------- NCHW

// One thread row (threadIdx.y) per input row; threadIdx.x walks the units of that row.
template <typename Unit>
__global__ void __launch_bounds__(kThreads)
patchify_nchw_kernel(const Unit* __restrict__ in, Unit* __restrict__ out,
                     int64_t rows,        // B * C * H
                     int64_t channels,    // C
                     int64_t height,      // H
                     int64_t patch_h,     // Ph (pixels)
                     int64_t row_units,      // W * elem_size / sizeof(Unit)
                     int64_t seg_units,      // Pw * elem_size / sizeof(Unit)
                     int64_t patches_w,      // W / Pw
                     int64_t out_row_units,  // out_ld * elem_size / sizeof(Unit)
                     int64_t pad_units) {    // (out_ld - C * Ph * Pw) * elem_size / sizeof(Unit)
  const int64_t patches_h = height / patch_h;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += row_step) {
    const int64_t h = row % height;
    const int64_t bc = row / height;
    const int64_t c = bc % channels;
    const int64_t b = bc / channels;
    const int64_t ph = h / patch_h;
    const int64_t py = h - ph * patch_h;
    const Unit* src = in + row * row_units;
    Unit* patch_row = out + (b * patches_h + ph) * patches_w * out_row_units;  // patch (b, ph, 0)
    Unit* dst = patch_row + (c * patch_h + py) * seg_units;
    for (int64_t j = threadIdx.x; j < row_units; j += blockDim.x) {
      const int64_t pw = j / seg_units;
      const int64_t u = j - pw * seg_units;
      dst[pw * out_row_units + u] = src[j];
    }
    // The zero padding of the W / Pw patches of this row, written with their last input row.
    if (pad_units > 0 && c == channels - 1 && py == patch_h - 1) {
      Unit* pad = patch_row + channels * patch_h * seg_units;
      for (int64_t j = threadIdx.x; j < patches_w * pad_units; j += blockDim.x) {
        const int64_t pw = j / pad_units;
        pad[pw * out_row_units + (j - pw * pad_units)] = Unit{};
      }
    }
  }
}

template <typename Unit>
void launch_nchw(const void* in, void* out, const PatchifyShape& s, cudaStream_t stream) {
  const int64_t unit = static_cast<int64_t>(sizeof(Unit));
  const int64_t rows = s.batch * s.channels * s.height;
  const int64_t row_units = s.width * s.elem_size / unit;
  const int64_t seg_units = s.patch_w * s.elem_size / unit;
  const int64_t out_row_units = out_row_elems(s) * s.elem_size / unit;
  const int64_t pad_units = out_row_units - s.channels * s.patch_h * seg_units;
  // Block: enough x-threads to cover a row (power of two, at most kThreads), the rest in y.
  int tx = 1;
  while (tx < kThreads && tx < row_units) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t blocks_needed = (rows + ty - 1) / ty;
  const int64_t max_blocks = INT_MAX;  // grid.x limit; the kernel strides over the rest
  const unsigned int blocks = static_cast<unsigned int>(blocks_needed < max_blocks ? blocks_needed : max_blocks);
  patchify_nchw_kernel<Unit><<<blocks, dim3(tx, ty), 0, stream>>>(
      static_cast<const Unit*>(in), static_cast<Unit*>(out), rows, s.channels, s.height, s.patch_h,
      row_units, seg_units, s.width / s.patch_w, out_row_units, pad_units);
}

// ------------------------------------------------------------------------------------- NHWC

// Stage rows of a patch: `rows` rows of `row_bytes` bytes, `in_row_bytes` apart in global memory,
// packed back to back in shared memory.
template <typename Unit>
__device__ __forceinline__ void stage_patch(const unsigned char* src, int64_t in_row_bytes, unsigned char* stage,
                                            int row_bytes, int rows) {
  const int units_per_row = row_bytes / static_cast<int>(sizeof(Unit));
  const int total = rows * units_per_row;
  for (int u = threadIdx.x; u < total; u += blockDim.x) {
    const int r = u / units_per_row;
    const int j = u - r * units_per_row;
    reinterpret_cast<Unit*>(stage + r * row_bytes)[j] = reinterpret_cast<const Unit*>(src + r * in_row_bytes)[j];
  }
}

// Write one staged patch as an output row ordered (c, py, px), then `pad_units` zero units. Each
// store unit holds kPer consecutive px of one (c, py) segment (Pw is a multiple of kPer by the
// choice of Unit).
template <typename Elem, typename Unit>
__device__ __forceinline__ void emit_patch(const Elem* stage, unsigned char* dst, int channels, int patch_h,
                                           int patch_w, int pad_units) {
  if constexpr (sizeof(Unit) >= sizeof(Elem)) {
    constexpr int kPer = static_cast<int>(sizeof(Unit) / sizeof(Elem));
    const int row_elems = patch_w * channels;
    const int units_per_seg = patch_w / kPer;
    const int total = channels * patch_h * units_per_seg;
    for (int u = threadIdx.x; u < total; u += blockDim.x) {
      const int seg = u / units_per_seg;  // c * Ph + py
      const int px0 = (u - seg * units_per_seg) * kPer;
      const int c = seg / patch_h;
      const int py = seg - c * patch_h;
      const Elem* s = stage + py * row_elems + px0 * channels + c;
      union {
        Unit unit;
        Elem e[kPer];
      } v;
#pragma unroll
      for (int i = 0; i < kPer; ++i) v.e[i] = s[i * channels];
      reinterpret_cast<Unit*>(dst)[u] = v.unit;
    }
    for (int u = threadIdx.x; u < pad_units; u += blockDim.x) reinterpret_cast<Unit*>(dst)[total + u] = Unit{};
  }
}

template <typename Elem>
__global__ void __launch_bounds__(kStageThreads)
patchify_nhwc_staged_kernel(const unsigned char* __restrict__ in, unsigned char* __restrict__ out,
                            int64_t num_patches, int64_t patches_w, int64_t patches_hw, int64_t height,
                            int64_t width, int channels, int patch_h, int patch_w, int load_bytes,
                            int store_bytes, int64_t out_row_bytes) {
  extern __shared__ __align__(16) unsigned char stage[];
  constexpr int64_t kElem = static_cast<int64_t>(sizeof(Elem));
  const int row_bytes = patch_w * channels * static_cast<int>(kElem);
  const int64_t patch_bytes = static_cast<int64_t>(patch_h) * row_bytes;
  const int64_t in_row_bytes = width * channels * kElem;
  for (int64_t p = blockIdx.x; p < num_patches; p += gridDim.x) {
    const int64_t b = p / patches_hw;
    const int64_t rem = p - b * patches_hw;
    const int64_t ph = rem / patches_w;
    const int64_t pw = rem - ph * patches_w;
    const unsigned char* src = in + ((b * height + ph * patch_h) * width + pw * patch_w) * channels * kElem;
    switch (load_bytes) {
      case 16: stage_patch<uint4>(src, in_row_bytes, stage, row_bytes, patch_h); break;
      case 8: stage_patch<uint2>(src, in_row_bytes, stage, row_bytes, patch_h); break;
      case 4: stage_patch<uint32_t>(src, in_row_bytes, stage, row_bytes, patch_h); break;
      default: stage_patch<uint16_t>(src, in_row_bytes, stage, row_bytes, patch_h); break;
    }
    __syncthreads();
    unsigned char* dst = out + p * out_row_bytes;
    const Elem* st = reinterpret_cast<const Elem*>(stage);
    const int pad_units = static_cast<int>((out_row_bytes - patch_bytes) / store_bytes);
    switch (store_bytes) {
      case 16: emit_patch<Elem, uint4>(st, dst, channels, patch_h, patch_w, pad_units); break;
      case 8: emit_patch<Elem, uint2>(st, dst, channels, patch_h, patch_w, pad_units); break;
      case 4: emit_patch<Elem, uint32_t>(st, dst, channels, patch_h, patch_w, pad_units); break;
      default: emit_patch<Elem, uint16_t>(st, dst, channels, patch_h, patch_w, pad_units); break;
    }
    __syncthreads();  // the next patch overwrites the stage
  }
}

// One output element per thread (patches too large to stage), the padding columns included.
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
patchify_nhwc_gather_kernel(const Elem* __restrict__ in, Elem* __restrict__ out, int64_t total,
                            int64_t patches_w, int64_t patches_hw, int64_t height, int64_t width,
                            int64_t channels, int64_t patch_h, int64_t patch_w, int64_t out_ld) {
  const int64_t patch_elems = channels * patch_h * patch_w;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t p = idx / out_ld;
    const int64_t e = idx - p * out_ld;
    if (e >= patch_elems) {
      out[idx] = Elem{};
      continue;
    }
    const int64_t c = e / (patch_h * patch_w);
    const int64_t r = e - c * patch_h * patch_w;
    const int64_t py = r / patch_w;
    const int64_t px = r - py * patch_w;
    const int64_t b = p / patches_hw;
    const int64_t rem = p - b * patches_hw;
    const int64_t ph = rem / patches_w;
    const int64_t pw = rem - ph * patches_w;
    out[idx] = in[((b * height + ph * patch_h + py) * width + pw * patch_w + px) * channels + c];
  }
}

// Widest unit of {16, 8, 4} bytes (never narrower than one element) dividing `bytes` to which
// both addresses are aligned; else one element.
int widest_unit(int64_t bytes, const void* a, const void* b, int64_t elem) {
  const auto pa = reinterpret_cast<uintptr_t>(a);
  const auto pb = reinterpret_cast<uintptr_t>(b);
  for (int v : {16, 8, 4}) {
    if (v >= elem && bytes % v == 0 && pa % v == 0 && pb % v == 0) return v;
  }
  return static_cast<int>(elem);
}

template <typename Elem>
void launch_nhwc(const void* in, void* out, const PatchifyShape& s, cudaStream_t stream) {
  const int64_t patches_w = s.width / s.patch_w;
  const int64_t patches_hw = (s.height / s.patch_h) * patches_w;
  const int64_t num_patches = s.batch * patches_hw;
  const int64_t patch_bytes = s.channels * s.patch_h * s.patch_w * s.elem_size;
  if (patch_bytes <= kMaxStageBytes) {
    int load_bytes = 0, store_bytes = 0;
    patchify_unit_bytes(in, out, s, &load_bytes, &store_bytes);
    const int64_t max_blocks = INT_MAX;
    const unsigned int blocks = static_cast<unsigned int>(num_patches < max_blocks ? num_patches : max_blocks);
    patchify_nhwc_staged_kernel<Elem><<<blocks, kStageThreads, static_cast<size_t>(patch_bytes), stream>>>(
        static_cast<const unsigned char*>(in), static_cast<unsigned char*>(out), num_patches, patches_w, patches_hw,
        s.height, s.width, static_cast<int>(s.channels), static_cast<int>(s.patch_h), static_cast<int>(s.patch_w),
        load_bytes, store_bytes, out_row_elems(s) * s.elem_size);
  } else {
    const int64_t total = num_patches * out_row_elems(s);
    const int64_t blocks_needed = (total + kThreads - 1) / kThreads;
    const int64_t max_blocks = INT_MAX;
    const unsigned int blocks = static_cast<unsigned int>(blocks_needed < max_blocks ? blocks_needed : max_blocks);
    patchify_nhwc_gather_kernel<Elem><<<blocks, kThreads, 0, stream>>>(
        static_cast<const Elem*>(in), static_cast<Elem*>(out), total, patches_w, patches_hw, s.height, s.width,
        s.channels, s.patch_h, s.patch_w, out_row_elems(s));
  }
}

}  // namespace

void patchify_unit_bytes(const void* in, const void* out, const PatchifyShape& s, int* load_bytes,
                         int* store_bytes) {
  if (s.channels_last) {
    const int64_t patch_bytes = s.channels * s.patch_h * s.patch_w * s.elem_size;
    if (patch_bytes > kMaxStageBytes) {  // the gather kernel moves single elements
      *load_bytes = *store_bytes = static_cast<int>(s.elem_size);
      return;
    }
    // A staged patch row is Pw * C contiguous elements; a store unit must stay within one
    // (c, py) run of Pw elements and divide the output row pitch.
    *load_bytes = widest_unit(s.patch_w * s.channels * s.elem_size, in, in, s.elem_size);
    *store_bytes = widest_unit(std::gcd(s.patch_w, out_row_elems(s)) * s.elem_size, out, out, s.elem_size);
  } else {
    *load_bytes = *store_bytes = widest_unit(std::gcd(s.patch_w, out_row_elems(s)) * s.elem_size, in, out, s.elem_size);
  }
}

cudaError_t launch_patchify(const void* in, void* out, const PatchifyShape& s, cudaStream_t stream) {
  if (s.elem_size != 2 && s.elem_size != 4) return cudaErrorInvalidValue;
  if (s.patch_h <= 0 || s.patch_w <= 0) return cudaErrorInvalidValue;
  if (s.out_ld != 0 && s.out_ld < s.channels * s.patch_h * s.patch_w) return cudaErrorInvalidValue;
  if (s.batch * s.channels * s.height * s.width == 0) return cudaSuccess;
  if (s.channels_last) {
    if (s.elem_size == 2) {
      launch_nhwc<uint16_t>(in, out, s, stream);
    } else {
      launch_nhwc<uint32_t>(in, out, s, stream);
    }
    return cudaSuccess;
  }
  int load_bytes = 0, store_bytes = 0;
  patchify_unit_bytes(in, out, s, &load_bytes, &store_bytes);
  switch (load_bytes) {
    case 16: launch_nchw<uint4>(in, out, s, stream); break;
    case 8: launch_nchw<uint2>(in, out, s, stream); break;
    case 4: launch_nchw<uint32_t>(in, out, s, stream); break;
    case 2: launch_nchw<uint16_t>(in, out, s, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
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
