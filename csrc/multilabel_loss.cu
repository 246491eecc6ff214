// The multi-label family (spec §4-5: Hill, SPLC): an elementwise forward kernel and an
// elementwise backward kernel.
//
// Threads walk (row, 16-byte column slot) units in a grid-stride loop; each element's
// loss and gradient come from multilabel_element (loss_math.cuh). Targets of every dtype
// are read as stored (positive iff > 0.5). "none" writes the losses; "sum"/"mean" keep a
// per-block partial, reduced afterwards in a fixed order (no float atomics). The forward
// writes the gradient for an upstream gradient of 1 (times 1/(N·C) for "mean"); the
// backward reads the upstream gradient on the device and, only where it is not 1,
// recomputes the element's gradient times it (multilabel_gradient, as the forward) and
// rounds it once: a scalar upstream gradient of 1 costs one read.
#include <type_traits>

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
  float* partials;           // forward: one per block ("sum"/"mean"), or null
  void* out;                 // forward: "none": (N, C) contiguous losses, else null
  void* grad;                // (N, C) contiguous, or null
  const void* upstream;      // backward: the upstream gradient, in the logits' dtype
  int64_t upstream_stride0;  // backward: 0 and 0 for a scalar
  int64_t upstream_stride1;
  bool vec_logits, vec_targets, vec_out, vec_grad, vec_upstream;
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

// The logits (as float32) and the positive flags of the unit's columns [col0, col0 + VEC).
template <typename D, typename TD, int VEC>
__device__ __forceinline__ void load_elements(const MultilabelKernelArgs& a, int64_t row, int64_t col0, float (&x)[VEC],
                                              bool (&positive)[VEC]) {
  using S = typename D::storage;
  using TS = typename TD::storage;
  load_slot<D, VEC>(static_cast<const S*>(a.logits) + row * a.logits_row_stride, col0, a.num_cols, a.vec_logits, x);
  load_positive<TD, VEC>(static_cast<const TS*>(a.targets) + row * a.targets_row_stride, col0, a.num_cols,
                         a.vec_targets, positive);
}

// kFocal: γ != 0 (see focal_positive)
template <typename D, typename TD, int VEC, bool kFocal>
__global__ void __launch_bounds__(kElementwiseThreads) multilabel_loss_kernel(const MultilabelKernelArgs a) {
  using S = typename D::storage;
  const int64_t C = a.num_cols;
  float acc = 0.0f;
  for (UnitWalk w((C + VEC - 1) / VEC); w.row < a.num_rows; w.advance()) {
    const int64_t col0 = w.vec * VEC;
    float x[VEC];
    bool positive[VEC];
    load_elements<D, TD, VEC>(a, w.row, col0, x, positive);
    float loss[VEC], grad[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {  // a tail unit's columns >= C read 0 and are not summed or stored
      const LossAndGrad r = multilabel_element<kFocal>(x[e], positive[e], a.math);
      loss[e] = col0 + e < C ? r.loss : 0.0f;
      grad[e] = multilabel_gradient(r, a.grad_scale, 1.0f);
      acc += loss[e];
    }
    if (a.out != nullptr) store_slot<D, VEC>(static_cast<S*>(a.out) + w.row * C, col0, C, a.vec_out, loss);
    if (a.grad != nullptr) store_slot<D, VEC>(static_cast<S*>(a.grad) + w.row * C, col0, C, a.vec_grad, grad);
  }
  if (a.partials != nullptr) {
    acc = block_merge(acc, Add{}, 0.0f);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = acc;
  }
}

// Rewrites the gradient of the elements whose upstream gradient is not 1; the others keep
// what the forward wrote (a scalar 1 returns at once).
template <typename D, typename TD, int VEC, bool kFocal>
__global__ void __launch_bounds__(kElementwiseThreads) multilabel_backward_kernel(const MultilabelKernelArgs a) {
  using S = typename D::storage;
  const S* up = static_cast<const S*>(a.upstream);
  const bool scalar = a.upstream_stride0 == 0 && a.upstream_stride1 == 0;
  if (scalar && !recompute_element(D::to_float(up[0]))) return;
  const int64_t C = a.num_cols;
  for (UnitWalk w((C + VEC - 1) / VEC); w.row < a.num_rows; w.advance()) {
    const int64_t col0 = w.vec * VEC;
    const S* up_row = up + w.row * a.upstream_stride0;
    float upstream[VEC];
    if (a.upstream_stride1 == 1) {
      load_slot<D, VEC>(up_row, col0, C, a.vec_upstream, upstream);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) upstream[e] = col0 + e < C ? D::to_float(up_row[(col0 + e) * a.upstream_stride1]) : 1.0f;
    }
    bool recompute[VEC], any = false, all = true;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      recompute[e] = col0 + e < C && recompute_element(upstream[e]);
      any = any || recompute[e];
      all = all && (recompute[e] || col0 + e >= C);
    }
    if (!any) continue;
    float x[VEC], grad[VEC];
    bool positive[VEC];
    load_elements<D, TD, VEC>(a, w.row, col0, x, positive);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      grad[e] = recompute[e]
                    ? multilabel_gradient(multilabel_element<kFocal>(x[e], positive[e], a.math), a.grad_scale, upstream[e])
                    : 0.0f;
    }
    S* grad_row = static_cast<S*>(a.grad) + w.row * C;
    if (all) {
      store_slot<D, VEC>(grad_row, col0, C, a.vec_grad, grad);
    } else {  // some columns keep the forward's gradient
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (recompute[e]) grad_row[col0 + e] = D::from_float(grad[e]);
      }
    }
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
    default: throw std::invalid_argument("unknown target dtype code " + std::to_string(dtype));
  }
}

