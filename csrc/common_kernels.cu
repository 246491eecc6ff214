// What both loss families share: the final fixed-order sum of per-row or per-block
// partials, and the CUDA versions.
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

}  // namespace

void launch_finish_sum(int dtype, const float* partials, int64_t n, const int64_t* count, float divisor, void* out,
                       cudaStream_t stream) {
  dispatch_logits_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    MPT_LAUNCH(finish_sum_kernel<D>, 1, 1024, stream)(partials, n, count, divisor,
                                                      static_cast<typename D::storage*>(out));
  });
  MPT_CHECK_LAUNCH("finish_sum_kernel");
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
