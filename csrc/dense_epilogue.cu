// Elementwise kernels of the cuBLASLt backend (interfaces and semantics in dense_epilogue.h):
//   - the forward epilogue pass: bias (when cuBLASLt did not add it), the exact erf GELU (cuBLASLt's
//     GELU epilogue is the tanh approximation) or the tanh form, and the residual / LayerScale /
//     drop-path row-scale add that cuBLASLt's C matrix cannot express;
//   - the backward epilogue pass: dt = grad * row_scale * gamma * act'(pre);
//   - the token-row writer of the patch embedding (class / register tokens + position embedding).
// Memory-bound; the epilogue passes move 16-byte vectors per thread when the layout allows.
// fp32 math, one rounding per store. Only CUDA headers here (no ATen) to keep the compile short.

#include <climits>
#include <cstdint>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dense_epilogue.h"

namespace vitkern {
namespace {

constexpr int kThreads = 256;

template <typename U, int V>
struct alignas(V * sizeof(U) < 16 ? V * sizeof(U) : 16) Pack {
  U v[V];
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename U, int V>
__device__ __forceinline__ Pack<U, V> load_pack(const U* p) {
  return *reinterpret_cast<const Pack<U, V>*>(p);
}
__device__ __forceinline__ uint32_t bits_of(float a) { return __float_as_uint(a); }
__device__ __forceinline__ uint32_t bits_of(__half a) { return __half_as_ushort(a); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 a) { return __bfloat16_as_ushort(a); }

// Stores a pack. Whole 16-byte words go out as st.global.v4 (inline PTX, the pointers are global
// memory): with the flattened block indexing the compiler split both a struct copy and a uint4
// store into four 4-byte stores (st.global.v2.u16 / .f32 in the PTX).
template <typename U, int V>
__device__ __forceinline__ void store_pack(U* p, const Pack<U, V>& v) {
  constexpr int kBytes = static_cast<int>(V * sizeof(U));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPerWord = static_cast<int>(4 / sizeof(U));  // elements in a 4-byte word
    uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = (q * 4 + k) * kPerWord;
        w[k] = bits_of(v.v[i]);
        if constexpr (kPerWord == 2) w[k] |= bits_of(v.v[i + 1]) << 16;
      }
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst + q), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                   "r"(w[3])
                   : "memory");
    }
  } else {
    *reinterpret_cast<Pack<U, V>*>(p) = v;
  }
}

// ------------------------------------------------------------------------------ activations

constexpr float kSqrtHalf = 0.70710678118654752440f;   // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f; // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhCoef = 0.044715f;

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * kSqrtHalf)); }

__device__ __forceinline__ float gelu_erf_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * kSqrtHalf));
  const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = kSqrt2OverPi * (x + kTanhCoef * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float x2 = x * x;
  const float u = kSqrt2OverPi * (x + kTanhCoef * x2 * x);
  const float t = tanhf(u);
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCoef * x2);
}

__device__ __forceinline__ float act_fwd(float x, int act) {
  if (act == kActGelu) return gelu_erf(x);
  if (act == kActGeluTanh) return gelu_tanh(x);
  return x;
}

__device__ __forceinline__ float act_grad(float x, int act) {
  if (act == kActGelu) return gelu_erf_grad(x);
  if (act == kActGeluTanh) return gelu_tanh_grad(x);
  return 1.0f;
}

// z = act(x) and dz = act'(x) of V values, the activation's branch taken once for all of them.
template <int V>
__device__ __forceinline__ void act_fwd_and_grad(const float (&x)[V], int act, float (&z)[V], float (&dz)[V]) {
  if (act == kActGelu) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float cdf = 0.5f * (1.0f + erff(x[i] * kSqrtHalf));
      z[i] = x[i] * cdf;
      dz[i] = cdf + x[i] * (expf(-0.5f * x[i] * x[i]) * kInvSqrt2Pi);  // gelu_erf_grad's rounding
    }
  } else if (act == kActGeluTanh) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      z[i] = gelu_tanh(x[i]);
      dz[i] = gelu_tanh_grad(x[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      z[i] = x[i];
      dz[i] = 1.0f;
    }
  }
}

