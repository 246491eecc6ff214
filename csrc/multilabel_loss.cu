// The multi-label family (spec §4-5: Hill, SPLC): one elementwise kernel.
//
// Threads walk (row, 16-byte column slot) units in a grid-stride loop; each element's
// loss and gradient come from multilabel_element (loss_math.cuh). Targets of every dtype
// are read as stored (positive iff > 0.5). "none" writes the losses; "sum"/"mean" keep a
// per-block partial, reduced afterwards in a fixed order (no float atomics). The
// gradient is written for an upstream gradient of 1 (times 1/(N·C) for "mean").
#include "cuda_common.cuh"

namespace mpt {
namespace {

struct MultilabelKernelArgs {
  MultilabelParams math;
  int64_t num_rows;
  int64_t num_cols;
  const void* logits;
  int64_t logits_row_stride;
  const void* targets;
  int64_t targets_row_stride;
  float grad_scale;
  float* partials;  // one per block ("sum"/"mean"), or null
  void* out;        // "none": (N, C) contiguous losses, else null
  void* grad;       // (N, C) contiguous, or null
  bool vec_logits, vec_targets, vec_out, vec_grad;
};

// Whether columns [col0, col0 + VEC) of a target row are positive (columns >= cols: false).
template <typename TD, int VEC>
__device__ __forceinline__ void load_positive(const typename TD::storage* row, int64_t col0, int64_t cols,
                                              bool aligned, bool (&positive)[VEC]) {
  using TS = typename TD::storage;
  if (aligned && col0 + VEC <= cols) {
    TS raw[VEC];
    load_pack<VEC>(row + col0, raw);
#pragma unroll
    for (int e = 0; e < VEC; ++e) positive[e] = TD::positive(raw[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) positive[e] = col0 + e < cols && TD::positive(row[col0 + e]);
  }
}

template <typename D, typename TD, int VEC>
__global__ void __launch_bounds__(kElementwiseThreads) multilabel_loss_kernel(const MultilabelKernelArgs a) {
  using S = typename D::storage;
  using TS = typename TD::storage;
  const int64_t C = a.num_cols;
  float acc = 0.0f;
  for (UnitWalk w((C + VEC - 1) / VEC); w.row < a.num_rows; w.advance()) {
    const int64_t col0 = w.vec * VEC;
    float x[VEC];
    bool positive[VEC];
    load_slot<D, VEC>(static_cast<const S*>(a.logits) + w.row * a.logits_row_stride, col0, C, a.vec_logits, x);
    load_positive<TD, VEC>(static_cast<const TS*>(a.targets) + w.row * a.targets_row_stride, col0, C,
                           a.vec_targets, positive);
    float loss[VEC], grad[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      loss[e] = grad[e] = 0.0f;
      if (col0 + e < C) {
        const LossAndGrad r = multilabel_element(x[e], positive[e], a.math);
        loss[e] = r.loss;
        grad[e] = r.grad * a.grad_scale;
        acc += r.loss;
      }
    }
    if (a.out != nullptr) store_slot<D, VEC>(static_cast<S*>(a.out) + w.row * C, col0, C, a.vec_out, loss);
    if (a.grad != nullptr) store_slot<D, VEC>(static_cast<S*>(a.grad) + w.row * C, col0, C, a.vec_grad, grad);
  }
  if (a.partials != nullptr) {
    acc = block_merge(acc, Add{}, 0.0f);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = acc;
  }
}

template <typename F>
void dispatch_target_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kUInt8: f(UInt8{}); break;
    case kFloat16: f(Float16{}); break;
    case kBFloat16: f(BFloat16{}); break;
    case kFloat32: f(Float32{}); break;
    case kFloat64: f(Float64{}); break;
    default: throw std::invalid_argument("multilabel_forward: unknown target dtype code " + std::to_string(dtype));
  }
}

void check_args(const MultilabelForwardArgs& in) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("multilabel_forward: " + what); };
  if (in.dtype < kFloat32 || in.dtype > kBFloat16) fail("logits dtype must be float32, float16 or bfloat16");
  if (in.target_dtype < kFloat32 || in.target_dtype > kFloat64) fail("unknown target dtype code");
  if (in.num_rows < 0 || in.num_cols < 0) fail("sizes must be >= 0");
  if (in.reduction < kReduceNone || in.reduction > kReduceMean) fail("unknown reduction code");
  const bool empty = in.num_rows == 0 || in.num_cols == 0;
  if (!empty && (in.logits == 0 || in.targets == 0)) fail("logits and targets are required");
  if (in.loss == 0 && !(empty && in.reduction == kReduceNone)) fail("loss is required");
  if (in.reduction != kReduceNone && in.partials == 0) fail("partials is required for a scalar reduction");
}

}  // namespace

void multilabel_forward(const MultilabelForwardArgs& in, const Launch& launch) {
  check_args(in);
  cudaStream_t stream = enter_device(launch);
  unsigned blocks = 0;
  if (in.num_rows > 0 && in.num_cols > 0) {
    dispatch_logits_dtype(in.dtype, [&](auto tag) {
      using D = decltype(tag);
      using S = typename D::storage;
      constexpr int VEC = 16 / sizeof(S);
      MultilabelKernelArgs a{};
      a.math = in.math;
      a.num_rows = in.num_rows;
      a.num_cols = in.num_cols;
      a.logits = reinterpret_cast<const void*>(in.logits);
      a.logits_row_stride = in.logits_row_stride;
      a.targets = reinterpret_cast<const void*>(in.targets);
      a.targets_row_stride = in.targets_row_stride;
      a.grad_scale = in.grad_scale;
      a.partials = in.reduction != kReduceNone ? reinterpret_cast<float*>(in.partials) : nullptr;
      a.out = in.reduction == kReduceNone ? reinterpret_cast<void*>(in.loss) : nullptr;
      a.grad = reinterpret_cast<void*>(in.grad);
      a.vec_logits = slots_aligned<S, VEC>(in.logits, in.logits_row_stride);
      a.vec_out = a.out != nullptr && slots_aligned<S, VEC>(in.loss, in.num_cols);
      a.vec_grad = a.grad != nullptr && slots_aligned<S, VEC>(in.grad, in.num_cols);
      blocks = elementwise_blocks(in.num_rows * ((in.num_cols + VEC - 1) / VEC));
      dispatch_target_dtype(in.target_dtype, [&](auto target_tag) {
        using TD = decltype(target_tag);
        a.vec_targets = slots_aligned<typename TD::storage, VEC>(in.targets, in.targets_row_stride);
        multilabel_loss_kernel<D, TD, VEC><<<blocks, kElementwiseThreads, 0, stream>>>(a);
      });
    });
    MPT_CHECK_LAUNCH("multilabel_loss_kernel");
  }
  if (in.reduction != kReduceNone) {
    const float divisor = in.reduction == kReduceMean ? static_cast<float>(in.num_rows * in.num_cols) : 0.0f;
    launch_finish_sum(in.dtype, reinterpret_cast<const float*>(in.partials), blocks, nullptr, divisor,
                      reinterpret_cast<void*>(in.loss), stream);
  }
}

}  // namespace mpt
