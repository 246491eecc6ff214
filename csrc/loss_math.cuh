// The per-element and per-row math of every loss (LOSSES.md), written once.
//
// Every function here is plain C++ marked __host__ __device__: the CUDA kernels call
// them on the GPU, and host_math.cpp calls the very same functions on CPU buffers so
// that tests/test_cuda_host_math.py can check them against the reference without a
// GPU. This file holds the primitives, the multi-label elements and the rules both
// families share; the softmax family's row math is softmax_math.cuh.
//
// The gradient of an element is one function (slot_gradient, multilabel_gradient) that
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
constexpr float kFloatMax = 3.40282347e+38f;  // FLT_MAX

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
// exp(γ log(1 - p)), smooth also where 1 - p underflows. kFocal = (γ != 0), a template
// parameter so that the kernels pay nothing for it: for γ = 0 the factor is 1 (as
// torch.pow(0., 0.)), also at s = +inf, where 0 · log(1 - p) would be NaN. Mirrored
// (s -> -s, which negates the derivative) it is SPLC's negative term.
template <bool kFocal>
MPT_HD LossAndGrad focal_positive(const SigmoidForms& f, float gamma) {
  if (!kFocal) return {-f.log_p, -f.one_minus_p};
  const float focal = fast_exp2((gamma * kLog2e) * f.log_one_minus_p);  // γ·log2(e): hoisted out of loops
  return {-focal * f.log_p, focal * (gamma * f.p * f.log_p - f.one_minus_p)};
}

// Hill (spec §4). positive: -(1-q)^γ log q, q = σ(x - m); negative: (λ - p) p², p = σ(x),
// with ∂/∂x = (2λ - 3p) p² (1 - p)
template <bool kFocal>
MPT_HD LossAndGrad hill_element(float x, bool positive, float lamb, float margin, float gamma) {
  const SigmoidForms f = sigmoid_forms(positive ? x - margin : x);
  if (positive) return focal_positive<kFocal>(f, gamma);
  const float p = f.p;
  const float p_squared = p * p;
  return {(lamb - p) * p_squared, (2.0f * lamb - 3.0f * p) * p_squared * f.one_minus_p};
}

// SPLC (spec §5). The margin follows the original label; from change_epoch on a negative
// with σ(x) > τ, that is x > logit(τ), counts as positive: a hard decision, taken on the
// logit (flip_logit: _validation.splc_flip_logit, +inf before change_epoch) so that it
// does not depend on how σ is approximated. t' = 0 is the positive term at -x (the focal
// term of σ(-x) = 1 - p, -p^γ log(1 - p)) with the derivative negated.
template <bool kFocal>
MPT_HD LossAndGrad splc_element(float x, bool positive, float flip_logit, float margin, float gamma) {
  const float shifted = positive ? x - margin : x;
  const bool as_positive = positive || shifted > flip_logit;
  const LossAndGrad r = focal_positive<kFocal>(sigmoid_forms(as_positive ? shifted : -shifted), gamma);
  return {r.loss, as_positive ? r.grad : -r.grad};
}

struct MultilabelParams {
  bool splc;               // else Hill
  float lamb;              // Hill
  float margin;
  float gamma;
  float flip_logit;        // SPLC: a negative with x > flip_logit counts as positive
};

template <bool kFocal>
MPT_HD LossAndGrad multilabel_element(float x, bool positive, const MultilabelParams& p) {
  return p.splc ? splc_element<kFocal>(x, positive, p.flip_logit, p.margin, p.gamma)
                : hill_element<kFocal>(x, positive, p.lamb, p.margin, p.gamma);
}

// The same, γ = 0 or not decided at run time (the host's checks; kernels take kFocal).
MPT_HD LossAndGrad multilabel_element(float x, bool positive, const MultilabelParams& p) {
  return p.gamma != 0.0f ? multilabel_element<true>(x, positive, p) : multilabel_element<false>(x, positive, p);
}

// The logits' gradient of one element: upstream · scale · ∂ℓ/∂x, scale = 1/(N·C) for
// "mean", else 1. The forward stores it for upstream = 1; the backward recomputes it
// where the upstream gradient is not 1.
MPT_HD float multilabel_gradient(const LossAndGrad& element, float scale, float upstream) {
  return upstream * (scale * element.grad);
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