template <typename T>
__device__ __forceinline__ float load_row_scale(const void* p, int dtype, int64_t r) {
  return dtype == kDTypeF32 ? static_cast<const float*>(p)[r] : to_f(static_cast<const T*>(p)[r]);
}

// ----------------------------------------------------------------------- forward epilogue

// A block of bx * by threads covers bx vectors of V columns (blockIdx.x) of by rows at a time,
// striding over the rows by gridDim.y * by (EpilogueBlock). No __restrict__: pre and out may alias
// t (each element is read before it is written, by the same thread).
template <typename T, typename R, int V>
__global__ void __launch_bounds__(kThreads) dense_fwd_epilogue_kernel(const DenseFwdEpilogue e, const int bx,
                                                                      const int by) {
  const int ty = static_cast<int>(threadIdx.x) / bx;
  const int tx = static_cast<int>(threadIdx.x) - ty * bx;
  const int64_t nvec = e.cols / V;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * bx + tx;
  if (cv >= nvec) return;
  const int64_t c0 = cv * V;
  float bias[V], gamma[V];
  if (e.bias != nullptr) {
    const auto b = load_pack<T, V>(static_cast<const T*>(e.bias) + c0);
#pragma unroll
    for (int i = 0; i < V; ++i) bias[i] = to_f(b.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) bias[i] = 0.0f;
  }
  if (e.gamma != nullptr) {
    const auto g = load_pack<T, V>(static_cast<const T*>(e.gamma) + c0);
#pragma unroll
    for (int i = 0; i < V; ++i) gamma[i] = to_f(g.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) gamma[i] = 1.0f;
  }
  const T* t = static_cast<const T*>(e.t);
  T* pre = static_cast<T*>(e.pre);
  const R* residual = static_cast<const R*>(e.residual);
  R* out = static_cast<R*>(e.out);
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * by;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * by + ty; r < e.rows; r += row_step) {
    const auto tv = load_pack<T, V>(t + r * e.ld_t + c0);
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = to_f(from_f<T>(to_f(tv.v[i]) + bias[i]));  // rounded like F.linear
    if (pre != nullptr) {
      Pack<T, V> pv;
#pragma unroll
      for (int i = 0; i < V; ++i) pv.v[i] = from_f<T>(v[i]);
      store_pack<T, V>(pre + r * e.ld_pre + c0, pv);
    }
    Pack<R, V> ov;
    if (residual != nullptr) {
      const float scale = e.row_scale != nullptr ? load_row_scale<T>(e.row_scale, e.row_scale_dtype, r) : 1.0f;
      const auto rv = load_pack<R, V>(residual + r * e.ld_residual + c0);
#pragma unroll
      for (int i = 0; i < V; ++i) ov.v[i] = from_f<R>(to_f(rv.v[i]) + act_fwd(v[i], e.act) * gamma[i] * scale);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) ov.v[i] = from_f<R>(act_fwd(v[i], e.act));
    }
    store_pack<R, V>(out + r * e.ld_out + c0, ov);
  }
}

// ---------------------------------------------------------------------- backward epilogue

// The sum of `v` over the threads of this thread's row (the bx consecutive threads from
// row * bx), deterministic: a segmented shuffle reduction inside each warp (a warp may hold parts
// of several rows), then the row's first thread adds the pieces of the warps its row spans, in
// order, from `stage` (one float per thread). Returns the sum in the row's first thread (tx == 0);
// every thread of the block must call it (it synchronises the block once).
__device__ __forceinline__ float row_sum(float v, int tx, int row, int bx, int threads, float* stage) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t & 31;
  const int warp_base = t - lane;
  const int in_warp = threads - warp_base;
  const unsigned mask = in_warp >= 32 ? 0xffffffffu : (1u << in_warp) - 1u;
  const int row_end = (row + 1) * bx - 1 - warp_base;  // the row's last lane, relative to the warp
  const int last = row_end < 31 ? row_end : 31;
  // After the step with offset `off`, lane i holds the sum over lanes [i, min(i + 2 off, last + 1)).
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float o = __shfl_down_sync(mask, v, off);
    if (lane + off <= last) v += o;
  }
  if (tx == 0 || lane == 0) stage[t] = v;  // the head of each run of the row inside a warp
  __syncthreads();
  float s = 0.0f;
  if (tx == 0) {
    s = stage[t];
    for (int w = t / 32 + 1; w * 32 < (row + 1) * bx; ++w) s += stage[w * 32];
  }
  return s;
}

