// The softmax family (spec §1-3: margin-calibrated CE, focal distillation, MPT): a
// forward and a backward kernel, one block per row.
//
// Each thread owns the 16-byte column slots tid, tid + B, tid + 2B, ... of its row
// (coalesced), accumulates them into a SoftmaxRowState (loss_math.cuh), and the block
// merges the states in a fixed tree. Rows up to kCachedRowLimit classes fit one chunk,
// which stays in registers: the forward with gradient reads every input row once and
// writes the gradient once (only the length-C class_bias vector, shared by every row, is
// read again from cache). Longer rows are walked in chunks twice: statistics, then
// gradient. Launch shapes: up to 256 threads with one 16-byte slot each (C <= 256 slots),
// else up to 512 threads with 16 elements each; the backward uses the forward's.
//
// The forward writes the gradient for an upstream gradient of 1, with "mean"'s 1/count
// folded in (count_rows_kernel counts the rows on the device first), and saves each
// counted row's SoftmaxRowStats. The backward reads the upstream gradient on the device:
// a row whose upstream gradient is 1 (or that is ignored) is left as the forward wrote
// it; any other row is recomputed from the inputs and its stats, times the upstream
// gradient in float32, and rounded once. Both kernels run the same gradient sweep.
// Per-row losses go to a float32 buffer, reduced in a fixed order.
#include "cuda_common.cuh"

namespace mpt {
namespace {

struct SoftmaxKernelArgs {
  SoftmaxRowParams row;
  const void* logits;
  int64_t logits_row_stride;
  const void* old_logits;
  int64_t old_row_stride;
  const void* new_logits;
  int64_t new_row_stride;
  const float* class_bias;
  const void* target;
  int64_t target_stride;
  bool target_is_int64;
  bool has_ignore_index;
  int64_t ignore_index;
  float* row_loss;              // forward
  const int64_t* counted_rows;  // forward, "mean": the gradient carries 1/count
  float* stats;                 // forward writes, backward reads: kSoftmaxStatFloats per row
  const void* upstream;         // backward: the upstream gradient, in the logits' dtype
  int64_t upstream_stride;      // backward: 0 for a scalar
  void* grad;
  int chunks;  // column chunks of blockDim.x * NV * VEC; 1: the row stays in registers
  bool vec_logits, vec_old, vec_new, vec_bias, vec_grad;  // 16-byte accesses allowed
};

__device__ __forceinline__ int64_t read_target(const void* target, int64_t index, bool is_int64) {
  return is_int64 ? static_cast<const int64_t*>(target)[index]
                  : static_cast<int64_t>(static_cast<const int32_t*>(target)[index]);
}

// ---------------------------------------------------------------------------- counted rows
__global__ void __launch_bounds__(1024) count_rows_kernel(const void* target, int64_t stride, bool is_int64,
                                                          int64_t num_rows, bool has_ignore_index,
                                                          int64_t ignore_index, int64_t* count) {
  int64_t n = 0;
  for (int64_t i = threadIdx.x; i < num_rows; i += blockDim.x) {
    n += !(has_ignore_index && read_target(target, i * stride, is_int64) == ignore_index);
  }
  n = block_merge(n, Add{}, int64_t{0});
  if (threadIdx.x == 0) *count = n;
}

// ---------------------------------------------------------------------------- the row kernel
struct RowMerge {
  __device__ SoftmaxRowState operator()(const SoftmaxRowState& a, const SoftmaxRowState& b) const {
    return row_merge(a, b);
  }
};

// First column of this thread's slot k of chunk `chunk`.
template <int VEC, int NV>
__device__ __forceinline__ int64_t slot_column(int chunk, int k) {
  return (static_cast<int64_t>(chunk * NV + k) * blockDim.x + threadIdx.x) * VEC;
}

// The bias Δ of columns [col0, col0 + VEC): the class_bias vector, or the new-class bias.
template <int VEC>
__device__ __forceinline__ void load_delta(const SoftmaxKernelArgs& a, int64_t col0, float (&delta)[VEC]) {
  if (a.class_bias != nullptr) {
    load_slot<Float32, VEC>(a.class_bias, col0, a.row.num_classes, a.vec_bias, delta);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) delta[e] = new_class_delta(a.row, static_cast<int>(col0) + e);
  }
}

template <typename D, int VEC, int NV>
__device__ __forceinline__ void load_chunk(const SoftmaxKernelArgs& a, int chunk, const typename D::storage* z_row,
                                           const typename D::storage* old_row, const typename D::storage* new_row,
                                           float (&z)[NV][VEC], float (&r_old)[NV][VEC], float (&r_new)[NV][VEC]) {
  const SoftmaxRowParams& p = a.row;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t col0 = slot_column<VEC, NV>(chunk, k);
    if (col0 >= p.num_classes) break;
    load_slot<D, VEC>(z_row, col0, p.num_classes, a.vec_logits, z[k]);
    if (p.has_old) load_slot<D, VEC>(old_row, col0, p.num_old_classes, a.vec_old, r_old[k]);
    if (p.has_new) load_slot<D, VEC>(new_row, col0, p.num_classes, a.vec_new, r_new[k]);
  }
}

