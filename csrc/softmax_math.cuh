// The softmax family's math (LOSSES.md §1-3: margin-calibrated CE, focal distillation,
// MPT), per thread and per row, written once for the kernels (softmax_loss.cu) and for
// the host (host_math.cpp, so that tests/test_cuda_host_math.py checks it on CPU).
//
// The row layout. A row's classes fall into two segments: the old classes [0, K), where
// the old teacher is read and the new-class bias is 0, and the new classes [K, C). Each
// segment is cut into slots of VEC columns that start at multiples of VEC (16 bytes of
// every input; the slot holding column K, when K is not a multiple of VEC, is in both
// segments, each half masked), and the slots of both segments, in order, are dealt out to
// the block's threads round by round (slot r·threads + t to thread t). A chunk is NV
// rounds: a thread handles NV slots together.
//
// The statistics of a chunk are taken as the Triton kernel takes a block's: first the
// chunk's maximum per stream, then one rescale of each running sum, then one base-2
// exponential per element and stream (log2(e)/τ folded into one multiply-add), never a
// comparison or a rescale per element. Each thread keeps its own running state (no
// communication inside the sweep); the block merges the threads' states once.
//
// Masked columns (past the segment, or outside the row) hold -inf in every stream, so
// they add nothing to a maximum or a sum of exponentials; where -inf would reach a
// difference (the logit-matching squares, the label-smoothing sum), the column test is
// explicit, so that a -inf the caller passed still counts as the reference counts it.
#pragma once

#include <cstdint>

#include "loss_math.cuh"

namespace mpt {

constexpr float kLn2 = 0.6931471805599453f;

// a * b rounded up (toward +inf), never fused into a neighbouring add. It makes the
// shifts of the online log-sum-exp: shift >= max·scale, so exp2_against(x, scale, shift)
// <= 1 for every x <= max, also where max·scale is so large that its rounding error is
// huge (a mask of finfo.min at τ = 5: 1e38·0.29, an error near 1e31; rounded to nearest,
// the max's own exponential was exp2(+1e31) = inf half the time). And a rescale factor
// exp2(mul_ru(max, scale) - shift') is exactly 1 while the maximum stays put (both
// rounded alike; a product the compiler contracts into an FMA is exact instead).
MPT_HD float mul_ru(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_ru(a, b);
#else
  const float nearest = a * b;  // the host rounds to nearest: up where that went down
  return static_cast<double>(nearest) < static_cast<double>(a) * static_cast<double>(b) ? nextafterf(nearest, kInf)
                                                                                          : nearest;
#endif
}

// exp2(x·scale - shift) from the exact product (one FMA, on the host too): where x is near
// the maximum the argument is small, so the exponential keeps float32's relative precision
// whatever |x|·scale is; it is at most 1 for x <= max (mul_ru). The statistics and the
// gradient take every exponential so, against the same shifts, so that softmax_j =
// exp2(x_j·scale - shift) / Σ is as precise as they are.
MPT_HD float exp2_against(float x, float scale, float shift) { return fast_exp2(fmaf(x, scale, -shift)); }

// --------------------------------------------------------------------------- options
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

// --------------------------------------------------------------------------- row layout
// Columns [col0, col0 + VEC) ∩ [lo, hi) of one slot, and its segment.
struct SlotSpan {
  int col0;
  int lo;
  int hi;
  bool old_segment;  // [lo, hi) is within [0, K)

  MPT_HD bool has(int j) const { return j >= lo && j < hi; }
  MPT_HD bool full(int vec) const { return col0 >= lo && col0 + vec <= hi; }
};

struct RowLayout {
  int num_classes;
  int num_old;
  int vec;
  int old_slots;   // slots of [0, K)
  int new_first;   // first column of the new segment's first slot: K rounded down to VEC
  int slots;       // of both segments

  MPT_HD RowLayout(int C, int K, int vec_) : num_classes(C), num_old(K), vec(vec_) {
    old_slots = (K + vec - 1) / vec;
    new_first = (K / vec) * vec;
    slots = old_slots + (K < C ? (C - new_first + vec - 1) / vec : 0);
  }

  MPT_HD SlotSpan span(int slot) const {
    if (slot < old_slots) return {slot * vec, 0, num_old, true};
    return {new_first + (slot - old_slots) * vec, num_old, num_classes, false};
  }