// dt = grad * row_scale * gamma * act'(pre) (when e.dt is set). kScaleGrads: also the partial
// sums of the LayerScale and row-scale gradients with z = act(pre), the fp32 sums over this
// block's rows (dgamma_partial[blockIdx.y]) and columns (drow_scale_partial[blockIdx.x]); then
// every thread of the block runs every row step (the row sums synchronise the block), and
// `reduce` holds (2 + V) * bx * by floats of dynamic shared memory.
template <typename T, typename G, int V, bool kScaleGrads>
__global__ void __launch_bounds__(kThreads) dense_bwd_epilogue_kernel(const DenseBwdEpilogue e, const int bx,
                                                                      const int by) {
  const int ty = static_cast<int>(threadIdx.x) / bx;
  const int tx = static_cast<int>(threadIdx.x) - ty * bx;
  const int threads = bx * by;
  const int64_t nvec = e.cols / V;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * bx + tx;
  const bool active = cv < nvec;
  if (!kScaleGrads && !active) return;
  const int64_t c0 = active ? cv * V : 0;  // idle threads of a reducing block read column 0's gamma
  float gamma[V];
  if (e.gamma != nullptr) {
    const auto g = load_pack<T, V>(static_cast<const T*>(e.gamma) + c0);
#pragma unroll
    for (int i = 0; i < V; ++i) gamma[i] = to_f(g.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) gamma[i] = 1.0f;
  }
  const G* grad = static_cast<const G*>(e.grad);
  const T* pre = static_cast<const T*>(e.pre);
  T* dt = static_cast<T*>(e.dt);
  float dgamma[V];
#pragma unroll
  for (int i = 0; i < V; ++i) dgamma[i] = 0.0f;
  extern __shared__ float reduce[];
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * by;
  int step = 0;
  // r0 is the same for the whole block, so a reducing block runs its row steps in lock step.
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * by; r0 < e.rows; r0 += row_step, ++step) {
    const int64_t r = r0 + ty;
    const bool valid = active && r < e.rows;
    float drow = 0.0f;  // this thread's part of sum_n grad * gamma * z
    if (valid) {
      float g[V];
      if constexpr (V == 1) {
        g[0] = to_f(grad[r * e.grad_stride_row + c0 * e.grad_stride_col]);
      } else {  // the vector path has a unit column stride
        const auto gv = load_pack<G, V>(grad + r * e.grad_stride_row + c0);
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = to_f(gv.v[i]);
      }
      const float scale = e.row_scale != nullptr ? load_row_scale<T>(e.row_scale, e.row_scale_dtype, r) : 1.0f;
      Pack<T, V> ov;
      if constexpr (kScaleGrads) {
        float p[V], z[V], dz[V];
        const auto pv = load_pack<T, V>(pre + r * e.ld_pre + c0);
#pragma unroll
        for (int i = 0; i < V; ++i) p[i] = to_f(pv.v[i]);
        act_fwd_and_grad<V>(p, e.act, z, dz);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float gz = g[i] * z[i];
          dgamma[i] += gz * scale;
          drow += gz * gamma[i];
          ov.v[i] = from_f<T>(g[i] * scale * gamma[i] * dz[i]);
        }
        if (dt != nullptr) store_pack<T, V>(dt + r * e.ld_dt + c0, ov);
      } else {  // dt is set (launch_dense_bwd_epilogue checks)
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = g[i] * scale * gamma[i];
        if (e.act != kActNone) {
          const auto pv = load_pack<T, V>(pre + r * e.ld_pre + c0);
#pragma unroll
          for (int i = 0; i < V; ++i) g[i] *= act_grad(to_f(pv.v[i]), e.act);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) ov.v[i] = from_f<T>(g[i]);
        store_pack<T, V>(dt + r * e.ld_dt + c0, ov);
      }
    }
    if constexpr (kScaleGrads) {
      if (e.drow_scale_partial != nullptr) {
        // Two stages alternate: a stage is rewritten two steps later, after every reader of it
        // has passed the next step's barrier.
        const float s = row_sum(drow, tx, ty, bx, threads, reduce + (step & 1) * threads);
        if (tx == 0 && r < e.rows) e.drow_scale_partial[static_cast<int64_t>(blockIdx.x) * e.rows + r] = s;
      }
    }
  }
  if constexpr (kScaleGrads) {
    if (e.dgamma_partial != nullptr) {
      float* stage = reduce + 2 * threads;
#pragma unroll
      for (int i = 0; i < V; ++i) stage[i * threads + threadIdx.x] = dgamma[i];
      __syncthreads();
      if (ty == 0 && active) {
        float* out = e.dgamma_partial + static_cast<int64_t>(blockIdx.y) * e.cols + c0;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          float s = 0.0f;
          for (int y = 0; y < by; ++y) s += stage[i * threads + y * bx + tx];
          out[i] = s;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- token rows

__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kDTypeF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kDTypeBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kDTypeF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kDTypeBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// n <= V consecutive values of a `dtype` array from element i, as fp32: one V-wide access when
// n == V (token_rows_vector checked the alignment), else n scalar ones (a row's tail).
template <typename U, int V>
__device__ __forceinline__ void load_vector_as_float(const void* p, int64_t i, float (&v)[V]) {
  const auto x = load_pack<U, V>(static_cast<const U*>(p) + i);
#pragma unroll
  for (int k = 0; k < V; ++k) v[k] = to_f(x.v[k]);
}

template <int V>
__device__ __forceinline__ void load_part(const void* p, int dtype, int64_t i, int n, float (&v)[V]) {
  if (n == V) {
    switch (dtype) {
      case kDTypeF16: load_vector_as_float<__half, V>(p, i, v); break;
      case kDTypeBF16: load_vector_as_float<__nv_bfloat16, V>(p, i, v); break;
      default: load_vector_as_float<float, V>(p, i, v); break;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = k < n ? load_any(p, dtype, i + k) : 0.0f;
  }
}

template <typename U, int V>
__device__ __forceinline__ void store_vector_from_float(void* p, int64_t i, const float (&v)[V]) {
  Pack<U, V> x;
#pragma unroll
  for (int k = 0; k < V; ++k) x.v[k] = from_f<U>(v[k]);
  store_pack<U, V>(static_cast<U*>(p) + i, x);
}

template <int V>
__device__ __forceinline__ void store_part(void* p, int dtype, int64_t i, int n, const float (&v)[V]) {
  if (n == V) {
    switch (dtype) {
      case kDTypeF16: store_vector_from_float<__half, V>(p, i, v); break;
      case kDTypeBF16: store_vector_from_float<__nv_bfloat16, V>(p, i, v); break;
      default: store_vector_from_float<float, V>(p, i, v); break;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n) store_any(p, dtype, i + k, v[k]);
    }
  }
}

// The flattened B * rows token rows in blocks of bx * by threads (EpilogueBlock over the rows'
// V-wide slots, the last slot of a row holding its dim % V tail). The row index and its split
// into (b, r) are `Index` (int32 where token_rows_index_bits allows), once per row; the element
// offsets of a row's start are int64, the columns within it `Index`.
template <int V, typename Index>
__global__ void __launch_bounds__(kThreads) token_rows_kernel(const TokenRows t, const int bx, const int by) {
  const int ty = static_cast<int>(threadIdx.x) / bx;
  const int tx = static_cast<int>(threadIdx.x) - ty * bx;
  const Index dim = static_cast<Index>(t.dim);
  const Index slots = (dim + V - 1) / V;
  const Index cv = static_cast<Index>(blockIdx.x) * bx + tx;
  if (cv >= slots) return;
  const Index c0 = cv * V;
  const int n = dim - c0 < V ? static_cast<int>(dim - c0) : V;
  float vec[V];
  if (t.vec != nullptr) {
    load_part<V>(t.vec, t.vec_dtype, c0, n, vec);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) vec[k] = 0.0f;
  }
  const Index rows = static_cast<Index>(t.rows);
  const Index tasks = static_cast<Index>(t.batch) * rows;
  const Index step = static_cast<Index>(gridDim.y) * by;
  for (Index q = static_cast<Index>(blockIdx.y) * by + ty; q < tasks; q += step) {
    const Index b = q / rows;
    const Index r = q - b * rows;
    const int64_t o = static_cast<int64_t>(b) * t.batch_stride + (t.row0 + static_cast<int64_t>(r)) * t.dim + c0;
    float v[V], x[V];
    if (t.accumulate) {
      load_part<V>(t.out, t.out_dtype, o, n, v);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = 0.0f;
    }
    if (t.src_a != nullptr) {
      load_part<V>(t.src_a, t.a_dtype, (t.a_row0 + static_cast<int64_t>(r)) * t.dim + c0, n, x);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] += x[k];
    }
    if (t.src_b != nullptr) {
      load_part<V>(t.src_b, t.b_dtype, (t.b_row0 + static_cast<int64_t>(r)) * t.dim + c0, n, x);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] += x[k];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] += vec[k];
    store_part<V>(t.out, t.out_dtype, o, n, v);
  }
}

