// The softmax family (spec §1-3: margin-calibrated CE, focal distillation, MPT): a
// forward and a backward kernel, one block per row.
//
// The math is softmax_math.cuh's: the row is cut into 16-byte slots per segment
// (RowLayout), dealt out to the threads round by round; each thread folds a chunk of
// kSlotsPerThread slots at a time into its own SoftmaxThreadState (the chunk's maxima
// first, one rescale, then one base-2 exponential per element and stream), and the block
// merges the states once, in a fixed tree. A row of at most blockDim.x * kSlotsPerThread
// slots is one chunk: its raw 16-byte slots stay in registers, so the forward with
// gradient reads every input once and writes the gradient once (only the class_bias
// vector, shared by every row, is read again, from cache). A longer row is swept twice,
// statistics then gradient: the forward keeps its first chunks' raw slots in shared
// memory between the sweeps, as many as the device gives a block (StagedChunks; on
// sm_90, 4 chunks of 48 KiB: a bf16 row of 32768 classes with both teachers, or 14 of
// 16 KiB without them), and reads the rest again, the gradient sweep going last chunk
// first (the likeliest still in L2).
//
// The forward writes the gradient for an upstream gradient of 1, with "mean"'s 1/count
// folded in (count_rows_kernel counts the rows on the device first), and saves each
// counted row's SoftmaxRowStats. The backward reads the upstream gradient on the device:
// a row whose upstream gradient is 1 (or that is ignored) is left as the forward wrote
// it; any other row is recomputed from the inputs and its stats with the upstream
// gradient multiplied into the coefficients in float32, and rounded once. Both kernels
// run the same gradient sweep. Per-row losses go to a float32 buffer, reduced in a fixed
// order.
#include <algorithm>
#include <atomic>
#include <type_traits>

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
  bool vec_logits, vec_old, vec_new, vec_bias, vec_grad;  // 16-byte accesses allowed
  int staged_chunks;  // forward with gradient: the row's first chunks kept in shared memory (StagedChunks)
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

// ---------------------------------------------------------------------------- slots
// One 16-byte slot of an input row, as loaded: kept in registers while the row is.
using RawSlot = uint4;

template <typename D>
constexpr int kVec = 16 / static_cast<int>(sizeof(typename D::storage));

__device__ __forceinline__ uint32_t word(const RawSlot& raw, int w) {
  return w == 0 ? raw.x : (w == 1 ? raw.y : (w == 2 ? raw.z : raw.w));  // w: a constant after unrolling
}

__device__ __forceinline__ void set_word(RawSlot& raw, int w, uint32_t value) {
  if (w == 0) raw.x = value;
  if (w == 1) raw.y = value;
  if (w == 2) raw.z = value;
  if (w == 3) raw.w = value;
}

// The 32-bit word of two 16-bit values (element 2w low, 2w + 1 high), or of one float32.
template <typename D>
__device__ __forceinline__ uint32_t word_of(typename D::storage lo, typename D::storage hi) {
  if constexpr (sizeof(typename D::storage) == 4) {
    return __float_as_uint(lo);
  } else {
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

// The slot's VEC values as float32, from the 32-bit words.
template <typename D>
__device__ __forceinline__ void unpack(const RawSlot& raw, float (&out)[kVec<D>]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t bits = word(raw, w);
    if constexpr (std::is_same<D, Float32>::value) {
      out[w] = __uint_as_float(bits);
    } else if constexpr (std::is_same<D, BFloat16>::value) {
      out[2 * w] = __uint_as_float(bits << 16);
      out[2 * w + 1] = __uint_as_float(bits & 0xffff0000u);
    } else {
      __half2 h;
      memcpy(&h, &bits, sizeof(bits));
      const float2 f = __half22float2(h);
      out[2 * w] = f.x;
      out[2 * w + 1] = f.y;
    }
  }
}

// The slot's columns of `row`; masked columns (outside the span) read as -inf.
template <typename D>
__device__ __forceinline__ RawSlot load_raw(const typename D::storage* row, const SlotSpan& span, bool aligned) {
  using S = typename D::storage;
  constexpr int VEC = kVec<D>;
  constexpr int PER_WORD = VEC / 4;
  if (aligned && span.full(VEC)) return *reinterpret_cast<const RawSlot*>(row + span.col0);
  const S masked = D::from_float(-kInf);
  RawSlot raw;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int j = span.col0 + w * PER_WORD;
    const S lo = span.has(j) ? row[j] : masked;
    const S hi = PER_WORD == 2 && span.has(j + 1) ? row[j + PER_WORD - 1] : masked;
    set_word(raw, w, word_of<D>(lo, hi));
  }
  return raw;
}

