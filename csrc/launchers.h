// What the Python bindings (bindings.cpp, plain C++) hand to the CUDA launchers (*.cu).
//
// No CUDA or torch types cross this boundary: tensors arrive as raw device addresses,
// sizes and strides (in elements), dtypes as DType codes, and the stream as the
// cudaStream_t value that torch.cuda.current_stream(device).cuda_stream reports.
// backends/cuda.py validates everything before an address gets here.
#pragma once

#include <cstdint>

#include "softmax_math.cuh"

namespace mpt {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3, kFloat64 = 4 };
enum Reduction : int { kReduceNone = 0, kReduceSum = 1, kReduceMean = 2 };

struct Launch {
  int device;        // cudaSetDevice(device) first: the static cudart keeps its own current device
  uintptr_t stream;  // cudaStream_t
};

// What the softmax family's forward and backward both read.
struct SoftmaxInputs {
  SoftmaxRowParams row;
  int dtype;  // logits and teachers: kFloat32, kFloat16 or kBFloat16
  int64_t num_rows;
  uintptr_t logits;            // (N, C), unit column stride
  int64_t logits_row_stride;
  uintptr_t old_logits;        // (N, K) or 0 when row.has_old is false
  int64_t old_row_stride;
  uintptr_t new_logits;        // (N, C) or 0 when row.has_new is false
  int64_t new_row_stride;
  uintptr_t class_bias;        // float32 (C,) contiguous, or 0: the new-class bias of `row`
  uintptr_t target;            // (N,) int64 or int32
  int64_t target_stride;
  bool target_is_int64;
  bool has_ignore_index;       // false when ignore_index lies outside int64
  int64_t ignore_index;
};

struct SoftmaxForwardArgs {
  SoftmaxInputs inputs;
  int reduction;
  uintptr_t row_loss;      // float32 (N,): every row's loss, always written
  uintptr_t counted_rows;  // int64 (1,) scratch for "mean", else 0
  uintptr_t loss;          // (): the reduced loss in the logits' dtype ("sum"/"mean"), else 0
  uintptr_t grad;          // (N, C) contiguous in the logits' dtype, or 0: no gradient
  uintptr_t stats;         // float32 (N, kSoftmaxStatFloats) contiguous, with grad (counted rows only)
  int64_t shared_row_bytes;  // with grad: the most shared memory a block may keep its row's chunks in
                             // between the two sweeps; -1: as much as the device allows, 0: none
};

struct SoftmaxBackwardArgs {
  SoftmaxInputs inputs;    // as given to the forward
  uintptr_t stats;         // the forward's saved stats
  uintptr_t upstream;      // the upstream gradient in the logits' dtype: () or (N,)
  int64_t upstream_stride; // 0 for a scalar (or an expanded one)
  uintptr_t grad;          // the forward's gradient: rewritten in the rows that need it
};

// What the multi-label family's forward and backward both read.
struct MultilabelInputs {
  MultilabelParams math;
  int dtype;          // logits
  int target_dtype;   // any DType (bool arrives as kUInt8)
  int64_t num_rows;
  int64_t num_cols;
  uintptr_t logits;   // (N, C), unit column stride
  int64_t logits_row_stride;
  uintptr_t targets;  // (N, C), unit column stride
  int64_t targets_row_stride;
  float grad_scale;   // 1, or 1/(N·C) for "mean"
};

struct MultilabelForwardArgs {
  MultilabelInputs inputs;
  int reduction;
  uintptr_t partials; // float32 (kMultilabelMaxBlocks,) scratch for "sum"/"mean", else 0
  uintptr_t loss;     // (N, C) contiguous for "none", else ()
  uintptr_t grad;     // (N, C) contiguous, or 0: no gradient
};

struct MultilabelBackwardArgs {
  MultilabelInputs inputs;    // as given to the forward
  uintptr_t upstream;         // the upstream gradient in the logits' dtype: () or (N, C)
  int64_t upstream_stride0;   // 0 and 0 for a scalar; any strides for (N, C)
  int64_t upstream_stride1;
  uintptr_t grad;             // the forward's gradient: rewritten where the upstream is not 1
};

// Blocks of the multi-label kernels at most (the "sum"/"mean" partials buffer size).
constexpr int kMultilabelMaxBlocks = 2048;
// The softmax kernels' largest block, and the slots (of 16 bytes of each input) a thread
// holds in registers: a row of at most kMaxRowThreads * kSlotsPerThread slots (RowLayout:
// 4096 classes of fp32, 8192 of fp16/bf16) stays in registers and is read once; a longer
// row is swept twice (statistics, then gradient), its chunks kept in shared memory
// between the sweeps as far as it holds them, the rest read again.
constexpr int kMaxRowThreads = 512;
constexpr int kSlotsPerThread = 2;

// The forward writes the loss and, when grad is given, the gradient for an upstream
// gradient of 1 (and the softmax family's per-row stats). The backward reads the
// upstream gradient on the device and recomputes the gradient, times it, only where it
// is not 1 (recompute_row / recompute_element in loss_math.cuh).
void softmax_forward(const SoftmaxForwardArgs& args, const Launch& launch);
// How softmax_forward runs the rows of `inputs` (one block per row).
struct SoftmaxRowPlan {
  int threads;           // per block
  int chunks;            // of kSlotsPerThread slots per thread; 1: the row stays in registers
  int staged_chunks;     // the first chunks, kept in shared memory between the two sweeps
  int64_t shared_bytes;  // dynamic shared memory per block
};
SoftmaxRowPlan softmax_forward_plan(const SoftmaxInputs& inputs, bool with_grad, int64_t shared_row_bytes,
                                    const Launch& launch);
void softmax_backward(const SoftmaxBackwardArgs& args, const Launch& launch);
void multilabel_forward(const MultilabelForwardArgs& args, const Launch& launch);
void multilabel_backward(const MultilabelBackwardArgs& args, const Launch& launch);
int cuda_runtime_version();  // of the (static) CUDA runtime linked into _C
int cuda_driver_version();   // CUDA version the installed driver supports; 0: no driver

}  // namespace mpt