// The input rows of row `row`.
template <typename D>
struct RowInputs {
  using S = typename D::storage;
  const S* z;
  const S* old;
  const S* neu;

  __device__ RowInputs(const SoftmaxKernelArgs& a, int64_t row)
      : z(static_cast<const S*>(a.logits) + row * a.logits_row_stride),
        old(a.row.has_old ? static_cast<const S*>(a.old_logits) + row * a.old_row_stride : nullptr),
        neu(a.row.has_new ? static_cast<const S*>(a.new_logits) + row * a.new_row_stride : nullptr) {}
};

// The gradient sweep, shared by the forward (upstream 1, the row in registers when it is
// one chunk) and the backward (the row's upstream gradient, reading the row): every
// column's row_gradient, rounded once into the logits' dtype.
template <typename D, int VEC, int NV>
__device__ __forceinline__ void gradient_sweep(const SoftmaxKernelArgs& a, const RowInputs<D>& in, int64_t row,
                                               int64_t y, const SoftmaxRowStats& stats, float upstream,
                                               bool row_in_registers, float (&z)[NV][VEC], float (&r_old)[NV][VEC],
                                               float (&r_new)[NV][VEC]) {
  using S = typename D::storage;
  const SoftmaxRowParams& p = a.row;
  const int C = p.num_classes;
  S* grad_row = static_cast<S*>(a.grad) + row * C;
  for (int chunk = 0; chunk < a.chunks; ++chunk) {
    if (!row_in_registers) load_chunk<D, VEC, NV>(a, chunk, in.z, in.old, in.neu, z, r_old, r_new);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col0 = slot_column<VEC, NV>(chunk, k);
      if (col0 >= C) break;
      float delta[VEC], g[VEC];
      load_delta<VEC>(a, col0, delta);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int j = static_cast<int>(col0) + e;
        g[e] = j < C ? row_gradient(stats, p, j, y, z[k][e], delta[e], r_old[k][e], r_new[k][e], upstream) : 0.0f;
      }
      store_slot<D, VEC>(grad_row, col0, C, a.vec_grad, g);
    }
  }
}

template <typename D, int VEC, int NV>
__global__ void __launch_bounds__(512) softmax_loss_kernel(const SoftmaxKernelArgs a) {
  const SoftmaxRowParams& p = a.row;
  const int C = p.num_classes;
  const int64_t row = blockIdx.x;

  // An ignored row (and an out-of-range target) gets zero gradient, written all the same.
  const int64_t y = read_target(a.target, row * a.target_stride, a.target_is_int64);
  const int target_kind = classify_target(y, a.has_ignore_index, a.ignore_index, C);
  if (target_kind != kTargetCounted) {
    if (threadIdx.x == 0) a.row_loss[row] = target_kind == kTargetIgnored ? 0.0f : NAN;
    if (a.grad != nullptr) {
      typename D::storage* grad_row = static_cast<typename D::storage*>(a.grad) + row * C;
      const float zeros[VEC] = {};
      for (int64_t col0 = static_cast<int64_t>(threadIdx.x) * VEC; col0 < C; col0 += static_cast<int64_t>(blockDim.x) * VEC) {
        store_slot<D, VEC>(grad_row, col0, C, a.vec_grad, zeros);
      }
    }
    return;
  }

  const RowInputs<D> in(a, row);
  float z[NV][VEC] = {}, r_old[NV][VEC] = {}, r_new[NV][VEC] = {};

  // Sweep 1: the row's statistics.
  SoftmaxRowState state = row_empty();
  for (int chunk = 0; chunk < a.chunks; ++chunk) {
    load_chunk<D, VEC, NV>(a, chunk, in.z, in.old, in.neu, z, r_old, r_new);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col0 = slot_column<VEC, NV>(chunk, k);
      if (col0 >= C) break;
      float delta[VEC];
      load_delta<VEC>(a, col0, delta);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int j = static_cast<int>(col0) + e;
        if (j < C) row_add(state, p, j, y, z[k][e], delta[e], r_old[k][e], r_new[k][e]);
      }
    }
  }
  state = block_merge(state, RowMerge{}, row_empty());
  const bool with_grad = a.grad != nullptr;
  const float scale = with_grad && a.counted_rows != nullptr ? 1.0f / static_cast<float>(*a.counted_rows) : 1.0f;
  const SoftmaxRowResult result = row_finish(state, p, y, scale);
  if (threadIdx.x == 0) {
    a.row_loss[row] = result.loss;
    if (with_grad) store_row_stats(result.stats, a.stats + row * kSoftmaxStatFloats);
  }
  if (!with_grad) return;

  // Sweep 2: the gradient for an upstream gradient of 1, from the registers (one chunk)
  // or reading the row again.
  gradient_sweep<D, VEC, NV>(a, in, row, y, result.stats, 1.0f, a.chunks == 1, z, r_old, r_new);
}