// ---------------------------------------------------------------------------- one row
// The input streams of a row: the logits and, where present, the two teachers.
enum Stream : int { kStreamLogits = 0, kStreamOld = 1, kStreamNew = 2 };

template <typename D>
struct RowPointers {
  using S = typename D::storage;
  const S* z;
  const S* old;
  const S* neu;
  S* grad;

  __device__ RowPointers(const SoftmaxKernelArgs& a, int64_t row)
      : z(static_cast<const S*>(a.logits) + row * a.logits_row_stride),
        old(a.row.has_old ? static_cast<const S*>(a.old_logits) + row * a.old_row_stride : nullptr),
        neu(a.row.has_new ? static_cast<const S*>(a.new_logits) + row * a.new_row_stride : nullptr),
        grad(a.grad != nullptr ? static_cast<S*>(a.grad) + row * a.row.num_classes : nullptr) {}

  __device__ __forceinline__ const S* of(int stream) const {
    return stream == kStreamLogits ? z : (stream == kStreamOld ? old : neu);  // a constant after unrolling
  }
};

__device__ __forceinline__ bool stream_aligned(const SoftmaxKernelArgs& a, int stream) {
  return stream == kStreamLogits ? a.vec_logits : (stream == kStreamOld ? a.vec_old : a.vec_new);
}

// The streams of a row that the kernels read: the logits, then the old and the new
// teacher where present.
__host__ __device__ __forceinline__ int streams_read(const SoftmaxRowParams& p) { return 1 + p.has_old + p.has_new; }

// Shared memory that holds a streamed row's first `chunks` chunks between the forward's
// sweeps, so that they are read from memory once. One raw slot per (chunk, slot of the
// chunk, stream present, thread), the threads innermost: a warp's 16-byte accesses are
// adjacent. Each thread reads back only what it stored, so no barrier orders them.
template <int NV>
struct StagedChunks {
  RawSlot* base;
  int chunks;   // 0: none (the backward, and rows in registers)
  int streams;  // streams_read

  __device__ StagedChunks(RawSlot* base_, int chunks_, const SoftmaxRowParams& p)
      : base(base_), chunks(chunks_), streams(streams_read(p)) {}

  __device__ __forceinline__ RawSlot& at(int chunk, int k, int stream) const {
    const int position = stream == kStreamNew ? streams - 1 : stream;  // the new teacher is last
    return base[((chunk * NV + k) * streams + position) * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)];
  }
};

// The raw slots of this thread's chunk: slot (chunk·NV + k)·blockDim.x + threadIdx.x.
template <typename D, int NV>
struct ChunkSlots {
  RawSlot z[NV];
  RawSlot r_old[NV];
  RawSlot r_new[NV];

  __device__ __forceinline__ static int slot(int chunk, int k) {
    return (chunk * NV + k) * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
  }

  // f(stream, k, span, raw slot) for each raw slot of the chunk that this thread holds
  // (the old teacher's on old slots only): the walk of load, stage and unstage.
  template <typename F>
  __device__ __forceinline__ void each_slot(const SoftmaxRowParams& p, const RowLayout& layout, int chunk, F&& f) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int s = slot(chunk, k);
      if (s >= layout.slots) break;
      const SlotSpan span = layout.span(s);
      f(kStreamLogits, k, span, z[k]);
      if (p.has_old && span.old_segment) f(kStreamOld, k, span, r_old[k]);
      if (p.has_new) f(kStreamNew, k, span, r_new[k]);
    }
  }

  // from memory
  __device__ __forceinline__ void load(const SoftmaxKernelArgs& a, const RowLayout& layout, const RowPointers<D>& row,
                                       int chunk) {
    each_slot(a.row, layout, chunk, [&](int stream, int, const SlotSpan& span, RawSlot& raw) {
      raw = load_raw<D>(row.of(stream), span, stream_aligned(a, stream));
    });
  }

  // to and from the shared memory of StagedChunks
  __device__ __forceinline__ void stage(const SoftmaxRowParams& p, const RowLayout& layout,
                                        const StagedChunks<NV>& staged, int chunk) {
    each_slot(p, layout, chunk,
              [&](int stream, int k, const SlotSpan&, RawSlot& raw) { staged.at(chunk, k, stream) = raw; });
  }

  __device__ __forceinline__ void unstage(const SoftmaxRowParams& p, const RowLayout& layout,
                                          const StagedChunks<NV>& staged, int chunk) {
    each_slot(p, layout, chunk,
              [&](int stream, int k, const SlotSpan&, RawSlot& raw) { raw = staged.at(chunk, k, stream); });
  }

  // Slot k as float32, for the math.
  __device__ __forceinline__ SlotValues<kVec<D>> values(const SoftmaxKernelArgs& a, const RowLayout& layout, int chunk,
                                                        int k) const {
    SlotValues<kVec<D>> v;
    const int s = slot(chunk, k);
    v.present = s < layout.slots;
    if (!v.present) return v;
    v.span = layout.span(s);
    unpack<D>(z[k], v.z);
    if (a.row.has_old && v.span.old_segment) unpack<D>(r_old[k], v.r_old);
    if (a.row.has_new) unpack<D>(r_new[k], v.r_new);
    if (a.class_bias != nullptr) load_slot<Float32, kVec<D>>(a.class_bias, v.span.col0, v.span.lo, v.span.hi, a.vec_bias, v.delta);
    return v;
  }
};