// ---------------------------------------------------------------------------------- launch

int elem_size(int dtype) { return dtype == kDTypeF32 ? 4 : 2; }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % static_cast<uint64_t>(bytes) == 0; }

// A V-wide access of an operand with `esize`-byte elements needs min(16, V * esize) alignment of
// the pointer and of the row pitch.
bool vector_ok(const void* p, int64_t ld, int esize, int v) {
  if (p == nullptr) return true;
  const int64_t a = v * esize < 16 ? v * esize : 16;
  return aligned(p, a) && (ld * esize) % a == 0;
}

constexpr int64_t kMaxGridY = 65535;

bool scale_grads_requested(const DenseBwdEpilogue& e) {
  return e.dgamma_partial != nullptr || e.drow_scale_partial != nullptr;
}

dim3 grid_of(const EpilogueBlock& b) { return dim3(static_cast<unsigned>(b.gx), static_cast<unsigned>(b.gy)); }
unsigned threads_of(const EpilogueBlock& b) { return static_cast<unsigned>(b.bx * b.by); }

template <typename T, typename R, int V>
void run_fwd(const DenseFwdEpilogue& e, cudaStream_t stream) {
  const EpilogueBlock b = epilogue_block(e.cols / V, e.rows, kMaxGridY);
  dense_fwd_epilogue_kernel<T, R, V><<<grid_of(b), threads_of(b), 0, stream>>>(e, b.bx, b.by);
}

