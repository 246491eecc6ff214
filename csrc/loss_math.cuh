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

// --------------------------------------------------------------------------- fast math
// On the GPU the per-element math uses the hardware's approximate units (MUFU: ex2, lg2,
// rcp; about 2 ulp in float32, denormals flushed), which is what makes the kernels
// bandwidth bound; the host build of this header (host_math.cpp, the CPU tests) uses the
// precise libm functions, so that the tests check the formulas themselves tightly.
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x log2(e))

MPT_HD float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

MPT_HD float exp_fast(float x) { return exp2_fast(x * kLog2e); }

MPT_HD float log_fast(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);  // lg2.approx times ln 2
#else
  return logf(x);
#endif
}

MPT_HD float rcp_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

// log(1 + e) for e in [0, 1] (or NaN), given t = 1 + e and r = 1/t. On the GPU: lg2.approx
// has an absolute error of ~2^-22 near 1, too much relative to log(1 + e) ~ e for small e,
// so below e = 1/8 a series is used; above it, log(t) plus the rounding error of t.
MPT_HD float log1p_unit(float e, float t, float r) {
#if defined(__CUDA_ARCH__)
  // e - e²/2 + e³/3 - ... to e^8: relative error < (1/8)^8 / 9 ~ 7e-9 below 1/8
  float s = -1.0f / 8.0f;
  s = fmaf(s, e, 1.0f / 7.0f);
  s = fmaf(s, e, -1.0f / 6.0f);
  s = fmaf(s, e, 1.0f / 5.0f);
  s = fmaf(s, e, -1.0f / 4.0f);
  s = fmaf(s, e, 1.0f / 3.0f);
  s = fmaf(s, e, -1.0f / 2.0f);
  s = fmaf(s, e, 1.0f);
  const float series = s * e;
  const float logarithm = log_fast(t) + (e - (t - 1.0f)) * r;
  return e < 0.125f ? series : logarithm;  // NaN: the logarithm's NaN
#else
  (void)t;
  (void)r;
  return log1pf(e);
#endif
}

// --------------------------------------------------------------------------- sigmoid forms
// log σ(x) = min(x, 0) - log1p(exp(-|x|)): finite for every finite x (never log(σ(x))).
MPT_HD float log_sigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }

MPT_HD float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

// σ(u), σ(-u) = 1 - σ(u) and their logarithms from one exp, one reciprocal and one log:
// with e = exp(-|u|) in (0, 1], σ(|u|) = 1/(1 + e), σ(-|u|) = e/(1 + e), and
// log σ(±u) = min(±u, 0) - log(1 + e) (finite for every finite u). A NaN u gives NaNs.
struct SigmoidPair {
  float p;      // σ(u)
  float q;      // σ(-u)
  float log_p;  // log σ(u)
  float log_q;  // log σ(-u)
};

MPT_HD SigmoidPair sigmoid_pair(float u) {
  const float e = exp_fast(-fabsf(u));
  const float t = 1.0f + e;
  const float r = rcp_fast(t);
  const float softplus = log1p_unit(e, t, r);
  const float er = e * r;
  const bool nonnegative = u >= 0.0f;
  return {nonnegative ? r : er, nonnegative ? er : r, fminf(u, 0.0f) - softplus, fminf(-u, 0.0f) - softplus};
}

// base^γ from log(base), as the reference computes it: smooth also where base underflows;
// γ = 2 (the default everywhere) as base², which costs no exp.
MPT_HD float focal_factor(float base, float log_base, float gamma) {
  return gamma == 2.0f ? base * base : exp_fast(gamma * log_base);
}

// --------------------------------------------------------------------------- multi-label elements
struct LossAndGrad {
  float loss;
  float grad;  // ∂loss/∂x
};

// -(1 - a)^γ log a and its derivative in u, a = σ(u), from s = sigmoid_pair(u) (or its
// mirror for σ(-u)): the focal log-loss of Hill's positives and both SPLC cases.
MPT_HD LossAndGrad focal_log_loss(float a, float one_minus_a, float log_a, float log_one_minus_a, float gamma) {
  const float focal = focal_factor(one_minus_a, log_one_minus_a, gamma);
  return {-focal * log_a, focal * (gamma * a * log_a - one_minus_a)};
}