  // rounds of `threads` slots that cover the row
  MPT_HD int rounds(int threads) const { return (slots + threads - 1) / threads; }
};

// --------------------------------------------------------------------------- online log-sum-exp, base 2
// The running max of values v and Σ exp2(v·scale - shift), shift = the max times scale
// rounded up (mul_ru), at least -FLT_MAX: never -inf, so that exp2(v·scale - shift) is
// never exp2(-inf + inf) = NaN, neither while the max is -inf (every class masked) nor
// where a mask of finfo(dtype).min times log2(e)/τ overflows; such classes add
// exp2(-inf) = 0 (against the row's real max, as in the reference). A NaN is dropped by the max but reaches the
// sum through its exponential, so it propagates.
struct Lse2 {
  float max;
  float sum;
};

MPT_HD Lse2 lse2_empty() { return {-kInf, 0.0f}; }

MPT_HD float lse2_shift(float max, float scale) { return fmaxf(mul_ru(max, scale), -kFloatMax); }

// Brings the state's sum onto a new maximum, max(state, chunk_max); returns the factor
// applied (0 while the state was empty) and stores the new shift, which the chunk's
// exponentials are taken against.
MPT_HD float lse2_raise(Lse2& s, float chunk_max, float scale, float& shift) {
  const float m = fmaxf(s.max, chunk_max);
  shift = lse2_shift(m, scale);
  const float factor = fast_exp2(mul_ru(s.max, scale) - shift);  // exp2(-inf) = 0 while empty
  s.sum *= factor;
  s.max = m;
  return factor;
}

// x * factor, where a factor that underflowed to 0 drops the term (also an infinite
// one): the exponentials it was weighted by are all 0 against the new maximum.
MPT_HD float rescaled(float x, float factor) { return factor == 0.0f ? 0.0f : x * factor; }

// The factors that bring a's and b's sums onto their common max.
struct MergeFactors {
  float a;
  float b;
};

MPT_HD MergeFactors lse2_merge_into(Lse2& a, const Lse2& b, float scale) {
  const float m = fmaxf(a.max, b.max);
  const float shift = lse2_shift(m, scale);
  const MergeFactors f{fast_exp2(mul_ru(a.max, scale) - shift), fast_exp2(mul_ru(b.max, scale) - shift)};
  a.sum = a.sum * f.a + b.sum * f.b;
  a.max = m;
  return f;
}

// The shift a state's sum is relative to: log2 Σ exp2(v·scale) = shift + log2(sum).
MPT_HD float lse2_state_shift(const Lse2& s, float scale) { return lse2_shift(s.max, scale); }

// --------------------------------------------------------------------------- per-thread state
// One thread's share of a row: running statistics over the columns of its slots.
struct SoftmaxThreadState {
  Lse2 ce;             // z̃ = z + Δ at scale log2(e)
  float ce_sum;        // Σ z̃ (label smoothing)
  Lse2 student_old;    // z at scale log2(e)/τ, over the old classes
  Lse2 student_new;    // z at scale log2(e)/τ, over the new classes
  Lse2 teacher_old;    // r_old at log2(e)/τ (kind "lm": only its max, for the argmax)
  Lse2 teacher_new;
  float distill_old;   // kl: Σ exp2(r·kt - shift)(r - z) against teacher_old's shift; lm: Σ (z - r)²
  float distill_new;
  float prefix_z;      // max over the columns j < y (the argmax tests: no earlier column
  float prefix_old;    //   reaches the row's maximum)
  float prefix_new;
};

MPT_HD SoftmaxThreadState thread_state_empty() {
  return {lse2_empty(), 0.0f, lse2_empty(), lse2_empty(), lse2_empty(), lse2_empty(), 0.0f, 0.0f, -kInf, -kInf, -kInf};
}

// What every thread of a row knows: the options and the scales.
struct SoftmaxRowConsts {
  SoftmaxRowParams p;
  bool bias_vector;  // Δ comes from the class_bias vector (else: b on the new classes)
  float kt;          // log2(e)/τ
  bool argmax_z;     // the focus mode reads the student's argmax
  bool argmax_r;     // ... the teachers'

