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

void multilabel(const MultilabelParams& params, const float* x, const uint8_t* positive, int64_t n, float scale,
                float* loss, float* grad) {
  for (int64_t i = 0; i < n; ++i) {
    const LossAndGrad r = multilabel_element(x[i], positive[i] != 0, params);
    loss[i] = r.loss;
    grad[i] = multilabel_gradient(r, scale, 1.0f);
  }
}

void multilabel_backward(const MultilabelParams& params, const float* x, const uint8_t* positive, int64_t n,
                         float scale, const float* upstream, float* grad) {
  for (int64_t i = 0; i < n; ++i) {
    if (!recompute_element(upstream[i])) continue;
    grad[i] = multilabel_gradient(multilabel_element(x[i], positive[i] != 0, params), scale, upstream[i]);
  }
}

namespace {

void check_rows(const SoftmaxRowParams& p, const float* old_logits, const float* new_logits) {
  if (p.num_classes < 1 || p.num_old_classes < 1 || p.num_old_classes > p.num_classes) {
    throw std::invalid_argument("need 1 <= num_old_classes <= num_classes");
  }
  if ((p.has_old && old_logits == nullptr) || (p.has_new && new_logits == nullptr)) {
    throw std::invalid_argument("a source without its logits");
  }
}

// Row i of the inputs, read as the kernels read it: Δ_j from class_bias or the new-class
// bias, the old teacher only below K, absent sources as 0.
struct HostRow {
  const SoftmaxRowParams& p;
  const float* z;
  const float* r_old;
  const float* r_new;
  const float* class_bias;

  HostRow(const SoftmaxRowParams& p_, int64_t i, const float* logits, const float* old_logits,
          const float* new_logits, const float* class_bias_)
      : p(p_),
        z(logits + i * p_.num_classes),
        r_old(p_.has_old ? old_logits + i * p_.num_old_classes : nullptr),
        r_new(p_.has_new ? new_logits + i * p_.num_classes : nullptr),
        class_bias(class_bias_) {}

  float delta(int j) const { return class_bias != nullptr ? class_bias[j] : new_class_delta(p, j); }
  float old_at(int j) const { return r_old != nullptr && j < p.num_old_classes ? r_old[j] : 0.0f; }
  float new_at(int j) const { return r_new != nullptr ? r_new[j] : 0.0f; }

  // the gradient sweep of the kernels
  void gradient(const SoftmaxRowStats& stats, int64_t y, float upstream, float* g) const {
    for (int j = 0; j < p.num_classes; ++j) {
      g[j] = row_gradient(stats, p, j, y, z[j], delta(j), old_at(j), new_at(j), upstream);
    }
  }
};

}  // namespace

void softmax_rows(const SoftmaxRowParams& p, int64_t num_rows, const float* logits, const float* old_logits,
                  const float* new_logits, const float* class_bias, const int64_t* target, bool has_ignore_index,
                  int64_t ignore_index, bool mean, int lanes, int slot, float* loss, float* grad, float* stats) {
  check_lanes(lanes, slot);
  check_rows(p, old_logits, new_logits);
  if (grad != nullptr && stats == nullptr) throw std::invalid_argument("stats are required with grad");
  const int C = p.num_classes;
  int64_t counted = 0;  // as count_rows_kernel: the rows whose target is not ignore_index
  for (int64_t i = 0; i < num_rows; ++i) counted += !(has_ignore_index && target[i] == ignore_index);
  const float scale = mean ? 1.0f / static_cast<float>(counted) : 1.0f;
  for (int64_t i = 0; i < num_rows; ++i) {
    const HostRow row(p, i, logits, old_logits, new_logits, class_bias);
    float* g = grad != nullptr ? grad + i * C : nullptr;
    const int64_t y = target[i];
    const int kind = classify_target(y, has_ignore_index, ignore_index, C);
    if (kind != kTargetCounted) {
      loss[i] = kind == kTargetIgnored ? 0.0f : NAN;
      for (int j = 0; g != nullptr && j < C; ++j) g[j] = 0.0f;
      continue;
    }
    std::vector<SoftmaxRowState> states(lanes, row_empty());
    for (int j = 0; j < C; ++j) {
      row_add(states[lane_of(j, lanes, slot)], p, j, y, row.z[j], row.delta(j), row.old_at(j), row.new_at(j));
    }
    const SoftmaxRowResult result = row_finish(tree_merge(states, row_merge), p, y, scale);
    loss[i] = result.loss;
    if (g == nullptr) continue;
    store_row_stats(result.stats, stats + i * kSoftmaxStatFloats);
    row.gradient(result.stats, y, 1.0f, g);
  }
}

void softmax_rows_backward(const SoftmaxRowParams& p, int64_t num_rows, const float* logits,
                           const float* old_logits, const float* new_logits, const float* class_bias,
                           const int64_t* target, bool has_ignore_index, int64_t ignore_index, const float* stats,
                           const float* upstream, int64_t upstream_stride, float* grad) {
  check_rows(p, old_logits, new_logits);
  for (int64_t i = 0; i < num_rows; ++i) {
    const float u = upstream[i * upstream_stride];
    const int64_t y = target[i];
    if (!recompute_row(classify_target(y, has_ignore_index, ignore_index, p.num_classes), u)) continue;
    const HostRow row(p, i, logits, old_logits, new_logits, class_bias);
    row.gradient(load_row_stats(stats + i * kSoftmaxStatFloats), y, u, grad + i * p.num_classes);
  }
}

}  // namespace host
}  // namespace mpt