// Hill (spec §4). positive: -(1-q)^γ log q, q = σ(x - m); negative: (λ - p) p², p = σ(x).
// Both cases share one sigmoid_pair of u = x - m or x, and the result is selected: no branch.
MPT_HD LossAndGrad hill_element(float x, bool positive, float lamb, float margin, float gamma) {
  const SigmoidPair s = sigmoid_pair(positive ? x - margin : x);
  const LossAndGrad pos = focal_log_loss(s.p, s.q, s.log_p, s.log_q, gamma);
  const float p = s.p;
  const LossAndGrad neg = {(lamb - p) * p * p, (2.0f * lamb * p - 3.0f * p * p) * p * s.q};
  return positive ? pos : neg;
}

// SPLC (spec §5). The margin follows the original label; from change_epoch on
// (`correct_negatives`) a negative with σ(x) > τ counts as positive, a hard decision.
// t' = 1: -(1-p)^γ log p; t' = 0: -p^γ log(1-p), the same form in σ(-x') with the sign of
// the derivative flipped.
MPT_HD LossAndGrad splc_element(float x, bool positive, bool correct_negatives, float tau,
                                float margin, float gamma) {
  const SigmoidPair s = sigmoid_pair(positive ? x - margin : x);
  const bool target = positive || (correct_negatives && s.p > tau);
  const LossAndGrad r = target ? focal_log_loss(s.p, s.q, s.log_p, s.log_q, gamma)
                               : focal_log_loss(s.q, s.p, s.log_q, s.log_p, gamma);
  return {r.loss, target ? r.grad : -r.grad};
}

struct MultilabelParams {
  bool splc;               // else Hill
  float lamb;              // Hill
  float margin;
  float gamma;
  float tau;               // SPLC threshold
  bool correct_negatives;  // SPLC: epoch >= change_epoch
};

MPT_HD LossAndGrad multilabel_element(float x, bool positive, const MultilabelParams& p) {
  return p.splc ? splc_element(x, positive, p.correct_negatives, p.tau, p.margin, p.gamma)
                : hill_element(x, positive, p.lamb, p.margin, p.gamma);
}

// The logits' gradient of one element: upstream · scale · ∂ℓ/∂x, scale = 1/(N·C) for
// "mean", else 1. The forward stores it for upstream = 1; the backward recomputes it
// where the upstream gradient is not 1.
MPT_HD float multilabel_gradient(const LossAndGrad& element, float scale, float upstream) {
  return upstream * (scale * element.grad);
}

// --------------------------------------------------------------------------- softmax sums
// A softmax over values x_j with scale k (exp(x_j / τ) = exp2(x_j · k), k = log2(e)/τ) is
// kept as (max, sum): max = max_j x_j (fmaxf: a NaN never becomes the max), sum = Σ_j
// exp2(k (x_j - ref)), ref = reference_point(max). The max is finite or -inf (empty, or
// only masked classes: ref 0 then, so exp(-inf - -inf) = NaN never happens); a NaN value
// makes the sum NaN, and with it the loss. Every exponent is fmaf(x, k, -ref·k): for the
// largest value it is exactly 0 up to the rounding of ref·k.
//
// Values are added a chunk at a time (the chunk's max first, then one rescale of the
// running sums and one exp per value), never one value at a time.
MPT_HD float reference_point(float max) { return max == -kInf ? 0.0f : max; }

// Factor that brings sums kept relative to old_max to new_max (>= old_max): from the
// reference ref·k that the old exponents subtracted (rounded) to the new one. An empty
// state (max = -inf) scales to 0.
MPT_HD float rescale_factor(float old_max, float new_max, float k) {
  return old_max == -kInf ? 0.0f : exp2_fast(reference_point(old_max) * k - reference_point(new_max) * k);
}