template <typename T, typename R>
void dispatch_fwd(const DenseFwdEpilogue& e, cudaStream_t stream) {
  if (dense_fwd_epilogue_vector(e) > 1) {
    run_fwd<T, R, static_cast<int>(16 / sizeof(T))>(e, stream);
  } else {
    run_fwd<T, R, 1>(e, stream);
  }
}

template <typename T, typename G, int V>
void run_bwd(const DenseBwdEpilogue& e, cudaStream_t stream) {
  const bool partial_sums = scale_grads_requested(e);
  const EpilogueBlock b = dense_bwd_epilogue_block(e, partial_sums);
  if (partial_sums) {
    const size_t smem = static_cast<size_t>(2 + V) * threads_of(b) * sizeof(float);
    dense_bwd_epilogue_kernel<T, G, V, true><<<grid_of(b), threads_of(b), smem, stream>>>(e, b.bx, b.by);
  } else {
    dense_bwd_epilogue_kernel<T, G, V, false><<<grid_of(b), threads_of(b), 0, stream>>>(e, b.bx, b.by);
  }
}

template <typename T, typename G>
void dispatch_bwd(const DenseBwdEpilogue& e, cudaStream_t stream) {
  if (dense_bwd_epilogue_vector(e) > 1) {
    run_bwd<T, G, static_cast<int>(16 / sizeof(T))>(e, stream);
  } else {
    run_bwd<T, G, 1>(e, stream);
  }
}

bool valid_dtype(int d) { return d == kDTypeF32 || d == kDTypeF16 || d == kDTypeBF16; }
bool valid_act(int a) { return a == kActNone || a == kActGelu || a == kActGeluTanh; }

}  // namespace