// The gradient sweep, shared by the forward (upstream 1; a one-chunk row from the
// registers, the staged chunks of a longer one from shared memory) and the backward (the
// row's upstream gradient, reading the row): every column's gradient, rounded once into
// the logits' dtype. Last chunk first: of the chunks read again, the likeliest in L2.
template <typename D, int NV>
__device__ __forceinline__ void gradient_sweep(const SoftmaxKernelArgs& a, const SoftmaxRowConsts& c,
                                               const RowLayout& layout, const RowPointers<D>& row, int chunks,
                                               bool in_registers, const StagedChunks<NV>& staged,
                                               ChunkSlots<D, NV>& slots, int y, const SoftmaxRowStats& stats,
                                               float upstream) {
  #pragma unroll 1
  for (int chunk = chunks - 1; chunk >= 0; --chunk) {
    if (chunk < staged.chunks) {
      slots.unstage(a.row, layout, staged, chunk);
    } else if (!in_registers) {
      slots.load(a, layout, row, chunk);
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const SlotValues<kVec<D>> v = slots.values(a, layout, chunk, k);
      if (!v.present) break;
      float g[kVec<D>];
      slot_gradient(c, stats, upstream, y, v, g);
      store_slot<D, kVec<D>>(row.grad, v.span.col0, v.span.lo, v.span.hi, a.vec_grad, g);
    }
  }
}

struct StateMerge {
  SoftmaxRowConsts c;
  __device__ SoftmaxThreadState operator()(const SoftmaxThreadState& a, const SoftmaxThreadState& b) const {
    return thread_state_merge(a, b, c);
  }
};

// The chunks of NV rounds of `threads` slots that cover a row.
__host__ __device__ __forceinline__ int chunk_count(const RowLayout& layout, int threads, int nv) {
  return (layout.rounds(threads) + nv - 1) / nv;
}

__device__ __forceinline__ int row_chunks(const RowLayout& layout, int nv) {
  return chunk_count(layout, static_cast<int>(blockDim.x), nv);
}