// x * factor, where a factor that underflowed to 0 drops the term (also an infinite
// one): the reference's p_j is then 0 too, and it skips terms with p_j = 0.
MPT_HD float rescaled(float x, float factor) { return factor == 0.0f ? 0.0f : x * factor; }

// A softmax's (max, Σ exp2(k (x_j - ref))); empty: (-inf, 0)
struct OnlineLse {
  float max;
  float sum;
};

MPT_HD OnlineLse lse_empty() { return {-kInf, 0.0f}; }

MPT_HD OnlineLse lse_merge(const OnlineLse& a, const OnlineLse& b, float k) {
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * rescale_factor(a.max, m, k) + b.sum * rescale_factor(b.max, m, k)};
}

// LSE of the values x_j · unit (unit = 1/τ for k = log2(e)/τ, 1 for the CE); -inf when empty
MPT_HD float lse_value(const OnlineLse& s, float unit) { return reference_point(s.max) * unit + logf(s.sum); }

// The teacher's side of KL(p || q) in one sweep (spec §2):
// KL = Σ_j softmax(a)_j (a_j - c_j) - LSE(a) + LSE(c), a = r/τ, c = s/τ.
// Besides a's (max, sum) (of the raw r, scale k = log2(e)/τ) it keeps weighted = Σ_j
// exp2(k (r_j - ref)) k (r_j - s_j) (KL in log2 units) over the classes with p_j > 0 (a
// masked teacher class adds nothing, as in the reference).
struct TeacherLse {
  float max;
  float sum;
  float weighted;
};

MPT_HD TeacherLse teacher_empty() { return {-kInf, 0.0f, 0.0f}; }