EpilogueBlock epilogue_block(int64_t nvec, int64_t rows, int64_t max_row_blocks) {
  EpilogueBlock best;
  if (nvec <= 0) return best;
  const int64_t max_rows = rows < 1 ? 1 : rows;
  double best_use = -1.0;
  // Column splits from the fewest that fit 256 threads a row: each split's width is the balanced
  // ceil(nvec / gx); more splits only help when they make the width a better fit for the warps.
  const int64_t gx_min = (nvec + kThreads - 1) / kThreads;
  for (int64_t split = gx_min; split < gx_min + 8 && split <= nvec; ++split) {
    const int bx = static_cast<int>((nvec + split - 1) / split);
    const int64_t gx = (nvec + bx - 1) / bx;
    if (gx != split) continue;  // the same width as a smaller split
    for (int by = 1; by * bx <= kThreads && by <= max_rows; ++by) {
      const int threads = bx * by;
      const int lanes = (threads + 31) / 32 * 32;
      const double use = static_cast<double>(nvec) / static_cast<double>(gx * bx) * threads / lanes;
      const int best_threads = best.bx * best.by;
      const bool better = use > best_use + 1e-9 ||
                          (use > best_use - 1e-9 && (gx < best.gx || (gx == best.gx && threads > best_threads)));
      if (better) {
        best_use = use;
        best.bx = bx;
        best.by = by;
        best.gx = gx;
      }
    }
  }
  int64_t gy = (max_rows + best.by - 1) / best.by;
  const int64_t cap = max_row_blocks < 1 ? 1 : max_row_blocks;
  best.gy = gy > cap ? cap : gy;
  return best;
}

EpilogueBlock dense_bwd_epilogue_block(const DenseBwdEpilogue& e, bool partial_sums) {
  const int64_t nvec = e.cols / dense_bwd_epilogue_vector(e);
  EpilogueBlock b = epilogue_block(nvec, e.rows, kMaxGridY);
  if (partial_sums) {
    const int64_t cap = kScaleGradBlocks / b.gx;
    b = epilogue_block(nvec, e.rows, cap < 1 ? 1 : cap);
  }
  return b;
}

int dense_fwd_epilogue_vector(const DenseFwdEpilogue& e) {
  const int es = elem_size(e.dtype), os = elem_size(e.out_dtype);
  const int v = 16 / es;
  if (e.cols % v != 0) return 1;
  const bool ok = vector_ok(e.t, e.ld_t, es, v) && vector_ok(e.pre, e.ld_pre, es, v) &&
                  vector_ok(e.out, e.ld_out, os, v) && vector_ok(e.residual, e.ld_residual, os, v) &&
                  vector_ok(e.bias, 0, es, v) && vector_ok(e.gamma, 0, es, v);
  return ok ? v : 1;
}

int dense_bwd_epilogue_vector(const DenseBwdEpilogue& e) {
  const int es = elem_size(e.dtype), gs = elem_size(e.grad_dtype);
  const int v = 16 / es;
  if (e.cols % v != 0 || e.grad_stride_col != 1) return 1;
  const bool ok = vector_ok(e.grad, e.grad_stride_row, gs, v) && vector_ok(e.pre, e.ld_pre, es, v) &&
                  vector_ok(e.dt, e.ld_dt, es, v) && vector_ok(e.gamma, 0, es, v);
  return ok ? v : 1;
}

cudaError_t launch_dense_fwd_epilogue(const DenseFwdEpilogue& e, cudaStream_t stream) {
  if (!valid_dtype(e.dtype) || !valid_act(e.act)) return cudaErrorInvalidValue;
  if (e.out_dtype != e.dtype && e.out_dtype != kDTypeF32) return cudaErrorInvalidValue;
  if (e.out_dtype != e.dtype && e.residual == nullptr) return cudaErrorInvalidValue;
  if (e.t == nullptr || e.out == nullptr) return cudaErrorInvalidValue;
  if (e.rows == 0 || e.cols == 0) return cudaSuccess;
  const bool same = e.out_dtype == e.dtype;
  switch (e.dtype) {
    case kDTypeF32: dispatch_fwd<float, float>(e, stream); break;
    case kDTypeF16:
      same ? dispatch_fwd<__half, __half>(e, stream) : dispatch_fwd<__half, float>(e, stream);
      break;
    default:
      same ? dispatch_fwd<__nv_bfloat16, __nv_bfloat16>(e, stream) : dispatch_fwd<__nv_bfloat16, float>(e, stream);
      break;
  }
  return cudaSuccess;
}