template <typename D, int NV>
__global__ void __launch_bounds__(kMaxRowThreads) softmax_loss_kernel(const SoftmaxKernelArgs a) {
  const SoftmaxRowParams& p = a.row;
  const int C = p.num_classes;
  const int64_t row = blockIdx.x;
  const RowPointers<D> io(a, row);

  // An ignored row (and an out-of-range target) gets zero gradient, written all the same.
  const int64_t target = read_target(a.target, row * a.target_stride, a.target_is_int64);
  const int target_kind = classify_target(target, a.has_ignore_index, a.ignore_index, C);
  if (target_kind != kTargetCounted) {
    if (threadIdx.x == 0) a.row_loss[row] = target_kind == kTargetIgnored ? 0.0f : NAN;
    if (io.grad != nullptr) {
      const float zeros[kVec<D>] = {};
      for (int col0 = threadIdx.x * kVec<D>; col0 < C; col0 += blockDim.x * kVec<D>) {
        store_slot<D, kVec<D>>(io.grad, col0, C, a.vec_grad, zeros);
      }
    }
    return;
  }
  const int y = static_cast<int>(target);

  const SoftmaxRowConsts c(p, a.class_bias != nullptr);
  const RowLayout layout(C, p.num_old_classes, kVec<D>);
  const int chunks = row_chunks(layout, NV);

  // Sweep 1: the row's statistics; the first chunks are kept in shared memory.
  MPT_DYNAMIC_SHARED(RawSlot, staged_slots);
  const StagedChunks<NV> staged(staged_slots, a.staged_chunks, p);
  ChunkSlots<D, NV> slots;
  SoftmaxThreadState state = thread_state_empty();
  #pragma unroll 1
  for (int chunk = 0; chunk < chunks; ++chunk) {
    slots.load(a, layout, io, chunk);
    if (chunk < staged.chunks) slots.stage(p, layout, staged, chunk);
    chunk_statistics<kVec<D>, NV>(state, c, [&](int k) { return slots.values(a, layout, chunk, k); }, y);
  }
  state = block_merge(state, StateMerge{c}, thread_state_empty());

  const bool with_grad = io.grad != nullptr;
  const float scale = with_grad && a.counted_rows != nullptr ? 1.0f / static_cast<float>(*a.counted_rows) : 1.0f;
  const SoftmaxRowResult result = row_finish(
      state, c, y,
      target_values<kVec<D>>(p, a.class_bias, y, [&](int j) { return D::to_float(io.z[j]); },
                             [&](int j) { return D::to_float(io.old[j]); }, [&](int j) { return D::to_float(io.neu[j]); }),
      scale);
  if (threadIdx.x == 0) {
    a.row_loss[row] = result.loss;
    if (with_grad) store_row_stats(result.stats, a.stats + row * kSoftmaxStatFloats);
  }
  if (!with_grad) return;

  // Sweep 2: the gradient for an upstream gradient of 1, from the registers (one chunk),
  // shared memory (the staged chunks) or reading the row again.
  gradient_sweep<D, NV>(a, c, layout, io, chunks, chunks == 1, staged, slots, y, result.stats, 1.0f);
}

// Rewrites the gradient of the rows that recompute_row selects (counted, upstream != 1)
// from the inputs and the forward's stats; every other row keeps what the forward wrote.
template <typename D, int NV>
__global__ void __launch_bounds__(kMaxRowThreads) softmax_backward_kernel(const SoftmaxKernelArgs a) {
  using S = typename D::storage;
  const int64_t row = blockIdx.x;
  const float upstream = D::to_float(static_cast<const S*>(a.upstream)[row * a.upstream_stride]);
  const int64_t target = read_target(a.target, row * a.target_stride, a.target_is_int64);
  if (!recompute_row(classify_target(target, a.has_ignore_index, a.ignore_index, a.row.num_classes), upstream)) {
    return;
  }
  const SoftmaxRowConsts c(a.row, a.class_bias != nullptr);
  const RowLayout layout(a.row.num_classes, a.row.num_old_classes, kVec<D>);
  ChunkSlots<D, NV> slots;
  gradient_sweep<D, NV>(a, c, layout, RowPointers<D>(a, row), row_chunks(layout, NV), false,
                        StagedChunks<NV>(nullptr, 0, a.row), slots, static_cast<int>(target),
                        load_row_stats(a.stats + row * kSoftmaxStatFloats), upstream);
}

int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Threads per row: enough for the row to be one chunk (in registers) up to
// kMaxRowThreads; a longer row is streamed by kStreamThreads.
constexpr int kStreamThreads = 512;

int row_threads(const RowLayout& layout) {
  const int64_t wanted = (static_cast<int64_t>(layout.slots) + kSlotsPerThread - 1) / kSlotsPerThread;
  if (wanted > kMaxRowThreads) return kStreamThreads;
  const int p = next_power_of_two(wanted);
  return p < 32 ? 32 : p;
}