// Rewrites the gradient of the rows that recompute_row selects (counted, upstream != 1)
// from the inputs and the forward's stats; every other row keeps what the forward wrote.
template <typename D, int VEC, int NV>
__global__ void __launch_bounds__(512) softmax_backward_kernel(const SoftmaxKernelArgs a) {
  using S = typename D::storage;
  const int64_t row = blockIdx.x;
  const float upstream = D::to_float(static_cast<const S*>(a.upstream)[row * a.upstream_stride]);
  const int64_t y = read_target(a.target, row * a.target_stride, a.target_is_int64);
  if (!recompute_row(classify_target(y, a.has_ignore_index, a.ignore_index, a.row.num_classes), upstream)) return;

  const SoftmaxRowStats stats = load_row_stats(a.stats + row * kSoftmaxStatFloats);
  float z[NV][VEC] = {}, r_old[NV][VEC] = {}, r_new[NV][VEC] = {};
  gradient_sweep<D, VEC, NV>(a, RowInputs<D>(a, row), row, y, stats, upstream, false, z, r_old, r_new);
}

int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

int clamp_threads(int64_t wanted, int low, int high) {
  const int p = next_power_of_two(wanted);
  return p < low ? low : (p > high ? high : p);
}

// One block per row, in the launch shape of the row length; the backward kernel runs in
// the forward's shape.
template <typename D, bool kBackward>
void launch_rows(SoftmaxKernelArgs a, const SoftmaxInputs& in, uintptr_t grad, cudaStream_t stream) {
  using S = typename D::storage;
  constexpr int VEC = 16 / sizeof(S);       // elements per 16-byte slot
  constexpr int kSlotsBig = 16 / VEC;       // 16 elements per thread per chunk
  a.vec_logits = slots_aligned<S, VEC>(in.logits, in.logits_row_stride);
  a.vec_old = in.row.has_old && slots_aligned<S, VEC>(in.old_logits, in.old_row_stride);
  a.vec_new = in.row.has_new && slots_aligned<S, VEC>(in.new_logits, in.new_row_stride);
  a.vec_bias = in.class_bias != 0 && slots_aligned<float, VEC>(in.class_bias, 0);
  a.vec_grad = grad != 0 && slots_aligned<S, VEC>(grad, in.row.num_classes);
  const int64_t C = in.row.num_classes;
  const dim3 grid(static_cast<unsigned>(in.num_rows));
  if (C <= 256 * VEC) {  // one slot per thread, up to 256 threads
    const int threads = clamp_threads((C + VEC - 1) / VEC, 32, 256);
    a.chunks = 1;
    auto kernel = kBackward ? softmax_backward_kernel<D, VEC, 1> : softmax_loss_kernel<D, VEC, 1>;
    kernel<<<grid, threads, 0, stream>>>(a);
  } else {  // 16 elements per thread, up to 512 threads; rows past kCachedRowLimit: chunks
    const int threads = C <= kCachedRowLimit ? clamp_threads((C + 15) / 16, 32, 512) : 512;
    a.chunks = static_cast<int>((C + threads * 16 - 1) / (threads * 16));
    auto kernel = kBackward ? softmax_backward_kernel<D, VEC, kSlotsBig> : softmax_loss_kernel<D, VEC, kSlotsBig>;
    kernel<<<grid, threads, 0, stream>>>(a);
  }
  check_cuda(cudaGetLastError(), kBackward ? "launch of softmax_backward_kernel" : "launch of softmax_loss_kernel");
}