  MPT_HD SoftmaxRowConsts(const SoftmaxRowParams& params, bool bias_vector_)
      : p(params),
        bias_vector(bias_vector_),
        kt(params.inv_tau * kLog2e),
        argmax_z(focus_reads_student(params.focus)),
        argmax_r(focus_reads_teacher(params.focus)) {}
};

// The values of one slot, as float32: masked columns hold -inf (Δ: 0), an absent
// stream (no old teacher on a new slot, no new teacher) is never read.
template <int VEC>
struct SlotValues {
  SlotSpan span;
  bool present;  // the slot exists (the last round may not have one for every thread;
                 // a chunk's absent slots come after its present ones)
  float z[VEC];
  float delta[VEC];  // the bias vector's Δ (bias_vector only)
  float r_old[VEC];
  float r_new[VEC];
};

template <int VEC>
MPT_HD float max_of(const float (&v)[VEC]) {
  float m = v[0];
#pragma unroll
  for (int e = 1; e < VEC; ++e) m = fmaxf(m, v[e]);
  return m;
}

// Raises a prefix max (over the columns j < y) with a slot that lies wholly before y;
// slot_max: its values' max. A select, not a branch: the columns of y's own slot before
// y are added once per row instead (TargetValues::*_before, in row_finish).
template <int VEC>
MPT_HD void raise_prefix(float& prefix, const SlotSpan& span, float slot_max, int y) {
  prefix = fmaxf(prefix, span.col0 + VEC <= y ? slot_max : -kInf);
}

// The CE's bias b on a new slot, 0 on an old one (a bias vector's entries are s.delta).
template <int VEC>
MPT_HD float slot_delta(const SoftmaxRowConsts& c, const SlotValues<VEC>& s) {
  return s.span.old_segment ? 0.0f : c.p.new_class_bias;
}

// z̃ = z + Δ at a slot's column e, rounded to float32 once, as the reference's; `delta`
// is slot_delta(c, s), taken once per slot.
template <int VEC>
MPT_HD float slot_biased(const SoftmaxRowConsts& c, const SlotValues<VEC>& s, float delta, int e) {
  return s.z[e] + (c.bias_vector ? s.delta[e] : delta);
}

// Σ over the slot's columns of one distillation stream: kl adds exp2(r·kt - shift) to the
// teacher's sum and exp2(r·kt - shift)·(r - z) to distill (0 where that exponential is 0:
// a masked teacher class adds nothing, as in the reference); lm adds (z - r)² (columns
// tested: a masked column's -inf - -inf would be NaN).
template <int VEC>
MPT_HD void add_distill(const SoftmaxRowConsts& c, const SlotValues<VEC>& s, const float (&r)[VEC], float shift,
                        float& teacher_sum, float& distill) {
  if (c.p.kl) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float p = exp2_against(r[e], c.kt, shift);
      teacher_sum += p;
      distill += p == 0.0f ? 0.0f : p * (r[e] - s.z[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float d = s.z[e] - r[e];
      if (s.span.has(s.span.col0 + e)) distill += d * d;
    }
  }
}

// One teacher's share of a chunk (the old one: its old slots only): its maximum (and
// prefix maximum), one rescale, then add_distill.
template <int VEC, int NV, bool kOld, typename Slot>
MPT_HD void teacher_statistics(Lse2& teacher, float& distill, float& prefix, const SoftmaxRowConsts& c,
                               const Slot& slot, int y) {
  float r_max = -kInf;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const SlotValues<VEC> s = slot(k);
    if (!s.present) break;
    if (kOld && !s.span.old_segment) continue;
    const float (&r)[VEC] = kOld ? s.r_old : s.r_new;
    const float slot_max = max_of(r);
    r_max = fmaxf(r_max, slot_max);
    if (c.argmax_r) raise_prefix<VEC>(prefix, s.span, slot_max, y);
  }
  float shift = 0.0f;
  if (c.p.kl) {
    distill = rescaled(distill, lse2_raise(teacher, r_max, c.kt, shift));
  } else {  // kind "lm": only the maximum, for the argmax
    teacher.max = fmaxf(teacher.max, r_max);
  }
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const SlotValues<VEC> s = slot(k);
    if (!s.present) break;
    if (kOld && !s.span.old_segment) continue;
    add_distill(c, s, kOld ? s.r_old : s.r_new, shift, teacher.sum, distill);
  }
}

