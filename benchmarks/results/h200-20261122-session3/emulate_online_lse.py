"""The float32 log-sum-exp finding of the H200 run (issue 3), reproduced without a GPU.

NumPy emulation of the Triton softmax kernel's online log-sum-exp (base 2, per-thread
running max m and sum l over blocks of 256 x 4 classes, then the threads combined) on
rows like the failing test's (C = 131072, 2·randn logits plus a randn class bias, every
third row with one planted maximum). Each of the three places where ``m·scale`` meets a
subtraction is computed either fused (fma: the exact product, what the compiler emits
for ``m * scale - shift``) or with the product rounded first (what ``fm.mul_rn`` forces).
Fusing the rescale factor exp2(m·scale - round(m_new·scale)) makes it 2^ε instead of 1
while the max stays, compounding over the row's 128 blocks.

    python emulate_online_lse.py
"""
import numpy as np

f32 = np.float32
SCALE = f32(1.4426950408889634)  # log2(e): the CE's scale
C, ROWS, VEC = 131072, 256, 4
BLOCK = ROWS * VEC


def shifted(a, shift, fused):
    """a·SCALE - shift in float32: fused (exact product) or the product rounded first."""
    if fused:
        return (a.astype(np.float64) * float(SCALE) + shift).astype(f32)
    return ((a * SCALE).astype(f32) + shift).astype(f32)


def online_lse2(v, fused_rescale, fused_terms, fused_combine):
    m = np.full(ROWS, -np.inf, f32)
    l = np.zeros(ROWS, f32)
    for start in range(0, C, BLOCK):
        x = v[start:start + BLOCK].reshape(ROWS, VEC)
        m_new = np.maximum(m, x.max(1))
        shift = (m_new * SCALE).astype(f32)
        with np.errstate(invalid="ignore"):
            rescale = np.exp2(shifted(m, -shift, fused_rescale)).astype(f32)
        rescale = np.where(np.isneginf(m), f32(0), rescale)
        terms = np.exp2(shifted(x, -shift[:, None], fused_terms)).astype(f32)
        l = (l * rescale + terms.sum(1, dtype=f32)).astype(f32)
        m = m_new
    row_shift = f32(m.max() * SCALE)
    factor = np.exp2(shifted(m, -row_shift, fused_combine)).astype(f32)
    return f32(row_shift + f32(np.log2((l * factor).astype(f32).sum(dtype=f32))))


def main():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        z = (2 * rng.standard_normal(C)).astype(f32)
        if i % 3 == 0:
            z[rng.integers(C)] = f32(13.2)
        v = (z + rng.standard_normal(C).astype(f32)).astype(f32)
        exact = np.log2(np.exp(v.astype(np.float64) - 20).sum()) + 20 / np.log(2)
        rows.append((v, exact))
    for fused in [(True, True, True), (False, True, False), (False, False, False)]:
        worst = max(abs(float(online_lse2(v, *fused)) - exact) for v, exact in rows)
        print(f"fused rescale/terms/combine = {fused}: max |log2-sum-exp error| over {len(rows)} rows {worst:.3g}")


if __name__ == "__main__":
    main()
