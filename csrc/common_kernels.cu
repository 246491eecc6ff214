// Kernels both loss families share: the final fixed-order sum of per-row or per-block
// partials, and the backward's scaling of the gradient that the forward computed for an
// upstream gradient of 1.
#include "cuda_common.cuh"

namespace mpt {
namespace {

template <typename D>
__global__ void __launch_bounds__(1024) finish_sum_kernel(const float* __restrict__ partials, int64_t n,
                                                          const int64_t* __restrict__ count, float divisor,
                                                          typename D::storage* __restrict__ out) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_merge(acc, Add{}, 0.0f);
  if (threadIdx.x == 0) {
    if (count != nullptr) {
      const int64_t c = *count;  // 0 counted rows: every row loss is 0, and so is the mean
      acc = acc / static_cast<float>(c > 1 ? c : 1);
    } else if (divisor > 0.0f) {
      acc = acc / divisor;
    }
    out[0] = D::from_float(acc);
  }
}

struct ScaleKernelArgs {
  void* grad;  // (N, C) contiguous
  int64_t num_rows;
  int64_t num_cols;
  const void* upstream;
  int mode;
  int64_t stride0;
  int64_t stride1;
  bool vec_grad;
  const void* target;  // or null: every row scales
  int64_t target_stride;
  bool target_is_int64;
  bool has_ignore_index;
  int64_t ignore_index;
};

// Whether a row's gradient scales: a row of the softmax family whose target is ignored
// (or out of range) has zero gradient whatever the upstream gradient, even NaN.
__device__ __forceinline__ bool row_scales(const ScaleKernelArgs& a, int64_t row) {
  if (a.target == nullptr) return true;
  const int64_t offset = row * a.target_stride;
  const int64_t y = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[offset]
                                      : static_cast<int64_t>(static_cast<const int32_t*>(a.target)[offset]);
  return classify_target(y, a.has_ignore_index, a.ignore_index, static_cast<int>(a.num_cols)) == kTargetCounted;
}

// grad *= upstream, where upstream is one scalar, one value per row ("none" of the
// softmax family) or one per element ("none" of the multi-label family). Where the
// upstream gradient is exactly 1 nothing is read or written: a scalar 1 returns at once.
// Rows that row_scales excludes are left as they are (zero).
template <typename D, int VEC>
__global__ void __launch_bounds__(kElementwiseThreads) scale_gradient_kernel(const ScaleKernelArgs a) {
  using S = typename D::storage;
  const S* up = static_cast<const S*>(a.upstream);
  float scalar = 1.0f;
  if (a.mode == kUpstreamScalar) {
    scalar = D::to_float(up[0]);
    if (scalar == 1.0f) return;
  }
  const int64_t C = a.num_cols;
  for (UnitWalk w((C + VEC - 1) / VEC); w.row < a.num_rows; w.advance()) {
    if (!row_scales(a, w.row)) continue;
    const int64_t col0 = w.vec * VEC;
    float factor[VEC];
    bool all_one = true;
    if (a.mode == kUpstreamPerRow) scalar = D::to_float(up[w.row * a.stride0]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      factor[e] = 1.0f;
      if (col0 + e < C) {
        factor[e] = a.mode == kUpstreamPerElement ? D::to_float(up[w.row * a.stride0 + (col0 + e) * a.stride1]) : scalar;
      }
      all_one = all_one && factor[e] == 1.0f;
    }
    if (all_one) continue;
    S* row = static_cast<S*>(a.grad) + w.row * C;
    float values[VEC];
    load_slot<D, VEC>(row, col0, C, a.vec_grad, values);
#pragma unroll
    for (int e = 0; e < VEC; ++e) values[e] *= factor[e];
    store_slot<D, VEC>(row, col0, C, a.vec_grad, values);
  }
}

}  // namespace

void launch_finish_sum(int dtype, const float* partials, int64_t n, const int64_t* count, float divisor, void* out,
                       cudaStream_t stream) {
  dispatch_logits_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    finish_sum_kernel<D><<<1, 1024, 0, stream>>>(partials, n, count, divisor, static_cast<typename D::storage*>(out));
  });
  MPT_CHECK_LAUNCH("finish_sum_kernel");
}

void scale_gradient(const ScaleGradientArgs& in, const Launch& launch) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("scale_gradient: " + what); };
  if (in.mode < kUpstreamScalar || in.mode > kUpstreamPerElement) fail("unknown upstream mode");
  if (in.num_rows < 0 || in.num_cols < 0) fail("sizes must be >= 0");
  if (in.target != 0 && in.num_cols > 0x7fffffff) fail("a softmax-family gradient has at most 2**31 - 1 classes");
  if (in.dtype < kFloat32 || in.dtype > kBFloat16) fail("dtype must be float32, float16 or bfloat16");
  if (in.num_rows == 0 || in.num_cols == 0) return;
  if (in.grad == 0 || in.upstream == 0) fail("grad and upstream are required");
  cudaStream_t stream = enter_device(launch);
  dispatch_logits_dtype(in.dtype, [&](auto tag) {
    using D = decltype(tag);
    using S = typename D::storage;
    constexpr int VEC = 16 / sizeof(S);
    ScaleKernelArgs a{reinterpret_cast<void*>(in.grad), in.num_rows, in.num_cols,
                      reinterpret_cast<const void*>(in.upstream), in.mode, in.upstream_stride0,
                      in.upstream_stride1, slots_aligned<S, VEC>(in.grad, in.num_cols),
                      reinterpret_cast<const void*>(in.target), in.target_stride, in.target_is_int64,
                      in.has_ignore_index, in.ignore_index};
    const int64_t units = in.num_rows * ((in.num_cols + VEC - 1) / VEC);
    scale_gradient_kernel<D, VEC><<<elementwise_blocks(units), kElementwiseThreads, 0, stream>>>(a);
  });
  MPT_CHECK_LAUNCH("scale_gradient_kernel");
}

int cuda_runtime_version() {
  int version = 0;
  MPT_CUDA_CHECK(cudaRuntimeGetVersion(&version));
  return version;
}

int cuda_driver_version() {
  int version = 0;
  MPT_CUDA_CHECK(cudaDriverGetVersion(&version));  // needs no context; 0 without a driver
  return version;
}

}  // namespace mpt