// Folds a chunk of NV slots into a thread's state; slot(k) gives the values of the
// chunk's slot k. The streams go one after the other (the student with the CE, then each
// teacher), each as maxima, one rescale, exponentials, so that only a stream's values
// (and the student's) are held at a time; slot(k) is asked again for each (the caller
// converts the values from what it holds). y: the row's target, a valid class.
template <int VEC, int NV, typename Slot>
MPT_HD void chunk_statistics(SoftmaxThreadState& t, const SoftmaxRowConsts& c, const Slot& slot, int y) {
  const SoftmaxRowParams& p = c.p;
  const bool student = p.kl && (p.has_old || p.has_new);

  // the student: its maxima per segment, the CE's, and their exponentials
  if (p.has_ce || student || c.argmax_z) {
    float ce_max = -kInf, z_old_max = -kInf, z_new_max = -kInf;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const SlotValues<VEC> s = slot(k);
      if (!s.present) break;
      const float z_max = max_of(s.z);
      if (p.has_ce) {
        if (c.bias_vector) {
          float biased[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) biased[e] = s.z[e] + s.delta[e];
          ce_max = fmaxf(ce_max, max_of(biased));
        } else {
          ce_max = fmaxf(ce_max, z_max + slot_delta(c, s));  // rounding is monotonic: max(z) + Δ = max(z + Δ)
        }
      }
      if (s.span.old_segment) {
        z_old_max = fmaxf(z_old_max, z_max);
      } else {
        z_new_max = fmaxf(z_new_max, z_max);
      }
      if (c.argmax_z) raise_prefix<VEC>(t.prefix_z, s.span, z_max, y);
    }
    float ce_shift = 0.0f, z_old_shift = 0.0f, z_new_shift = 0.0f;
    if (p.has_ce) lse2_raise(t.ce, ce_max, kLog2e, ce_shift);
    if (student) {
      lse2_raise(t.student_old, z_old_max, c.kt, z_old_shift);
      lse2_raise(t.student_new, z_new_max, c.kt, z_new_shift);
    } else {  // kind "lm": only the maxima, for the argmax
      t.student_old.max = fmaxf(t.student_old.max, z_old_max);
      t.student_new.max = fmaxf(t.student_new.max, z_new_max);
    }
    const bool smoothing = p.has_ce && p.label_smoothing != 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const SlotValues<VEC> s = slot(k);
      if (!s.present) break;
      if (p.has_ce) {
        // z̃ = z + Δ rounded to float32 once, as the reference's, then exponentiated exactly
        const float delta = slot_delta(c, s);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          t.ce.sum += exp2_against(slot_biased(c, s, delta, e), kLog2e, ce_shift);
        }
      }
      if (smoothing) {
        const float delta = slot_delta(c, s);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (s.span.has(s.span.col0 + e)) t.ce_sum += slot_biased(c, s, delta, e);
        }
      }
      // the student over the old classes serves the old source, over all classes the new one
      if (student && (s.span.old_segment || p.has_new)) {
        const float shift = s.span.old_segment ? z_old_shift : z_new_shift;
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum += exp2_against(s.z[e], c.kt, shift);
        if (s.span.old_segment) {
          t.student_old.sum += sum;
        } else {
          t.student_new.sum += sum;
        }
      }
    }
  }
  if (p.has_old) teacher_statistics<VEC, NV, true>(t.teacher_old, t.distill_old, t.prefix_old, c, slot, y);
  if (p.has_new) teacher_statistics<VEC, NV, false>(t.teacher_new, t.distill_new, t.prefix_new, c, slot, y);
}

// Merges two threads' states (the block's fixed tree; any order gives the same result
// up to rounding).
MPT_HD SoftmaxThreadState thread_state_merge(SoftmaxThreadState a, const SoftmaxThreadState& b,
                                             const SoftmaxRowConsts& c) {
  lse2_merge_into(a.ce, b.ce, kLog2e);
  a.ce_sum += b.ce_sum;
  lse2_merge_into(a.student_old, b.student_old, c.kt);
  lse2_merge_into(a.student_new, b.student_new, c.kt);
  if (c.p.kl) {
    const MergeFactors f_old = lse2_merge_into(a.teacher_old, b.teacher_old, c.kt);
    a.distill_old = rescaled(a.distill_old, f_old.a) + rescaled(b.distill_old, f_old.b);
    const MergeFactors f_new = lse2_merge_into(a.teacher_new, b.teacher_new, c.kt);
    a.distill_new = rescaled(a.distill_new, f_new.a) + rescaled(b.distill_new, f_new.b);
  } else {
    a.teacher_old.max = fmaxf(a.teacher_old.max, b.teacher_old.max);
    a.teacher_new.max = fmaxf(a.teacher_new.max, b.teacher_new.max);
    a.distill_old += b.distill_old;
    a.distill_new += b.distill_new;
  }
  a.prefix_z = fmaxf(a.prefix_z, b.prefix_z);
  a.prefix_old = fmaxf(a.prefix_old, b.prefix_old);
  a.prefix_new = fmaxf(a.prefix_new, b.prefix_new);
  return a;
}