cudaError_t launch_dense_bwd_epilogue(const DenseBwdEpilogue& e, cudaStream_t stream) {
  if (!valid_dtype(e.dtype) || !valid_act(e.act)) return cudaErrorInvalidValue;
  if (e.grad_dtype != e.dtype && e.grad_dtype != kDTypeF32) return cudaErrorInvalidValue;
  const bool scale = scale_grads_requested(e);
  if (e.grad == nullptr || (e.dt == nullptr && !scale)) return cudaErrorInvalidValue;
  if ((e.act != kActNone || scale) && e.pre == nullptr) return cudaErrorInvalidValue;
  if (e.rows == 0 || e.cols == 0) return cudaSuccess;
  const bool same = e.grad_dtype == e.dtype;
  switch (e.dtype) {
    case kDTypeF32: dispatch_bwd<float, float>(e, stream); break;
    case kDTypeF16:
      same ? dispatch_bwd<__half, __half>(e, stream) : dispatch_bwd<__half, float>(e, stream);
      break;
    default:
      same ? dispatch_bwd<__nv_bfloat16, __nv_bfloat16>(e, stream) : dispatch_bwd<__nv_bfloat16, float>(e, stream);
      break;
  }
  return cudaSuccess;
}

int token_rows_vector(const TokenRows& t) {
  for (int v : {8, 4, 2}) {
    // Every row start of every operand, and its pointer, aligned to its V-wide access.
    auto ok = [&](const void* p, int dtype, std::initializer_list<int64_t> offsets) {
      if (p == nullptr) return true;
      const int es = elem_size(dtype);
      for (int64_t off : offsets) {
        if (!vector_ok(p, off, es, v)) return false;
      }
      return vector_ok(p, 0, es, v);
    };
    const int64_t pitch = t.rows > 1 ? t.dim : 0;  // between a batch's rows
    if (ok(t.out, t.out_dtype, {t.batch > 1 ? t.batch_stride : 0, pitch, t.row0 * t.dim}) &&
        ok(t.src_a, t.a_dtype, {pitch, t.a_row0 * t.dim}) && ok(t.src_b, t.b_dtype, {pitch, t.b_row0 * t.dim}) &&
        ok(t.vec, t.vec_dtype, {})) {
      return v;
    }
  }
  return 1;
}

int token_rows_index_bits(const TokenRows& t) {
  // The row loop's index passes the last row by at most one grid step; the slots' by a block.
  const int64_t tasks = t.batch * t.rows;
  const bool fits = tasks <= INT32_MAX - kMaxGridY * kThreads && t.dim <= INT32_MAX - 8 * kThreads;
  return fits ? 32 : 64;
}

EpilogueBlock token_rows_block(const TokenRows& t) {
  const int v = token_rows_vector(t);
  return epilogue_block((t.dim + v - 1) / v, t.batch * t.rows, kMaxGridY);
}

namespace {

template <int V>
void run_token_rows(const TokenRows& t, cudaStream_t stream) {
  const EpilogueBlock b = token_rows_block(t);
  if (token_rows_index_bits(t) == 32) {
    token_rows_kernel<V, int32_t><<<grid_of(b), threads_of(b), 0, stream>>>(t, b.bx, b.by);
  } else {
    token_rows_kernel<V, int64_t><<<grid_of(b), threads_of(b), 0, stream>>>(t, b.bx, b.by);
  }
}

}  // namespace

cudaError_t launch_token_rows(const TokenRows& t, cudaStream_t stream) {
  for (int d : {t.out_dtype, t.a_dtype, t.b_dtype, t.vec_dtype}) {
    if (!valid_dtype(d)) return cudaErrorInvalidValue;
  }
  if (t.out == nullptr || t.batch < 0 || t.rows < 0 || t.dim < 0) return cudaErrorInvalidValue;
  if (t.batch * t.rows * t.dim == 0) return cudaSuccess;
  switch (token_rows_vector(t)) {
    case 8: run_token_rows<8>(t, stream); break;
    case 4: run_token_rows<4>(t, stream); break;
    case 2: run_token_rows<2>(t, stream); break;
    default: run_token_rows<1>(t, stream); break;
  }
  return cudaSuccess;
}

}  // namespace vitkern
