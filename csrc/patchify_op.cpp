// vitkern_cuda::patchify, CUDA implementation: argument checks, output allocation and the launch
// on the current stream. The kernels themselves are in patchify.cu.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "patchify.h"

namespace vitkern {

at::Tensor patch_matrix(const char* op, const at::Tensor& images, int64_t patch_h, int64_t patch_w,
                        int64_t row_elems) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t N = (H / patch_h) * (W / patch_w);
  at::Tensor src = images;
  bool channels_last = false;
  if (!images.is_contiguous()) {
    if (images.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      channels_last = true;
    } else {
      src = images.contiguous();
    }
  }
  const int64_t K = C * patch_h * patch_w;
  TORCH_CHECK(row_elems == 0 || row_elems >= K, op, ": patch rows of ", row_elems, " elements cannot hold ", K);
  const int64_t ld = row_elems > 0 ? row_elems : K;
  at::Tensor out = at::empty({B * N, ld}, images.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard device_guard(images.device());
  const PatchifyShape shape{B, C, H, W, patch_h, patch_w, static_cast<int64_t>(images.element_size()), channels_last,
                            ld};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(images.device().index()).stream();
  const cudaError_t err = launch_patchify(src.const_data_ptr(), out.mutable_data_ptr(), shape, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": launching the patchify kernel failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor patchify_cuda(const at::Tensor& images, int64_t patch_size) {
  TORCH_CHECK(images.dim() == 4, "patchify: images must be a 4-D (B, C, H, W) tensor, got ",
              images.dim(), "-D with shape ", images.sizes());
  TORCH_CHECK(images.is_cuda(), "patchify: images must be a CUDA tensor, got device ",
              images.device());
  const auto dtype = images.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "patchify: images must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(patch_size > 0, "patchify: patch_size must be > 0, got ", patch_size);
  const int64_t H = images.size(2), W = images.size(3);
  TORCH_CHECK(H % patch_size == 0 && W % patch_size == 0,
              "patchify: images height and width must be multiples of patch_size=", patch_size,
              ", got H=", H, ", W=", W);
  TORCH_CHECK(images.is_contiguous() || images.is_contiguous(at::MemoryFormat::ChannelsLast),
              "patchify: images must be contiguous (NCHW) or channels_last (NHWC), got strides ", images.strides(),
              " for shape ", images.sizes(), "; call .contiguous() first");
  return patch_matrix("patchify", images, patch_size, patch_size);
}

}  // namespace vitkern