// --------------------------------------------------------------------------- the row
// What the gradient sweep needs once a row is reduced, saved by the forward for every
// counted row (kSoftmaxStatFloats float32) so that the backward redoes the sweep alone.
// A softmax enters as the shift its exponentials were taken against (base 2) and its
// sum's reciprocal folded into a coefficient: coef · softmax(v)_j = (coef/Σ) ·
// exp2_against(v_j, scale, shift). (A rounded LSE = shift + log2 Σ subtracted instead lost
// float32 precision in proportion to |v|·scale: a relative error about 1e-4 near 1e4.)
// coef holds the row's share of the reduction (1/count for "mean"), the term's weight
// and focal weight, and S/τ (kl) or 1/K (lm).
struct SourceStats {
  float student_shift;  // kl: the student's s/τ over the source's columns
  float teacher_shift;  // kl: the teacher's r/τ
  float student;        // kl: coef/Σ_student; lm: coef, of (z - r)
  float teacher;        // kl: coef/Σ_teacher; lm: unused
};

struct SoftmaxRowStats {
  float ce_shift;  // z̃ at log2(e)
  float ce_exp;    // coef/Σ, of the softmax
  float ce_coef;   // coef, of the one-hot and the smoothing
  SourceStats old_source;
  SourceStats new_source;
};

constexpr int kSoftmaxStatFloats = 11;
static_assert(sizeof(SoftmaxRowStats) == kSoftmaxStatFloats * sizeof(float), "stats are whole floats");

MPT_HD void store_row_stats(const SoftmaxRowStats& s, float* out) {
  const float values[kSoftmaxStatFloats] = {
      s.ce_shift, s.ce_exp, s.ce_coef,
      s.old_source.student_shift, s.old_source.teacher_shift, s.old_source.student, s.old_source.teacher,
      s.new_source.student_shift, s.new_source.teacher_shift, s.new_source.student, s.new_source.teacher};
  for (int k = 0; k < kSoftmaxStatFloats; ++k) out[k] = values[k];
}

MPT_HD SoftmaxRowStats load_row_stats(const float* in) {
  return {in[0], in[1], in[2], {in[3], in[4], in[5], in[6]}, {in[7], in[8], in[9], in[10]}};
}

// The row's own values at its target y: z_y, Δ_y and the teachers' r_y (0 where absent),
// and each stream's max over the columns of y's slot before y (-inf where none): the part
// of the argmax tests' prefix maxima that raise_prefix leaves out.
struct TargetValues {
  float z;
  float delta;
  float r_old;
  float r_new;
  float z_before;
  float r_old_before;
  float r_new_before;
};

// max of x(j) over the columns j of y's slot (slots of VEC columns) with j < y and j < width.
template <int VEC, typename X>
MPT_HD float max_before_in_slot(int y, int width, const X& x) {
  float m = -kInf;
  for (int j = y / VEC * VEC; j < y && j < width; ++j) m = fmaxf(m, x(j));
  return m;
}

// TargetValues of a row, from accessors of its student z(j) and teachers r_old(j), r_new(j).
template <int VEC, typename Z, typename Old, typename New>
MPT_HD TargetValues target_values(const SoftmaxRowParams& p, const float* class_bias, int y, const Z& z,
                                  const Old& r_old, const New& r_new) {
  const int C = p.num_classes, K = p.num_old_classes;
  TargetValues t{};
  t.z = z(y);
  t.delta = class_bias != nullptr ? class_bias[y] : (y >= K ? p.new_class_bias : 0.0f);
  t.z_before = max_before_in_slot<VEC>(y, C, z);
  t.r_old_before = t.r_new_before = -kInf;
  if (p.has_old && y < K) {
    t.r_old = r_old(y);
    t.r_old_before = max_before_in_slot<VEC>(y, K, r_old);
  }
  if (p.has_new) {
    t.r_new = r_new(y);
    t.r_new_before = max_before_in_slot<VEC>(y, C, r_new);
  }
  return t;
}