MPT_HD TeacherLse teacher_merge(const TeacherLse& x, const TeacherLse& y, float k) {
  const float m = fmaxf(x.max, y.max);
  const float fx = rescale_factor(x.max, m, k);
  const float fy = rescale_factor(y.max, m, k);
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

// Adds a value whose index is larger than every index the state has seen (columns are
// added in increasing order within a state): it wins only if strictly larger, the first
// NaN, or the first value at all (-inf included). Selects, no branch.
MPT_HD void argmax_add_next(ArgMax& a, float value, int index) {
  const bool wins = value > a.value || (is_nan(value) && !is_nan(a.value)) || a.index == kNoIndex;
  a.value = wins ? value : a.value;
  a.index = wins ? index : a.index;
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
  float inv_tau;         // 1/τ (> 0)
  float kl_scale;        // S: τ² or 1
  float alpha;
  float beta;
};

// Δ_j of the MPT convention (the class_bias vector, when given, is loaded by the caller)
MPT_HD float new_class_delta(const SoftmaxRowParams& p, int j) {
  return j >= p.num_old_classes ? p.new_class_bias : 0.0f;
}

// k of a = r/τ and c = s/τ, rounded once (a float product would round twice)
MPT_HD float source_scale(const SoftmaxRowParams& p) {
  return static_cast<float>(static_cast<double>(p.inv_tau) * 1.4426950408889634);
}

// One distillation source's running statistics over its columns.
struct SourceState {
  TeacherLse teacher;  // kl: of the raw teacher logits r, scale k = log2(e)/τ
  OnlineLse student;   // kl: of the raw student logits z, same scale
  ArgMax teacher_arg;  // focus
  ArgMax student_arg;
  float squares;       // lm: Σ (s_j - r_j)²
};

struct SoftmaxRowState {
  OnlineLse ce;        // LSE(z̃), scale log2(e)
  float picked;        // z̃_y (0 in every partial state but the one that saw column y)
  float biased_sum;    // Σ_j z̃_j (label smoothing)
  SourceState old_src;
  SourceState new_src;
};

MPT_HD SourceState source_empty() {
  return {teacher_empty(), lse_empty(), argmax_empty(), argmax_empty(), 0.0f};
}

MPT_HD SoftmaxRowState row_empty() { return {lse_empty(), 0.0f, 0.0f, source_empty(), source_empty()}; }

// A chunk of a row's columns, in increasing column order: column index, logit z, bias Δ,
// old teacher (read only below K), new teacher. A column >= C is padding: every sum and
// max leaves it out (its values are never looked at, whatever they are).
template <int N>
struct ColumnChunk {
  int col[N];
  float z[N];
  float delta[N];
  float r_old[N];
  float r_new[N];
};

// Adds the chunk's columns with valid[i] (below C for the new source and the CE, below K
// for the old source) to one source: maxima first, then one rescale and one exp per
// softmax per column. kMasked = false: every column of the chunk is valid (no selects).
template <int N, bool kMasked>
MPT_HD void source_add_chunk(SourceState& s, const SoftmaxRowParams& p, const ColumnChunk<N>& c,
                             const float (&r)[N], int limit) {
#define MPT_VALID(i) (!kMasked || c.col[i] < limit)
  if (focus_reads_teacher(p.focus)) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (MPT_VALID(i)) argmax_add_next(s.teacher_arg, r[i], c.col[i]);
    }
  }
  if (focus_reads_student(p.focus)) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (MPT_VALID(i)) argmax_add_next(s.student_arg, c.z[i], c.col[i]);
    }
  }
  if (!p.kl) {
    float squares = s.squares;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float d = c.z[i] - r[i];
      squares += MPT_VALID(i) ? d * d : 0.0f;
    }
    s.squares = squares;
    return;
  }
  const float k = source_scale(p);
  float teacher_max = -kInf, student_max = -kInf;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    teacher_max = fmaxf(teacher_max, MPT_VALID(i) ? r[i] : -kInf);
    student_max = fmaxf(student_max, MPT_VALID(i) ? c.z[i] : -kInf);
  }
  teacher_max = fmaxf(s.teacher.max, teacher_max);
  student_max = fmaxf(s.student.max, student_max);
  const float teacher_factor = rescale_factor(s.teacher.max, teacher_max, k);
  const float student_factor = rescale_factor(s.student.max, student_max, k);
  const float teacher_ref = reference_point(teacher_max) * k;
  const float student_ref = reference_point(student_max) * k;
  float teacher_sum = s.teacher.sum * teacher_factor;
  float weighted = rescaled(s.teacher.weighted, teacher_factor);
  float student_sum = s.student.sum * student_factor;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = exp2_fast(fmaf(r[i], k, -teacher_ref));
    const float q = exp2_fast(fmaf(c.z[i], k, -student_ref));
    teacher_sum += MPT_VALID(i) ? e : 0.0f;
    student_sum += MPT_VALID(i) ? q : 0.0f;
    // a teacher class of probability 0 (masked) adds nothing, not 0 · (-inf - c)
    weighted += (MPT_VALID(i) && e != 0.0f) ? e * ((r[i] - c.z[i]) * k) : 0.0f;
  }
  s.teacher = {teacher_max, teacher_sum, weighted};
  s.student = {student_max, student_sum};
#undef MPT_VALID
}

// Adds a chunk of columns (ColumnChunk) to a row's state; y is the row's target.
template <int N, bool kMasked>
MPT_HD void row_add_chunk(SoftmaxRowState& s, const SoftmaxRowParams& p, int64_t y, const ColumnChunk<N>& c) {
  const int C = p.num_classes;
  if (p.has_ce) {
    float biased[N];
    float max = -kInf;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      biased[i] = c.z[i] + c.delta[i];
      max = fmaxf(max, (!kMasked || c.col[i] < C) ? biased[i] : -kInf);
    }
    max = fmaxf(s.ce.max, max);
    const float factor = rescale_factor(s.ce.max, max, kLog2e);
    const float ref = reference_point(max) * kLog2e;
    float sum = s.ce.sum * factor, picked = s.picked, biased_sum = s.biased_sum;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const bool valid = !kMasked || c.col[i] < C;
      const float e = exp2_fast(fmaf(biased[i], kLog2e, -ref));
      sum += valid ? e : 0.0f;
      biased_sum += valid ? biased[i] : 0.0f;
      picked = c.col[i] == y ? biased[i] : picked;
    }
    s.ce = {max, sum};
    s.picked = picked;
    s.biased_sum = biased_sum;
  }
  if (p.has_old) source_add_chunk<N, kMasked>(s.old_src, p, c, c.r_old, p.num_old_classes);
  if (p.has_new) source_add_chunk<N, kMasked>(s.new_src, p, c, c.r_new, C);
}