void check_inputs(const MultilabelInputs& in, const char* entry) {
  auto fail = [entry](const std::string& what) { throw std::invalid_argument(std::string(entry) + ": " + what); };
  if (in.dtype < kFloat32 || in.dtype > kBFloat16) fail("logits dtype must be float32, float16 or bfloat16");
  if (in.target_dtype < kFloat32 || in.target_dtype > kFloat64) fail("unknown target dtype code");
  if (in.num_rows < 0 || in.num_cols < 0) fail("sizes must be >= 0");
  if (in.num_rows > 0 && in.num_cols > 0 && (in.logits == 0 || in.targets == 0)) fail("logits and targets are required");
}

// Launches the forward or the backward kernel over every element (at most
// kMultilabelMaxBlocks blocks); returns the number of blocks (0 for no element).
template <bool kBackward>
unsigned launch_elements(MultilabelKernelArgs a, const MultilabelInputs& in, cudaStream_t stream) {
  if (in.num_rows == 0 || in.num_cols == 0) return 0;
  unsigned blocks = 0;
  dispatch_logits_dtype(in.dtype, [&](auto tag) {
    using D = decltype(tag);
    using S = typename D::storage;
    constexpr int VEC = 16 / sizeof(S);
    a.vec_logits = slots_aligned<S, VEC>(in.logits, in.logits_row_stride);
    a.vec_out = a.out != nullptr && slots_aligned<S, VEC>(reinterpret_cast<uintptr_t>(a.out), in.num_cols);
    a.vec_grad = a.grad != nullptr && slots_aligned<S, VEC>(reinterpret_cast<uintptr_t>(a.grad), in.num_cols);
    a.vec_upstream = a.upstream != nullptr && a.upstream_stride1 == 1 &&
                     slots_aligned<S, VEC>(reinterpret_cast<uintptr_t>(a.upstream), a.upstream_stride0);
    blocks = elementwise_blocks(in.num_rows * ((in.num_cols + VEC - 1) / VEC));
    dispatch_target_dtype(in.target_dtype, [&](auto target_tag) {
      using TD = decltype(target_tag);
      a.vec_targets = slots_aligned<typename TD::storage, VEC>(in.targets, in.targets_row_stride);
      auto launch = [&](auto focal) {
        constexpr bool kFocal = decltype(focal)::value;
        auto kernel = kBackward ? multilabel_backward_kernel<D, TD, VEC, kFocal> : multilabel_loss_kernel<D, TD, VEC, kFocal>;
        MPT_LAUNCH(kernel, blocks, kElementwiseThreads, stream)(a);
      };
      if (a.math.gamma != 0.0f) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    });
  });
  check_cuda(cudaGetLastError(), kBackward ? "launch of multilabel_backward_kernel" : "launch of multilabel_loss_kernel");
  return blocks;
}

MultilabelKernelArgs kernel_args(const MultilabelInputs& in, uintptr_t grad) {
  MultilabelKernelArgs a{};
  a.math = in.math;
  a.num_rows = in.num_rows;
  a.num_cols = in.num_cols;
  a.logits = reinterpret_cast<const void*>(in.logits);
  a.logits_row_stride = in.logits_row_stride;
  a.targets = reinterpret_cast<const void*>(in.targets);
  a.targets_row_stride = in.targets_row_stride;
  a.grad_scale = in.grad_scale;
  a.grad = reinterpret_cast<void*>(grad);
  return a;
}

}  // namespace

void multilabel_forward(const MultilabelForwardArgs& f, const Launch& launch) {
  const MultilabelInputs& in = f.inputs;
  check_inputs(in, "multilabel_forward");
  auto fail = [](const std::string& what) { throw std::invalid_argument("multilabel_forward: " + what); };
  if (f.reduction < kReduceNone || f.reduction > kReduceMean) fail("unknown reduction code");
  const bool empty = in.num_rows == 0 || in.num_cols == 0;
  if (f.loss == 0 && !(empty && f.reduction == kReduceNone)) fail("loss is required");
  if (f.reduction != kReduceNone && f.partials == 0) fail("partials is required for a scalar reduction");

  MultilabelKernelArgs a = kernel_args(in, f.grad);
  a.partials = f.reduction != kReduceNone ? reinterpret_cast<float*>(f.partials) : nullptr;
  a.out = f.reduction == kReduceNone ? reinterpret_cast<void*>(f.loss) : nullptr;
  cudaStream_t stream = enter_device(launch);
  const unsigned blocks = launch_elements<false>(a, in, stream);
  if (f.reduction != kReduceNone) {
    const float divisor = f.reduction == kReduceMean ? static_cast<float>(in.num_rows * in.num_cols) : 0.0f;
    launch_finish_sum(in.dtype, reinterpret_cast<const float*>(f.partials), blocks, nullptr, divisor,
                      reinterpret_cast<void*>(f.loss), stream);
  }
}

void multilabel_backward(const MultilabelBackwardArgs& b, const Launch& launch) {
  const MultilabelInputs& in = b.inputs;
  check_inputs(in, "multilabel_backward");
  if (in.num_rows == 0 || in.num_cols == 0) return;
  if (b.upstream == 0 || b.grad == 0) throw std::invalid_argument("multilabel_backward: upstream and grad are required");
  MultilabelKernelArgs a = kernel_args(in, b.grad);
  a.upstream = reinterpret_cast<const void*>(b.upstream);
  a.upstream_stride0 = b.upstream_stride0;
  a.upstream_stride1 = b.upstream_stride1;
  launch_elements<true>(a, in, enter_device(launch));
}

}  // namespace mpt
