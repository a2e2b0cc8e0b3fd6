// Host entry points of the vitkern_cuda:: ops (registered in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace vitkern {

// vitkern_cuda::patchify(Tensor images, int patch_size) -> Tensor, CUDA kernel.
at::Tensor patchify_cuda(const at::Tensor& images, int64_t patch_size);

}  // namespace vitkern
