// What the Python bindings (bindings.cpp, plain C++) hand to the CUDA launchers (*.cu).
//
// No CUDA or torch types cross this boundary: tensors arrive as raw device addresses,
// sizes and strides (in elements), dtypes as DType codes, and the stream as the
// cudaStream_t value that torch.cuda.current_stream(device).cuda_stream reports.
// backends/cuda.py validates everything before an address gets here.
#pragma once

#include <cstdint>

#include "loss_math.cuh"

namespace mpt {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3, kFloat64 = 4 };
enum Reduction : int { kReduceNone = 0, kReduceSum = 1, kReduceMean = 2 };
enum UpstreamMode : int { kUpstreamScalar = 0, kUpstreamPerRow = 1, kUpstreamPerElement = 2 };

struct Launch {
  int device;        // cudaSetDevice(device) first: the static cudart keeps its own current device
  uintptr_t stream;  // cudaStream_t
};

struct SoftmaxForwardArgs {
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
  int reduction;
  uintptr_t row_loss;          // float32 (N,): every row's loss, always written
  uintptr_t counted_rows;      // int64 (1,) scratch for "mean", else 0
  uintptr_t loss;              // (): the reduced loss in the logits' dtype ("sum"/"mean"), else 0
  uintptr_t grad;              // (N, C) contiguous in the logits' dtype, or 0: no gradient
};

struct MultilabelForwardArgs {
  MultilabelParams math;
  int dtype;          // logits
  int target_dtype;   // any DType (bool arrives as kUInt8)
  int64_t num_rows;
  int64_t num_cols;
  uintptr_t logits;   // (N, C), unit column stride
  int64_t logits_row_stride;
  uintptr_t targets;  // (N, C), unit column stride
  int64_t targets_row_stride;
  int reduction;
  float grad_scale;   // 1, or 1/(N·C) for "mean"
  uintptr_t partials; // float32 (kMultilabelMaxBlocks,) scratch for "sum"/"mean", else 0
  uintptr_t loss;     // (N, C) contiguous for "none", else ()
  uintptr_t grad;     // (N, C) contiguous, or 0: no gradient
};

struct ScaleGradientArgs {
  int dtype;
  int64_t num_rows;
  int64_t num_cols;
  uintptr_t grad;       // (N, C) contiguous: scaled in place
  uintptr_t upstream;   // the upstream gradient, same dtype
  int mode;             // UpstreamMode
  int64_t upstream_stride0;
  int64_t upstream_stride1;
  // Softmax family: rows whose target is ignored or out of range keep their zero
  // gradient (also for a NaN upstream gradient, as in the reference). 0: every row scales.
  uintptr_t target;
  int64_t target_stride;
  bool target_is_int64;
  bool has_ignore_index;
  int64_t ignore_index;
};

// Blocks of the multi-label kernel at most (its "sum"/"mean" partials buffer size).
constexpr int kMultilabelMaxBlocks = 2048;
// Softmax rows up to this many classes stay in registers (read once); longer rows are
// read twice (statistics sweep, then gradient sweep).
constexpr int kCachedRowLimit = 8192;

void softmax_forward(const SoftmaxForwardArgs& args, const Launch& launch);
void multilabel_forward(const MultilabelForwardArgs& args, const Launch& launch);
void scale_gradient(const ScaleGradientArgs& args, const Launch& launch);
int cuda_runtime_version();  // of the (static) CUDA runtime linked into _C
int cuda_driver_version();   // CUDA version the installed driver supports; 0: no driver

}  // namespace mpt
