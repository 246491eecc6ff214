// Host entry points over the shared math (loss_math.cuh), for tests on CPU buffers.
//
// They run the very functions the kernels run, on float32 CPU arrays, with a row split
// into `lanes` partial states (column j goes to lane (j / slot) % lanes, as a block's
// threads split it into 16-byte slots) merged in a tree, as a block merges its threads'.
#pragma once

#include <cstdint>

#include "loss_math.cuh"

namespace mpt {
namespace host {

void log_sigmoid(const float* x, float* out, int64_t n);
void sigmoid(const float* x, float* out, int64_t n);
float logsumexp(const float* values, int64_t n, int lanes, int slot);
int64_t argmax(const float* values, int64_t n, int lanes, int slot);
void multilabel(const MultilabelParams& params, const float* x, const uint8_t* positive, int64_t n, float* loss,
                float* grad);
// Rows of C (logits, new teacher) and K (old teacher) contiguous floats; class_bias may be
// null (the new-class bias of params). loss: (N,), grad: (N, C) or null.
void softmax_rows(const SoftmaxRowParams& params, int64_t num_rows, const float* logits, const float* old_logits,
                  const float* new_logits, const float* class_bias, const int64_t* target, bool has_ignore_index,
                  int64_t ignore_index, int lanes, int slot, float* loss, float* grad);

}  // namespace host
}  // namespace mpt