// [argmax_{j < width} x_j = y], ties to the lowest index as torch.argmax: x_y is the
// maximum and no column before y reaches it.
MPT_HD bool is_argmax(float x_at_y, float row_max, float prefix_max, int y, int width) {
  return y < width && x_at_y == row_max && (y == 0 || prefix_max < row_max);
}

// w = α + β f (spec §2)
MPT_HD float focal_weight(const SoftmaxRowParams& p, bool teacher_right, bool student_right) {
  bool f = false;
  if (p.focus == kFocusRefCorrect) f = teacher_right;
  if (p.focus == kFocusNegFlip) f = teacher_right && !student_right;
  if (p.focus == kFocusStudentWrong) f = !student_right;
  return f ? p.alpha + p.beta : p.alpha;
}

struct SoftmaxRowResult {
  float loss;
  SoftmaxRowStats stats;
};

// One source's λ w d (its loss term); sets its SourceStats. `student`: the student's
// state over the source's columns.
MPT_HD float source_finish(const SoftmaxRowConsts& c, float weight, float w, int width, const Lse2& student,
                           const Lse2& teacher, float distill, float scale, SourceStats& out) {
  const SoftmaxRowParams& p = c.p;
  const float coef = scale * weight * w;
  if (p.kl) {
    out.student_shift = lse2_state_shift(student, c.kt);
    out.teacher_shift = lse2_state_shift(teacher, c.kt);
    // KL = Σ softmax(a)_j (a_j - c_j) - LSE(a) + LSE(c), a = r/τ, c = z/τ, the LSEs'
    // difference taken shifts first; ∂/∂z_j = (S/τ)(q_j - p_j), 1/Σ folded into the factors
    const float lse_difference =
        (out.teacher_shift - out.student_shift) + (log2f(teacher.sum) - log2f(student.sum));
    const float kl = p.inv_tau * distill / teacher.sum - lse_difference * kLn2;
    const float factor = coef * p.kl_scale * p.inv_tau;
    out.student = factor / student.sum;
    out.teacher = factor / teacher.sum;
    return weight * w * p.kl_scale * kl;
  }
  // (1/(2K)) Σ (z_j - r_j)²; ∂/∂z_j = (z_j - r_j)/K
  out.student = coef / static_cast<float>(width);
  return weight * w * distill / (2.0f * static_cast<float>(width));
}

// The row's loss L_i (spec §3) from its merged state, and the constants of its gradient,
// whose share of the reduction is `scale`; y is a valid class.
MPT_HD SoftmaxRowResult row_finish(const SoftmaxThreadState& s, const SoftmaxRowConsts& c, int y,
                                   const TargetValues& at_y, float scale) {
  const SoftmaxRowParams& p = c.p;
  SoftmaxRowResult result{};
  SoftmaxRowStats& r = result.stats;
  float loss = 0.0f;
  if (p.has_ce) {
    r.ce_shift = lse2_state_shift(s.ce, kLog2e);
    // LSE - z̃_y = (max - z̃_y) + ln Σ exp(z̃ - max), in that order: the parts of size |z̃|
    // cancel first. Σ exp(z̃ - max) is the sum against the shift over the max's own term
    // there, exp2(max·log2(e) - shift), taken as the sweep took it: a row of one class
    // gives exactly 1, so loss 0 (also ln 0 = -inf for a row of -inf, where max is 0).
    const float finite_max = s.ce.max == -kInf ? 0.0f : s.ce.max;
    const float log_sum = log2f(s.ce.sum / exp2_against(finite_max, kLog2e, r.ce_shift)) * kLn2;
    const float eps = p.label_smoothing;
    const float nll = (finite_max - (at_y.z + at_y.delta)) + log_sum;
    // (1-ε)(LSE - z̃_y) + (ε/C) Σ_j (LSE - z̃_j); skipped at ε = 0, where 0 · inf would be
    // NaN on a masked class, as in the reference
    const float ce =
        eps == 0.0f
            ? nll
            : (1.0f - eps) * nll + eps * ((finite_max - s.ce_sum / static_cast<float>(p.num_classes)) + log_sum);
    loss += p.ce_weight * ce;
    r.ce_coef = scale * p.ce_weight;
    r.ce_exp = r.ce_coef / s.ce.sum;
  }
  if (p.has_old || p.has_new) {
    const float z_max_old = s.student_old.max;
    const float z_max_all = fmaxf(s.student_old.max, s.student_new.max);
    Lse2 student_all = s.student_old;
    lse2_merge_into(student_all, s.student_new, c.kt);
    const float prefix_z = fmaxf(s.prefix_z, at_y.z_before);
    if (p.has_old) {
      const float prefix_old = fmaxf(s.prefix_old, at_y.r_old_before);
      const float w = focal_weight(p, is_argmax(at_y.r_old, s.teacher_old.max, prefix_old, y, p.num_old_classes),
                                   is_argmax(at_y.z, z_max_old, prefix_z, y, p.num_old_classes));
      loss += source_finish(c, p.old_weight, w, p.num_old_classes, s.student_old, s.teacher_old, s.distill_old,
                            scale, r.old_source);
    }
    if (p.has_new) {
      const float prefix_new = fmaxf(s.prefix_new, at_y.r_new_before);
      const float w = focal_weight(p, is_argmax(at_y.r_new, s.teacher_new.max, prefix_new, y, p.num_classes),
                                   is_argmax(at_y.z, z_max_all, prefix_z, y, p.num_classes));
      loss += source_finish(c, p.new_weight, w, p.num_classes, student_all, s.teacher_new, s.distill_new,
                            scale, r.new_source);
    }
  }
  result.loss = loss;
  return result;
}

