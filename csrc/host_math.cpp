// The shared math run on the host (see host_math.h). Compiled by the host compiler:
// loss_math.cuh is plain C++ there.
#include "host_math.h"

#include <cmath>
#include <stdexcept>
#include <type_traits>
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
  // each lane folds its values into a base-2 running state one at a time (a chunk of one)
  std::vector<Lse2> states(lanes, lse2_empty());
  for (int64_t j = 0; j < n; ++j) {
    Lse2& s = states[lane_of(j, lanes, slot)];
    float shift = 0.0f;
    lse2_raise(s, values[j], kLog2e, shift);
    s.sum += exp2_against(values[j], kLog2e, shift);
  }
  const Lse2 total = tree_merge(states, [](Lse2 a, const Lse2& b) {
    lse2_merge_into(a, b, kLog2e);
    return a;
  });
  return (lse2_state_shift(total, kLog2e) + log2f(total.sum)) * kLn2;
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

// The softmax kernels' walk over a row, on the host: `threads` lanes, slots of VEC
// columns, chunks of NV slots, the same RowLayout and the same math; the lanes' states
// are merged in a tree as the block merges its threads'.
template <int VEC, int NV>
struct HostRows {
  const SoftmaxRowConsts c;
  const int threads;
  const float* logits;
  const float* old_logits;
  const float* new_logits;
  const float* class_bias;
  const RowLayout layout;
  const int chunks;

  HostRows(const SoftmaxRowParams& p, int threads_, const float* logits_, const float* old_logits_,
           const float* new_logits_, const float* class_bias_)
      : c(p, class_bias_ != nullptr),
        threads(threads_),
        logits(logits_),
        old_logits(old_logits_),
        new_logits(new_logits_),
        class_bias(class_bias_),
        layout(p.num_classes, p.num_old_classes, VEC),
        chunks((layout.rounds(threads_) + NV - 1) / NV) {}

  // Lane t's slots of chunk `chunk` of row i, as the kernels load them.
  void values(int64_t i, int t, int chunk, SlotValues<VEC> (&v)[NV]) const {
    const int C = c.p.num_classes, K = c.p.num_old_classes;
    const float* z = logits + i * C;
    for (int k = 0; k < NV; ++k) {
      const int s = (chunk * NV + k) * threads + t;
      v[k].present = s < layout.slots;
      if (!v[k].present) continue;
      const SlotSpan span = layout.span(s);
      v[k].span = span;
      for (int e = 0; e < VEC; ++e) {
        const int j = span.col0 + e;
        const bool in = span.has(j);
        v[k].z[e] = in ? z[j] : -kInf;
        v[k].delta[e] = in && class_bias != nullptr ? class_bias[j] : 0.0f;
        v[k].r_old[e] = in && c.p.has_old && span.old_segment ? old_logits[i * K + j] : -kInf;
        v[k].r_new[e] = in && c.p.has_new ? new_logits[i * C + j] : -kInf;
      }
    }
  }

  SoftmaxRowResult forward(int64_t i, int y, float scale) const {
    std::vector<SoftmaxThreadState> states(threads, thread_state_empty());
    for (int t = 0; t < threads; ++t) {
      for (int chunk = 0; chunk < chunks; ++chunk) {
        SlotValues<VEC> v[NV];
        values(i, t, chunk, v);
        chunk_statistics<VEC, NV>(states[t], c, [&v](int k) { return v[k]; }, y);
      }
    }
    const SoftmaxThreadState merged =
        tree_merge(states, [this](const SoftmaxThreadState& a, const SoftmaxThreadState& b) {
          return thread_state_merge(a, b, c);
        });
    const int C = c.p.num_classes, K = c.p.num_old_classes;
    const TargetValues at_y = target_values<VEC>(
        c.p, class_bias, y, [&](int j) { return logits[i * C + j]; }, [&](int j) { return old_logits[i * K + j]; },
        [&](int j) { return new_logits[i * C + j]; });
    return row_finish(merged, c, y, at_y, scale);
  }

