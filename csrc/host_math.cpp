// The shared math run on the host (see host_math.h). Compiled by the host compiler:
// loss_math.cuh is plain C++ there.
#include "host_math.h"

#include <cmath>
#include <stdexcept>
#include <vector>

namespace mpt {
namespace host {
namespace {

void check_lanes(int lanes, int slot) {
  if (lanes < 1 || (lanes & (lanes - 1)) != 0) throw std::invalid_argument("lanes must be a power of two");
  if (slot < 1) throw std::invalid_argument("slot must be >= 1");
}

int lane_of(int64_t j, int lanes, int slot) { return static_cast<int>((j / slot) % lanes); }

// The tree of block_merge: lane t takes lane t + offset, offsets halving.
template <typename T, typename Merge>
T tree_merge(std::vector<T> states, Merge merge) {
  for (size_t offset = states.size() / 2; offset > 0; offset /= 2) {
    for (size_t t = 0; t < offset; ++t) states[t] = merge(states[t], states[t + offset]);
  }
  return states[0];
}

}  // namespace

void log_sigmoid(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = mpt::log_sigmoid(x[i]);
}

void sigmoid(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = mpt::sigmoid(x[i]);
}

float logsumexp(const float* values, int64_t n, int lanes, int slot) {
  check_lanes(lanes, slot);
  std::vector<OnlineLse> states(lanes, lse_empty());
  for (int64_t j = 0; j < n; ++j) lse_add(states[lane_of(j, lanes, slot)], values[j]);
  return lse_value(tree_merge(states, lse_merge));
}

int64_t argmax(const float* values, int64_t n, int lanes, int slot) {
  check_lanes(lanes, slot);
  std::vector<ArgMax> states(lanes, argmax_empty());
  for (int64_t j = 0; j < n; ++j) argmax_add(states[lane_of(j, lanes, slot)], values[j], static_cast<int>(j));
  return tree_merge(states, argmax_merge).index;
}

void multilabel(const MultilabelParams& params, const float* x, const uint8_t* positive, int64_t n, float* loss,
                float* grad) {
  for (int64_t i = 0; i < n; ++i) {
    const LossAndGrad r = multilabel_element(x[i], positive[i] != 0, params);
    loss[i] = r.loss;
    grad[i] = r.grad;
  }
}

void softmax_rows(const SoftmaxRowParams& p, int64_t num_rows, const float* logits, const float* old_logits,
                  const float* new_logits, const float* class_bias, const int64_t* target, bool has_ignore_index,
                  int64_t ignore_index, int lanes, int slot, float* loss, float* grad) {
  check_lanes(lanes, slot);
  const int C = p.num_classes, K = p.num_old_classes;
  if (C < 1 || K < 1 || K > C) throw std::invalid_argument("need 1 <= num_old_classes <= num_classes");
  if ((p.has_old && old_logits == nullptr) || (p.has_new && new_logits == nullptr)) {
    throw std::invalid_argument("a source without its logits");
  }
  for (int64_t i = 0; i < num_rows; ++i) {
    const float* z = logits + i * C;
    const float* r_old = p.has_old ? old_logits + i * K : nullptr;
    const float* r_new = p.has_new ? new_logits + i * C : nullptr;
    float* g = grad != nullptr ? grad + i * C : nullptr;
    auto delta = [&](int j) { return class_bias != nullptr ? class_bias[j] : new_class_delta(p, j); };
    auto old_at = [&](int j) { return r_old != nullptr && j < K ? r_old[j] : 0.0f; };
    auto new_at = [&](int j) { return r_new != nullptr ? r_new[j] : 0.0f; };

    const int64_t y = target[i];
    const int kind = classify_target(y, has_ignore_index, ignore_index, C);
    if (kind != kTargetCounted) {
      loss[i] = kind == kTargetIgnored ? 0.0f : NAN;
      for (int j = 0; g != nullptr && j < C; ++j) g[j] = 0.0f;
      continue;
    }
    std::vector<SoftmaxRowState> states(lanes, row_empty());
    for (int j = 0; j < C; ++j) row_add(states[lane_of(j, lanes, slot)], p, j, y, z[j], delta(j), old_at(j), new_at(j));
    const SoftmaxRowResult result = row_finish(tree_merge(states, row_merge), p, y);
    loss[i] = result.loss;
    for (int j = 0; g != nullptr && j < C; ++j) g[j] = row_gradient(result, p, j, y, z[j], delta(j), old_at(j), new_at(j));
  }
}

}  // namespace host
}  // namespace mpt