MPT_HD SourceState source_merge(const SourceState& a, const SourceState& b, const SoftmaxRowParams& p) {
  const float k = source_scale(p);
  return {teacher_merge(a.teacher, b.teacher, k), lse_merge(a.student, b.student, k),
          argmax_merge(a.teacher_arg, b.teacher_arg), argmax_merge(a.student_arg, b.student_arg),
          a.squares + b.squares};
}

// Merges two partial states of one row; parts that the options do not compute are left
// as they are (the kernels merge only what is used).
MPT_HD SoftmaxRowState row_merge(const SoftmaxRowState& a, const SoftmaxRowState& b, const SoftmaxRowParams& p) {
  SoftmaxRowState s = a;
  if (p.has_ce) {
    s.ce = lse_merge(a.ce, b.ce, kLog2e);
    s.picked = a.picked + b.picked;
    s.biased_sum = a.biased_sum + b.biased_sum;
  }
  if (p.has_old) s.old_src = source_merge(a.old_src, b.old_src, p);
  if (p.has_new) s.new_src = source_merge(a.new_src, b.new_src, p);
  return s;
}

// What the gradient of one source needs once its row is reduced.
struct SourceGrad {
  float coef;            // kl: λ w S/τ; lm: λ w / K
  float teacher_ref;     // reference points (raw logits) and 1/sums of the softmaxes
  float teacher_inv_sum;
  float student_ref;
  float student_inv_sum;
};

// What the gradient of a reduced row needs. The forward saves it for every counted row
// as kSoftmaxStatFloats float32 values (store_row_stats), so that the backward
// recomputes the row's gradient in one sweep without reducing the row again.
struct SoftmaxRowStats {
  float scale;  // the row's share of the reduction: 1/count for "mean", else 1
  float ce_ref;  // LSE(z̃) as reference point and 1/Σ exp(z̃_j - ref)
  float ce_inv_sum;
  SourceGrad old_src;
  SourceGrad new_src;
};

constexpr int kSoftmaxStatFloats = 13;
static_assert(sizeof(SoftmaxRowStats) == kSoftmaxStatFloats * sizeof(float), "stats are whole floats");

