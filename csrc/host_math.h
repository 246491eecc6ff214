// Host entry points over the shared math (loss_math.cuh), for tests on CPU buffers.
//
// They run the very functions the kernels run, on float32 CPU arrays. logsumexp splits
// its values into `lanes` partial states (value j to lane (j / slot) % lanes) merged in a
// tree. The softmax rows are walked as the kernels walk them (RowLayout, softmax_math.cuh):
// `lanes` threads, slots of `slot` columns, chunks of `rounds` slots, the lanes' states
// merged in a tree as a block merges its threads'.
#pragma once

#include <cstdint>

#include "softmax_math.cuh"

namespace mpt {
namespace host {

void log_sigmoid(const float* x, float* out, int64_t n);
void sigmoid(const float* x, float* out, int64_t n);
float logsumexp(const float* values, int64_t n, int lanes, int slot);

// Multi-label elements. The forward writes every loss and the gradient for an upstream
// gradient of 1 (times scale); the backward rewrites grad[i] where upstream[i] != 1.
void multilabel(const MultilabelParams& params, const float* x, const uint8_t* positive, int64_t n, float scale,
                float* loss, float* grad);
void multilabel_backward(const MultilabelParams& params, const float* x, const uint8_t* positive, int64_t n,
                         float scale, const float* upstream, float* grad);

// Softmax-family rows of C (logits, new teacher) and K (old teacher) contiguous floats;
// class_bias may be null (the new-class bias of params). The forward writes loss (N,)
// and, when grad (N, C) is given, the gradient for an upstream gradient of 1 (times
// 1/count of the rows not ignored when `mean`) and the counted rows' stats
// (N, kSoftmaxStatFloats), as the forward kernel does.
void softmax_rows(const SoftmaxRowParams& params, int64_t num_rows, const float* logits, const float* old_logits,
                  const float* new_logits, const float* class_bias, const int64_t* target, bool has_ignore_index,
                  int64_t ignore_index, bool mean, int lanes, int slot, int rounds, float* loss, float* grad,
                  float* stats);
// The backward kernel's decision and recompute on the host: from the forward's stats and
// the same inputs, rewrites grad's rows whose target is counted and whose upstream
// gradient upstream[i * upstream_stride] is not 1 (stride 0: a scalar).
void softmax_rows_backward(const SoftmaxRowParams& params, int64_t num_rows, const float* logits,
                           const float* old_logits, const float* new_logits, const float* class_bias,
                           const int64_t* target, bool has_ignore_index, int64_t ignore_index, const float* stats,
                           const float* upstream, int64_t upstream_stride, int lanes, int slot, int rounds,
                           float* grad);

}  // namespace host
}  // namespace mpt