// How the rows of a launch run (SoftmaxRowPlan); `stage`: the forward with gradient,
// which keeps what it can of a streamed row in shared memory, at most `shared_row_bytes`
// (-1: the device's limit) and all of the row's chunks at most.
template <typename D>
SoftmaxRowPlan plan_rows(const SoftmaxInputs& in, bool stage, int64_t shared_row_bytes, int device) {
  const RowLayout layout(in.row.num_classes, in.row.num_old_classes, kVec<D>);
  SoftmaxRowPlan plan{};
  plan.threads = row_threads(layout);
  plan.chunks = chunk_count(layout, plan.threads, kSlotsPerThread);
  if (stage && shared_row_bytes != 0 && plan.chunks > 1) {
    static std::atomic<int> granted[16];  // per device: see dynamic_shared_limit
    int64_t limit = dynamic_shared_limit(softmax_loss_kernel<D, kSlotsPerThread>, device, granted);
    if (shared_row_bytes > 0) limit = std::min(limit, shared_row_bytes);
    const int64_t chunk_bytes =
        static_cast<int64_t>(kSlotsPerThread) * plan.threads * streams_read(in.row) * sizeof(RawSlot);
    plan.staged_chunks = static_cast<int>(std::min<int64_t>(plan.chunks, limit / chunk_bytes));
    plan.shared_bytes = plan.staged_chunks * chunk_bytes;
  }
  return plan;
}

// One block per row; the backward runs in the forward's shape.
template <typename D, bool kBackward>
void launch_rows(SoftmaxKernelArgs a, const SoftmaxInputs& in, uintptr_t grad, int64_t shared_row_bytes, int device,
                 cudaStream_t stream) {
  using S = typename D::storage;
  constexpr int VEC = kVec<D>;
  a.vec_logits = slots_aligned<S, VEC>(in.logits, in.logits_row_stride);
  a.vec_old = in.row.has_old && slots_aligned<S, VEC>(in.old_logits, in.old_row_stride);
  a.vec_new = in.row.has_new && slots_aligned<S, VEC>(in.new_logits, in.new_row_stride);
  a.vec_bias = in.class_bias != 0 && slots_aligned<float, VEC>(in.class_bias, 0);
  a.vec_grad = grad != 0 && slots_aligned<S, VEC>(grad, in.row.num_classes);
  const SoftmaxRowPlan plan = plan_rows<D>(in, !kBackward && grad != 0, shared_row_bytes, device);
  a.staged_chunks = plan.staged_chunks;
  const dim3 grid(static_cast<unsigned>(in.num_rows));
  auto kernel = kBackward ? softmax_backward_kernel<D, kSlotsPerThread> : softmax_loss_kernel<D, kSlotsPerThread>;
  MPT_LAUNCH_SHARED(kernel, grid, plan.threads, static_cast<size_t>(plan.shared_bytes), stream)(a);
  check_cuda(cudaGetLastError(), kBackward ? "launch of softmax_backward_kernel" : "launch of softmax_loss_kernel");
}

void check_shared_row_bytes(int64_t bytes, const char* entry) {
  if (bytes < -1) {
    throw std::invalid_argument(std::string(entry) + ": shared_row_bytes must be -1 (the device's limit) or >= 0");
  }
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
  check_shared_row_bytes(f.shared_row_bytes, "softmax_forward");

  SoftmaxKernelArgs a = kernel_args(in, f.stats, f.grad);
  a.row_loss = reinterpret_cast<float*>(f.row_loss);
  a.counted_rows = f.reduction == kReduceMean ? reinterpret_cast<const int64_t*>(f.counted_rows) : nullptr;

  cudaStream_t stream = enter_device(launch);
  if (f.reduction == kReduceMean) {
    MPT_LAUNCH(count_rows_kernel, 1, 1024, stream)(a.target, a.target_stride, a.target_is_int64, in.num_rows,
                                                   a.has_ignore_index, a.ignore_index,
                                                   reinterpret_cast<int64_t*>(f.counted_rows));
    MPT_CHECK_LAUNCH("count_rows_kernel");
  }
  if (in.num_rows > 0) {
    dispatch_logits_dtype(in.dtype, [&](auto tag) {
      launch_rows<decltype(tag), false>(a, in, f.grad, f.shared_row_bytes, launch.device, stream);
    });
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
  dispatch_logits_dtype(in.dtype, [&](auto tag) {
    launch_rows<decltype(tag), true>(a, in, b.grad, 0, launch.device, stream);
  });
}

SoftmaxRowPlan softmax_forward_plan(const SoftmaxInputs& inputs, bool with_grad, int64_t shared_row_bytes,
                                    const Launch& launch) {
  check_inputs(inputs, "softmax_forward_plan");
  check_shared_row_bytes(shared_row_bytes, "softmax_forward_plan");
  enter_device(launch);
  SoftmaxRowPlan plan{};
  dispatch_logits_dtype(inputs.dtype, [&](auto tag) {
    plan = plan_rows<decltype(tag)>(inputs, with_grad, shared_row_bytes, launch.device);
  });
  return plan;
}

}  // namespace mpt