  void gradient(int64_t i, int y, const SoftmaxRowStats& stats, float upstream, float* g_row) const {
    for (int t = 0; t < threads; ++t) {
      for (int chunk = chunks - 1; chunk >= 0; --chunk) {
        SlotValues<VEC> v[NV];
        values(i, t, chunk, v);
        for (int k = 0; k < NV; ++k) {
          if (!v[k].present) break;
          float g[VEC];
          slot_gradient(c, stats, upstream, y, v[k], g);
          for (int e = 0; e < VEC; ++e) {
            if (v[k].span.has(v[k].span.col0 + e)) g_row[v[k].span.col0 + e] = g[e];
          }
        }
      }
    }
  }
};

// Calls f(HostRows<VEC, NV>) for the runtime slot width and chunk length.
template <typename F>
void with_host_rows(int slot, int rounds, F&& f) {
  auto by_rounds = [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    if (rounds == 1) {
      f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 1>{});
    } else if (rounds == 2) {
      f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 2>{});
    } else {
      throw std::invalid_argument("rounds must be 1 or 2");
    }
  };
  switch (slot) {
    case 1: by_rounds(std::integral_constant<int, 1>{}); break;
    case 2: by_rounds(std::integral_constant<int, 2>{}); break;
    case 4: by_rounds(std::integral_constant<int, 4>{}); break;
    case 8: by_rounds(std::integral_constant<int, 8>{}); break;
    default: throw std::invalid_argument("slot must be 1, 2, 4 or 8");
  }
}

}  // namespace

void softmax_rows(const SoftmaxRowParams& p, int64_t num_rows, const float* logits, const float* old_logits,
                  const float* new_logits, const float* class_bias, const int64_t* target, bool has_ignore_index,
                  int64_t ignore_index, bool mean, int lanes, int slot, int rounds, float* loss, float* grad,
                  float* stats) {
  check_lanes(lanes, slot);
  check_rows(p, old_logits, new_logits);
  if (grad != nullptr && stats == nullptr) throw std::invalid_argument("stats are required with grad");
  const int C = p.num_classes;
  int64_t counted = 0;  // as count_rows_kernel: the rows whose target is not ignore_index
  for (int64_t i = 0; i < num_rows; ++i) counted += !(has_ignore_index && target[i] == ignore_index);
  const float scale = mean ? 1.0f / static_cast<float>(counted) : 1.0f;
  with_host_rows(slot, rounds, [&](auto vec, auto nv) {
    const HostRows<decltype(vec)::value, decltype(nv)::value> rows(p, lanes, logits, old_logits, new_logits,
                                                                   class_bias);
    for (int64_t i = 0; i < num_rows; ++i) {
      float* g = grad != nullptr ? grad + i * C : nullptr;
      const int64_t y = target[i];
      const int kind = classify_target(y, has_ignore_index, ignore_index, C);
      if (kind != kTargetCounted) {
        loss[i] = kind == kTargetIgnored ? 0.0f : NAN;
        for (int j = 0; g != nullptr && j < C; ++j) g[j] = 0.0f;
        continue;
      }
      const SoftmaxRowResult result = rows.forward(i, static_cast<int>(y), grad != nullptr ? scale : 1.0f);
      loss[i] = result.loss;
      if (g == nullptr) continue;
      store_row_stats(result.stats, stats + i * kSoftmaxStatFloats);
      rows.gradient(i, static_cast<int>(y), result.stats, 1.0f, g);
    }
  });
}

void softmax_rows_backward(const SoftmaxRowParams& p, int64_t num_rows, const float* logits,
                           const float* old_logits, const float* new_logits, const float* class_bias,
                           const int64_t* target, bool has_ignore_index, int64_t ignore_index, const float* stats,
                           const float* upstream, int64_t upstream_stride, int lanes, int slot, int rounds,
                           float* grad) {
  check_lanes(lanes, slot);
  check_rows(p, old_logits, new_logits);
  with_host_rows(slot, rounds, [&](auto vec, auto nv) {
    const HostRows<decltype(vec)::value, decltype(nv)::value> rows(p, lanes, logits, old_logits, new_logits,
                                                                   class_bias);
    for (int64_t i = 0; i < num_rows; ++i) {
      const float u = upstream[i * upstream_stride];
      const int64_t y = target[i];
      if (!recompute_row(classify_target(y, has_ignore_index, ignore_index, p.num_classes), u)) continue;
      rows.gradient(i, static_cast<int>(y), load_row_stats(stats + i * kSoftmaxStatFloats), u,
                    grad + i * p.num_classes);
    }
  });
}

}  // namespace host
}  // namespace mpt