MPT_HD void store_row_stats(const SoftmaxRowStats& s, float* out) {
  const float values[kSoftmaxStatFloats] = {
      s.scale, s.ce_ref, s.ce_inv_sum,
      s.old_src.coef, s.old_src.teacher_ref, s.old_src.teacher_inv_sum, s.old_src.student_ref, s.old_src.student_inv_sum,
      s.new_src.coef, s.new_src.teacher_ref, s.new_src.teacher_inv_sum, s.new_src.student_ref, s.new_src.student_inv_sum};
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
// (Once per row: precise division and log.)
MPT_HD float source_finish(const SourceState& s, const SoftmaxRowParams& p, float weight,
                           int columns, int64_t y, SourceGrad& grad) {
  const float w = focal_weight(s, p, y);
  grad.teacher_ref = reference_point(s.teacher.max);
  grad.teacher_inv_sum = 1.0f / s.teacher.sum;
  grad.student_ref = reference_point(s.student.max);
  grad.student_inv_sum = 1.0f / s.student.sum;
  if (p.kl) {
    // in log2 units, where the references ref·k are exactly what the exponents subtracted
    // (the LSEs' large parts then cancel exactly against weighted's)
    const float k = source_scale(p);
    const float kl2 = s.teacher.weighted / s.teacher.sum -
                      (reference_point(s.teacher.max) * k + log2f(s.teacher.sum)) +
                      (reference_point(s.student.max) * k + log2f(s.student.sum));
    const float kl = kl2 * (1.0f / kLog2e);
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
    const float lse = lse_value(s.ce, 1.0f);
    const float eps = p.label_smoothing;
    // (1-ε)(LSE - z̃_y) + (ε/C) Σ_j (LSE - z̃_j); with ε = 0 the sum is skipped, as in
    // the reference (0 · inf would be NaN on a masked class)
    const float ce = eps == 0.0f ? lse - s.picked
                                 : (1.0f - eps) * (lse - s.picked) +
                                       eps * (lse - s.biased_sum / static_cast<float>(p.num_classes));
    loss += p.ce_weight * ce;
    r.ce_ref = reference_point(s.ce.max);
    r.ce_inv_sum = 1.0f / s.ce.sum;
  }
  if (p.has_old) loss += source_finish(s.old_src, p, p.old_weight, p.num_old_classes, y, r.old_src);
  if (p.has_new) loss += source_finish(s.new_src, p, p.new_weight, p.num_classes, y, r.new_src);
  result.loss = loss;
  return result;
}

// The per-row constants of the gradient sweep, from the stats (once per row):
// ∂L/∂z_j = ce_a·exp(z̃_j - ref) - ce_b - [j = y] ce_t
//         + Σ_sources (kl) q_coef·exp((z_j - s_ref)/τ) - p_coef·exp((r_j - t_ref)/τ)
//                     (lm) coef·(z_j - r_j)
// with the exponents as fmaf(x, k, -ref·k), as in the sums.
struct SourceGradConstants {
  float coef;      // lm
  float q_coef;    // kl: coef / Σ student
  float p_coef;    // kl: coef / Σ teacher
  float student_ref;  // ref · k
  float teacher_ref;
};

struct RowGradConstants {
  float scale;
  float ce_a, ce_b, ce_t, ce_ref;
  float k;  // log2(e)/τ
  SourceGradConstants old_src, new_src;
};

MPT_HD SourceGradConstants source_grad_constants(const SourceGrad& g, float k) {
  return {g.coef, g.coef * g.student_inv_sum, g.coef * g.teacher_inv_sum, g.student_ref * k, g.teacher_ref * k};
}

MPT_HD RowGradConstants row_grad_constants(const SoftmaxRowStats& r, const SoftmaxRowParams& p) {
  RowGradConstants c{};
  c.scale = r.scale;
  const float eps = p.label_smoothing;
  c.ce_a = p.ce_weight * r.ce_inv_sum;
  c.ce_b = p.ce_weight * (eps / static_cast<float>(p.num_classes));
  c.ce_t = p.ce_weight * (1.0f - eps);
  c.ce_ref = r.ce_ref * kLog2e;
  c.k = source_scale(p);
  c.old_src = source_grad_constants(r.old_src, c.k);
  c.new_src = source_grad_constants(r.new_src, c.k);
  return c;
}

MPT_HD float source_gradient(const SourceGradConstants& g, const SoftmaxRowParams& p, float k, float z, float r) {
  if (!p.kl) return g.coef * (z - r);  // (s - r)/K
  const float q = exp2_fast(fmaf(z, k, -g.student_ref));
  const float prob = exp2_fast(fmaf(r, k, -g.teacher_ref));
  return g.q_coef * q - g.p_coef * prob;  // (S/τ)(q_j - p_j)
}

// The logits' gradient of column j < C: upstream · scale · ∂L_i/∂z_ij (spec §3). The
// forward stores it for upstream = 1; the backward recomputes it from the same inputs and
// the saved stats where the row's upstream gradient is not 1: rounded once either way.
MPT_HD float row_gradient(const RowGradConstants& c, const SoftmaxRowParams& p, int j, int64_t y, float z,
                          float delta, float r_old, float r_new, float upstream) {
  float g = 0.0f;
  if (p.has_ce) {
    const float e = exp2_fast(fmaf(z + delta, kLog2e, -c.ce_ref));
    g = fmaf(c.ce_a, e, -(j == y ? c.ce_b + c.ce_t : c.ce_b));
  }
  if (p.has_old && j < p.num_old_classes) g += source_gradient(c.old_src, p, c.k, z, r_old);
  if (p.has_new) g += source_gradient(c.new_src, p, c.k, z, r_new);
  return upstream * (c.scale * g);
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