// One KL source's (S/τ)(q_j - p_j) times the upstream gradient, added to a slot's g.
template <int VEC>
MPT_HD void add_kl_gradient(const SoftmaxRowConsts& c, const SourceStats& source, float upstream,
                            const float (&z)[VEC], const float (&r)[VEC], float (&g)[VEC]) {
  const float student = upstream * source.student, teacher = upstream * source.teacher;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    g[e] += student * exp2_against(z[e], c.kt, source.student_shift) -
            teacher * exp2_against(r[e], c.kt, source.teacher_shift);
  }
}

// The gradient of one slot's columns: Σ over the terms of coef · ∂/∂z_j (the coefficients
// carry everything but the upstream gradient, which multiplies them: `upstream`).
template <int VEC>
MPT_HD void slot_gradient(const SoftmaxRowConsts& c, const SoftmaxRowStats& r, float upstream, int y,
                          const SlotValues<VEC>& s, float (&g)[VEC]) {
  const SoftmaxRowParams& p = c.p;
#pragma unroll
  for (int e = 0; e < VEC; ++e) g[e] = 0.0f;
  if (p.has_ce) {
    // coef (softmax(z̃)_j - ε/C - [j = y](1 - ε)), the softmax's 1/Σ folded into ce_exp
    const float exp_coef = upstream * r.ce_exp;
    const float coef = upstream * r.ce_coef;
    const float eps = p.label_smoothing;
    const float base = -coef * eps / static_cast<float>(p.num_classes);
    const float delta = slot_delta(c, s);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      g[e] = exp_coef * exp2_against(slot_biased(c, s, delta, e), kLog2e, r.ce_shift) + base;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (s.span.col0 + e == y) g[e] -= coef * (1.0f - eps);
    }
  }
  // per slot, never per element: which sources the slot has (the old one only on old slots)
  const bool old_here = p.has_old && s.span.old_segment;
  const SourceStats& o = r.old_source;
  const SourceStats& n = r.new_source;
  if (p.kl) {
    // (S/τ)(q_j - p_j) per source. Where both are needed, the student's exponential
    // against the old columns' shift serves both, times 2^(shift_old - shift_all) <= 1
    if (old_here && p.has_new) {
      const float student = upstream * (o.student + n.student * fast_exp2(o.student_shift - n.student_shift));
      const float teacher_old = upstream * o.teacher, teacher_new = upstream * n.teacher;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        g[e] += student * exp2_against(s.z[e], c.kt, o.student_shift) -
                teacher_old * exp2_against(s.r_old[e], c.kt, o.teacher_shift) -
                teacher_new * exp2_against(s.r_new[e], c.kt, n.teacher_shift);
      }
    } else if (old_here) {
      add_kl_gradient(c, o, upstream, s.z, s.r_old, g);
    } else if (p.has_new) {
      add_kl_gradient(c, n, upstream, s.z, s.r_new, g);
    }
  } else {
    if (old_here) {
      const float coef = upstream * o.student;
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] += coef * (s.z[e] - s.r_old[e]);
    }
    if (p.has_new) {
      const float coef = upstream * n.student;
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] += coef * (s.z[e] - s.r_new[e]);
    }
  }
}

}  // namespace mpt
