// The per-element and per-row math of every loss (LOSSES.md), written once.
//
// Every function here is plain C++ marked __host__ __device__: the CUDA kernels
// (softmax_loss.cu, multilabel_loss.cu) call them on the GPU, and host_math.cpp calls
// the very same functions on CPU buffers so that tests/test_cuda_host_math.py can check
// them against the reference without a GPU. Nothing here touches memory: callers load
// the values, accumulate them into a row state, merge states, and ask for the gradient
// (the one exception: a row's saved statistics to and from a float buffer).
//
// The gradient of an element is one function (row_gradient, multilabel_gradient) that
// takes the upstream gradient: the forward calls it with 1, and the backward calls it
// again with the upstream gradient where that is not 1, so the gradient is rounded into
// the logits' dtype once, never rescaled after rounding.
//
// Everything is float32 (the kernels accumulate in float32 whatever the logits' dtype).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MPT_HD __host__ __device__ __forceinline__
#else
#define MPT_HD inline
#endif

namespace mpt {

constexpr float kInf = INFINITY;
constexpr int kNoIndex = 0x7fffffff;  // the index of an empty argmax: loses every tie

MPT_HD bool is_nan(float x) { return x != x; }

// max that keeps a NaN (fmaxf would drop it, and a NaN logit must give a NaN loss)
MPT_HD float nan_max(float a, float b) { return (a > b || is_nan(a)) ? a : b; }

// --------------------------------------------------------------------------- fast primitives
// On the GPU each is one MUFU instruction, the bare approximation (relative error about
// 2^-22, subnormal results flushed to zero) without the range and subnormal handling that
// expf and an IEEE division wrap around it: in the elementwise kernels that wrapping was
// most of the instructions per element. On the host they are the exact libm operations.
// The Triton kernels use the same instructions (backends/triton_fastmath.py).
constexpr float kLog2e = 1.4426950408889634f;

MPT_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

MPT_HD float fast_reciprocal(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

// --------------------------------------------------------------------------- sigmoid forms
// log(1 + e) for e in [0, 1], to a few float32 ulps relative, also for tiny e: 2 atanh(u)
// with u = e / (2 + e) in [0, 1/3] and the odd series of atanh to u^13 (its remainder is
// under 2^-24 of the sum there). No logarithm: the hardware lg2's error is absolute (about
// 2^-22), a large relative error in log1p(e) for a small e (an H200 run found a float32
// SPLC gradient 6e-5 off that way in the Triton kernel, which uses this same series).
MPT_HD float log1p_of_unit(float e) {
  const float u = e * fast_reciprocal(2.0f + e);
  const float u2 = u * u;
  float series = (1.0f / 13.0f) * u2 + (1.0f / 11.0f);
  series = series * u2 + (1.0f / 9.0f);
  series = series * u2 + (1.0f / 7.0f);
  series = series * u2 + (1.0f / 5.0f);
  series = series * u2 + (1.0f / 3.0f);
  series = series * u2 + 1.0f;
  return 2.0f * u * series;
}

// σ(s), 1 - σ(s) (as σ(-s), not 1 - σ(s)), log σ(s) and log(1 - σ(s)) from one
// exponential and two reciprocals: log σ(|s|) = -log1p(exp(-|s|)) and log σ(-|s|) =
// log σ(|s|) - |s|, finite for every finite s (never log(σ(s)), which is -inf once σ(s)
// underflows); a NaN s gives NaN.
struct SigmoidForms {
  float p;
  float one_minus_p;
  float log_p;
  float log_one_minus_p;
};

MPT_HD SigmoidForms sigmoid_forms(float s) {
  const float e = fast_exp2(fabsf(s) * -kLog2e);  // exp(-|s|), in [0, 1]
  const float sigmoid_of_abs = fast_reciprocal(1.0f + e);
  const float sigmoid_of_minus_abs = e * sigmoid_of_abs;
  const float log_sigmoid_of_abs = -log1p_of_unit(e);
  const float log_sigmoid_of_minus_abs = log_sigmoid_of_abs - fabsf(s);
  const bool nonnegative = s >= 0.0f;  // which of each pair is p's and which 1 - p's
  return {nonnegative ? sigmoid_of_abs : sigmoid_of_minus_abs,
          nonnegative ? sigmoid_of_minus_abs : sigmoid_of_abs,
          nonnegative ? log_sigmoid_of_abs : log_sigmoid_of_minus_abs,
          nonnegative ? log_sigmoid_of_minus_abs : log_sigmoid_of_abs};
}

MPT_HD float log_sigmoid(float x) { return sigmoid_forms(x).log_p; }
MPT_HD float sigmoid(float x) { return sigmoid_forms(x).p; }

// --------------------------------------------------------------------------- multi-label elements
struct LossAndGrad {
  float loss;
  float grad;  // ∂loss/∂s
};

// ℓ = -(1 - p)^γ log p and ∂ℓ/∂s = (1 - p)^γ (γ p log p - (1 - p)), p = σ(s): the positive
// term of both losses. The focal factor is differentiated (spec §4) and computed as
// exp(γ log(1 - p)), smooth also where 1 - p underflows. Mirrored (s -> -s, which negates
// the derivative) it is SPLC's negative term.
MPT_HD LossAndGrad focal_positive(const SigmoidForms& f, float gamma) {
  const float focal = fast_exp2((gamma * kLog2e) * f.log_one_minus_p);  // γ·log2(e): hoisted out of loops
  return {-focal * f.log_p, focal * (gamma * f.p * f.log_p - f.one_minus_p)};
}

// Hill (spec §4). positive: -(1-q)^γ log q, q = σ(x - m); negative: (λ - p) p², p = σ(x),
// with ∂/∂x = (2λ - 3p) p² (1 - p)
MPT_HD LossAndGrad hill_element(float x, bool positive, float lamb, float margin, float gamma) {
  const SigmoidForms f = sigmoid_forms(positive ? x - margin : x);
  if (positive) return focal_positive(f, gamma);
  const float p = f.p;
  const float p_squared = p * p;
  return {(lamb - p) * p_squared, (2.0f * lamb - 3.0f * p) * p_squared * f.one_minus_p};
}

// SPLC (spec §5). The margin follows the original label; from change_epoch on a negative
// with σ(x) > τ, that is x > logit(τ), counts as positive: a hard decision, taken on the
// logit (flip_logit: _validation.splc_flip_logit, +inf before change_epoch) so that it
// does not depend on how σ is approximated. t' = 0 is the positive term at -x (the focal
// term of σ(-x) = 1 - p, -p^γ log(1 - p)) with the derivative negated.
MPT_HD LossAndGrad splc_element(float x, bool positive, float flip_logit, float margin, float gamma) {
  const float shifted = positive ? x - margin : x;
  const bool as_positive = positive || shifted > flip_logit;
  const LossAndGrad r = focal_positive(sigmoid_forms(as_positive ? shifted : -shifted), gamma);
  return {r.loss, as_positive ? r.grad : -r.grad};
}

struct MultilabelParams {
  bool splc;               // else Hill
  float lamb;              // Hill
  float margin;
  float gamma;
  float flip_logit;        // SPLC: a negative with x > flip_logit counts as positive
};

MPT_HD LossAndGrad multilabel_element(float x, bool positive, const MultilabelParams& p) {
  return p.splc ? splc_element(x, positive, p.flip_logit, p.margin, p.gamma)
                : hill_element(x, positive, p.lamb, p.margin, p.gamma);
}

// The logits' gradient of one element: upstream · scale · ∂ℓ/∂x, scale = 1/(N·C) for
// "mean", else 1. The forward stores it for upstream = 1; the backward recomputes it
// where the upstream gradient is not 1.
MPT_HD float multilabel_gradient(const LossAndGrad& element, float scale, float upstream) {
  return upstream * (scale * element.grad);
}

// --------------------------------------------------------------------------- online softmax
// Factor that brings sums kept relative to old_max to new_max. An empty state
// (max = -inf) scales to 0, never to exp(-inf - (-inf)) = NaN; a NaN max stays NaN.
MPT_HD float rescale_factor(float old_max, float new_max) {
  return old_max == -kInf ? 0.0f : expf(old_max - new_max);
}

// x * factor, where a factor that underflowed to 0 drops the term (also an infinite
// one): the reference's p_j is then 0 too, and it skips terms with p_j = 0.
MPT_HD float rescaled(float x, float factor) { return factor == 0.0f ? 0.0f : x * factor; }

// log Σ exp(x_j) as (max, Σ exp(x_j - max)); empty: (-inf, 0)
struct OnlineLse {
  float max;
  float sum;
};

MPT_HD OnlineLse lse_empty() { return {-kInf, 0.0f}; }

MPT_HD void lse_add(OnlineLse& s, float x) {
  if (x > s.max) {
    s.sum = s.sum * rescale_factor(s.max, x) + 1.0f;
    s.max = x;
  } else if (is_nan(x)) {
    s.max = x;
    s.sum = x;
  } else if (x != -kInf) {  // a masked class adds nothing
    s.sum += expf(x - s.max);
  }
}

MPT_HD OnlineLse lse_merge(const OnlineLse& a, const OnlineLse& b) {
  const float m = nan_max(a.max, b.max);
  return {m, a.sum * rescale_factor(a.max, m) + b.sum * rescale_factor(b.max, m)};
}

MPT_HD float lse_value(float max, float sum) { return max + logf(sum); }  // -inf when empty
MPT_HD float lse_value(const OnlineLse& s) { return lse_value(s.max, s.sum); }

// The teacher's side of KL(p || q) in one sweep (spec §2):
// KL = Σ_j softmax(a)_j (a_j - c_j) - LSE(a) + LSE(c), a = r/τ, c = s/τ.
// Besides a's (max, sum) it keeps weighted = Σ_j exp(a_j - max) (a_j - c_j) over the
// classes with p_j > 0 (a masked teacher class adds nothing, as in the reference).
struct TeacherLse {
  float max;
  float sum;
  float weighted;
};

MPT_HD TeacherLse teacher_empty() { return {-kInf, 0.0f, 0.0f}; }

MPT_HD void teacher_add(TeacherLse& t, float a, float c) {
  if (a > t.max) {
    const float f = rescale_factor(t.max, a);
    t.sum = t.sum * f + 1.0f;
    t.weighted = rescaled(t.weighted, f) + (a - c);
    t.max = a;
  } else if (is_nan(a)) {
    t.max = a;
    t.sum = a;
    t.weighted = a;
  } else if (a != -kInf) {
    const float e = expf(a - t.max);
    t.sum += e;
    if (e != 0.0f) t.weighted += e * (a - c);
  }
}

MPT_HD TeacherLse teacher_merge(const TeacherLse& x, const TeacherLse& y) {
  const float m = nan_max(x.max, y.max);
  const float fx = rescale_factor(x.max, m);
  const float fy = rescale_factor(y.max, m);
  return {m, x.sum * fx + y.sum * fy, rescaled(x.weighted, fx) + rescaled(y.weighted, fy)};
}

// --------------------------------------------------------------------------- argmax
// torch.argmax's order: NaN is the largest value, and ties go to the lowest index.
struct ArgMax {
  float value;
  int index;
};

MPT_HD ArgMax argmax_empty() { return {-kInf, kNoIndex}; }

MPT_HD bool argmax_precedes(float v1, int i1, float v2, int i2) {
  const bool nan1 = is_nan(v1), nan2 = is_nan(v2);
  if (nan1 || nan2) return nan1 && (!nan2 || i1 < i2);
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

MPT_HD void argmax_add(ArgMax& a, float value, int index) {
  if (argmax_precedes(value, index, a.value, a.index)) a = {value, index};
}

MPT_HD ArgMax argmax_merge(const ArgMax& a, const ArgMax& b) {
  return argmax_precedes(b.value, b.index, a.value, a.index) ? b : a;
}

// --------------------------------------------------------------------------- softmax family rows
enum Focus : int { kFocusAll = 0, kFocusRefCorrect = 1, kFocusNegFlip = 2, kFocusStudentWrong = 3 };

MPT_HD bool focus_reads_teacher(int focus) { return focus == kFocusRefCorrect || focus == kFocusNegFlip; }
MPT_HD bool focus_reads_student(int focus) { return focus == kFocusNegFlip || focus == kFocusStudentWrong; }

// The normalised options of SoftmaxLossArgs (backends/cuda.py fills them).
struct SoftmaxRowParams {
  int num_classes;      // C
  int num_old_classes;  // K: the old source's columns, and where the new-class bias starts
  bool has_ce;          // a term of weight 0 (or an absent source) is not computed at all
  bool has_old;
  bool has_new;
  bool kl;              // kind "kl", else "lm"
  int focus;            // Focus
  float ce_weight;
  float old_weight;
  float new_weight;
  float label_smoothing;
  float new_class_bias;  // b on the classes j >= K (used when there is no class_bias vector)
  float inv_tau;         // 1/τ
  float kl_scale;        // S: τ² or 1
  float alpha;
  float beta;
};

// Δ_j of the MPT convention (the class_bias vector, when given, is loaded by the caller)
MPT_HD float new_class_delta(const SoftmaxRowParams& p, int j) {
  return j >= p.num_old_classes ? p.new_class_bias : 0.0f;
}

// One distillation source's running statistics over its columns.
struct SourceState {
  TeacherLse teacher;  // kl: a = r/τ, with the weighted term
  OnlineLse student;   // kl: c = s/τ
  ArgMax teacher_arg;  // focus
  ArgMax student_arg;
  float squares;       // lm: Σ (s_j - r_j)²
};

struct SoftmaxRowState {
  OnlineLse ce;        // LSE(z̃)
  float picked;        // z̃_y (0 in every partial state but the one that saw column y)
  float biased_sum;    // Σ_j z̃_j (label smoothing)
  SourceState old_src;
  SourceState new_src;
};

MPT_HD SourceState source_empty() {
  return {teacher_empty(), lse_empty(), argmax_empty(), argmax_empty(), 0.0f};
}

MPT_HD SoftmaxRowState row_empty() { return {lse_empty(), 0.0f, 0.0f, source_empty(), source_empty()}; }

MPT_HD void source_add(SourceState& s, const SoftmaxRowParams& p, int j, float z, float r) {
  if (p.kl) {
    const float c = z * p.inv_tau;
    teacher_add(s.teacher, r * p.inv_tau, c);
    lse_add(s.student, c);
  } else {
    const float d = z - r;
    s.squares += d * d;
  }
  if (focus_reads_teacher(p.focus)) argmax_add(s.teacher_arg, r, j);
  if (focus_reads_student(p.focus)) argmax_add(s.student_arg, z, j);
}

// Column j of a row: logit z, bias Δ_j, old teacher r_old (read only for j < K), new teacher r_new.
MPT_HD void row_add(SoftmaxRowState& s, const SoftmaxRowParams& p, int j, int64_t y, float z,
                    float delta, float r_old, float r_new) {
  if (p.has_ce) {
    const float biased = z + delta;
    lse_add(s.ce, biased);
    if (j == y) s.picked = biased;
    s.biased_sum += biased;
  }
  if (p.has_old && j < p.num_old_classes) source_add(s.old_src, p, j, z, r_old);
  if (p.has_new) source_add(s.new_src, p, j, z, r_new);
}

MPT_HD SourceState source_merge(const SourceState& a, const SourceState& b) {
  return {teacher_merge(a.teacher, b.teacher), lse_merge(a.student, b.student),
          argmax_merge(a.teacher_arg, b.teacher_arg), argmax_merge(a.student_arg, b.student_arg),
          a.squares + b.squares};
}

MPT_HD SoftmaxRowState row_merge(const SoftmaxRowState& a, const SoftmaxRowState& b) {
  return {lse_merge(a.ce, b.ce), a.picked + b.picked, a.biased_sum + b.biased_sum,
          source_merge(a.old_src, b.old_src), source_merge(a.new_src, b.new_src)};
}

// What the gradient of one source needs once its row is reduced.
struct SourceGrad {
  float coef;            // kl: λ w S/τ; lm: λ w / K
  float teacher_max;
  float teacher_inv_sum;
  float student_max;
  float student_inv_sum;
};

// What the gradient of a reduced row needs. The forward saves it for every counted row
// as kSoftmaxStatFloats float32 values (store_row_stats), so that the backward
// recomputes the row's gradient in one sweep without reducing the row again.
struct SoftmaxRowStats {
  float scale;  // the row's share of the reduction: 1/count for "mean", else 1
  float ce_max;  // LSE(z̃) as max and 1/Σ exp(z̃_j - max)
  float ce_inv_sum;
  SourceGrad old_src;
  SourceGrad new_src;
};

constexpr int kSoftmaxStatFloats = 13;
static_assert(sizeof(SoftmaxRowStats) == kSoftmaxStatFloats * sizeof(float), "stats are whole floats");

MPT_HD void store_row_stats(const SoftmaxRowStats& s, float* out) {
  const float values[kSoftmaxStatFloats] = {
      s.scale, s.ce_max, s.ce_inv_sum,
      s.old_src.coef, s.old_src.teacher_max, s.old_src.teacher_inv_sum, s.old_src.student_max, s.old_src.student_inv_sum,
      s.new_src.coef, s.new_src.teacher_max, s.new_src.teacher_inv_sum, s.new_src.student_max, s.new_src.student_inv_sum};
  for (int k = 0; k < kSoftmaxStatFloats; ++k) out[k] = values[k];
}

MPT_HD SoftmaxRowStats load_row_stats(const float* in) {
  return {in[0], in[1], in[2], {in[3], in[4], in[5], in[6], in[7]}, {in[8], in[9], in[10], in[11], in[12]}};
}

struct SoftmaxRowResult {
  float loss;
  SoftmaxRowStats stats;
};

// w_i = α + β f_i (spec §2)
MPT_HD float focal_weight(const SourceState& s, const SoftmaxRowParams& p, int64_t y) {
  bool f = false;
  if (p.focus == kFocusRefCorrect) f = s.teacher_arg.index == y;
  if (p.focus == kFocusNegFlip) f = s.teacher_arg.index == y && s.student_arg.index != y;
  if (p.focus == kFocusStudentWrong) f = s.student_arg.index != y;
  return f ? p.alpha + p.beta : p.alpha;
}

// λ w_i d_i of one source over its `columns` classes, and what its gradient needs.
MPT_HD float source_finish(const SourceState& s, const SoftmaxRowParams& p, float weight,
                           int columns, int64_t y, SourceGrad& grad) {
  const float w = focal_weight(s, p, y);
  grad.teacher_max = s.teacher.max;
  grad.teacher_inv_sum = 1.0f / s.teacher.sum;
  grad.student_max = s.student.max;
  grad.student_inv_sum = 1.0f / s.student.sum;
  if (p.kl) {
    const float kl = s.teacher.weighted / s.teacher.sum - lse_value(s.teacher.max, s.teacher.sum) +
                     lse_value(s.student);
    grad.coef = weight * w * p.kl_scale * p.inv_tau;
    return weight * w * p.kl_scale * kl;
  }
  grad.coef = weight * w / static_cast<float>(columns);
  return weight * w * s.squares / (2.0f * static_cast<float>(columns));
}

// The row's loss L_i (spec §3) and the constants of its gradient, whose share of the
// reduction is `scale`; y is a valid class.
MPT_HD SoftmaxRowResult row_finish(const SoftmaxRowState& s, const SoftmaxRowParams& p, int64_t y, float scale) {
  SoftmaxRowResult result{};
  SoftmaxRowStats& r = result.stats;
  r.scale = scale;
  float loss = 0.0f;
  if (p.has_ce) {
    const float lse = lse_value(s.ce);
    const float eps = p.label_smoothing;
    // (1-ε)(LSE - z̃_y) + (ε/C) Σ_j (LSE - z̃_j); with ε = 0 the sum is skipped, as in
    // the reference (0 · inf would be NaN on a masked class)
    const float ce = eps == 0.0f ? lse - s.picked
                                 : (1.0f - eps) * (lse - s.picked) +
                                       eps * (lse - s.biased_sum / static_cast<float>(p.num_classes));
    loss += p.ce_weight * ce;
    r.ce_max = s.ce.max;
    r.ce_inv_sum = 1.0f / s.ce.sum;
  }
  if (p.has_old) loss += source_finish(s.old_src, p, p.old_weight, p.num_old_classes, y, r.old_src);
  if (p.has_new) loss += source_finish(s.new_src, p, p.new_weight, p.num_classes, y, r.new_src);
  result.loss = loss;
  return result;
}

MPT_HD float source_gradient(const SourceGrad& g, const SoftmaxRowParams& p, float z, float r) {
  if (!p.kl) return g.coef * (z - r);  // (s - r)/K
  const float q = expf(z * p.inv_tau - g.student_max) * g.student_inv_sum;
  const float prob = expf(r * p.inv_tau - g.teacher_max) * g.teacher_inv_sum;
  return g.coef * (q - prob);  // (S/τ)(q_j - p_j)
}

// The logits' gradient of column j: upstream · scale · ∂L_i/∂z_ij (spec §3). The forward
// stores it for upstream = 1; the backward recomputes it from the same inputs and the
// saved stats where the row's upstream gradient is not 1.
MPT_HD float row_gradient(const SoftmaxRowStats& r, const SoftmaxRowParams& p, int j, int64_t y, float z,
                          float delta, float r_old, float r_new, float upstream) {
  float g = 0.0f;
  if (p.has_ce) {
    const float prob = expf(z + delta - r.ce_max) * r.ce_inv_sum;
    const float eps = p.label_smoothing;
    const float target = j == y ? 1.0f - eps : 0.0f;
    g = p.ce_weight * (prob - target - eps / static_cast<float>(p.num_classes));
  }
  if (p.has_old && j < p.num_old_classes) g += source_gradient(r.old_src, p, z, r_old);
  if (p.has_new) g += source_gradient(r.new_src, p, z, r_new);
  return upstream * (r.scale * g);
}

// --------------------------------------------------------------------------- targets
enum TargetKind : int { kTargetCounted = 0, kTargetIgnored = 1, kTargetOutOfRange = 2 };

// An ignored row adds nothing; a counted target outside [0, C) (only reachable on a GPU,
// where the values are not checked) gives its row a NaN loss and no gradient.
MPT_HD int classify_target(int64_t y, bool has_ignore_index, int64_t ignore_index, int num_classes) {
  if (has_ignore_index && y == ignore_index) return kTargetIgnored;
  return (y < 0 || y >= num_classes) ? kTargetOutOfRange : kTargetCounted;
}

// --------------------------------------------------------------------------- backward
// Whether the backward recomputes a gradient: where the upstream gradient is exactly 1
// the forward's gradient is already the answer (rounded once), and an ignored or
// out-of-range softmax row keeps its zero gradient whatever the upstream gradient, NaN
// included (as in the reference).
MPT_HD bool recompute_element(float upstream) { return upstream != 1.0f; }

MPT_HD bool recompute_row(int target_kind, float upstream) {
  return target_kind == kTargetCounted && recompute_element(upstream);
}

}  // namespace mpt