void check_inputs(const SoftmaxInputs& in, const char* entry) {
  const SoftmaxRowParams& p = in.row;
  auto fail = [entry](const std::string& what) { throw std::invalid_argument(std::string(entry) + ": " + what); };
  if (in.num_rows < 0 || in.num_rows > 0x7fffffff) fail("num_rows must be in [0, 2**31)");
  if (in.dtype < kFloat32 || in.dtype > kBFloat16) fail("logits dtype must be float32, float16 or bfloat16");
  if (p.num_classes < 1) fail("num_classes must be >= 1");
  if (p.num_old_classes < 1 || p.num_old_classes > p.num_classes) fail("num_old_classes must be in [1, num_classes]");
  if (p.focus < kFocusAll || p.focus > kFocusStudentWrong) fail("unknown focus code");
  if (in.num_rows > 0 && (in.logits == 0 || in.target == 0)) fail("logits and target are required");
  if (in.num_rows > 0 && p.has_old && in.old_logits == 0) fail("old_logits is required when row.has_old");
  if (in.num_rows > 0 && p.has_new && in.new_logits == 0) fail("new_logits is required when row.has_new");
}

SoftmaxKernelArgs kernel_args(const SoftmaxInputs& in, uintptr_t stats, uintptr_t grad) {
  SoftmaxKernelArgs a{};
  a.row = in.row;
  a.logits = reinterpret_cast<const void*>(in.logits);
  a.logits_row_stride = in.logits_row_stride;
  a.old_logits = reinterpret_cast<const void*>(in.old_logits);
  a.old_row_stride = in.old_row_stride;
  a.new_logits = reinterpret_cast<const void*>(in.new_logits);
  a.new_row_stride = in.new_row_stride;
  a.class_bias = reinterpret_cast<const float*>(in.class_bias);
  a.target = reinterpret_cast<const void*>(in.target);
  a.target_stride = in.target_stride;
  a.target_is_int64 = in.target_is_int64;
  a.has_ignore_index = in.has_ignore_index;
  a.ignore_index = in.ignore_index;
  a.stats = reinterpret_cast<float*>(stats);
  a.grad = reinterpret_cast<void*>(grad);
  return a;
}

}  // namespace

void softmax_forward(const SoftmaxForwardArgs& f, const Launch& launch) {
  const SoftmaxInputs& in = f.inputs;
  check_inputs(in, "softmax_forward");
  auto fail = [](const std::string& what) { throw std::invalid_argument("softmax_forward: " + what); };
  if (f.reduction < kReduceNone || f.reduction > kReduceMean) fail("unknown reduction code");
  if (in.num_rows > 0 && f.row_loss == 0) fail("row_loss is required");
  if (in.num_rows > 0 && f.grad != 0 && f.stats == 0) fail("stats is required with grad");
  if (f.reduction == kReduceMean && f.counted_rows == 0) fail("counted_rows is required for the mean");
  if (f.reduction != kReduceNone && f.loss == 0) fail("loss is required for a scalar reduction");

  SoftmaxKernelArgs a = kernel_args(in, f.stats, f.grad);
  a.row_loss = reinterpret_cast<float*>(f.row_loss);
  a.counted_rows = f.reduction == kReduceMean ? reinterpret_cast<const int64_t*>(f.counted_rows) : nullptr;

  cudaStream_t stream = enter_device(launch);
  if (f.reduction == kReduceMean) {
    count_rows_kernel<<<1, 1024, 0, stream>>>(a.target, a.target_stride, a.target_is_int64, in.num_rows,
                                              a.has_ignore_index, a.ignore_index,
                                              reinterpret_cast<int64_t*>(f.counted_rows));
    MPT_CHECK_LAUNCH("count_rows_kernel");
  }
  if (in.num_rows > 0) {
    dispatch_logits_dtype(in.dtype, [&](auto tag) { launch_rows<decltype(tag), false>(a, in, f.grad, stream); });
  }
  if (f.reduction != kReduceNone) {
    launch_finish_sum(in.dtype, a.row_loss, in.num_rows, a.counted_rows, 0.0f, reinterpret_cast<void*>(f.loss),
                      stream);
  }
}

void softmax_backward(const SoftmaxBackwardArgs& b, const Launch& launch) {
  const SoftmaxInputs& in = b.inputs;
  check_inputs(in, "softmax_backward");
  if (in.num_rows == 0) return;
  if (b.stats == 0 || b.upstream == 0 || b.grad == 0) {
    throw std::invalid_argument("softmax_backward: stats, upstream and grad are required");
  }
  SoftmaxKernelArgs a = kernel_args(in, b.stats, b.grad);
  a.upstream = reinterpret_cast<const void*>(b.upstream);
  a.upstream_stride = b.upstream_stride;
  cudaStream_t stream = enter_device(launch);
  dispatch_logits_dtype(in.dtype, [&](auto tag) { launch_rows<decltype(tag), true>(a, in, b.grad, stream); });
}

}  // namespace mpt
