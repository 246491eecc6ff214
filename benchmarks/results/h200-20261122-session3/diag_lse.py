"""(Run from the repository root, on a GPU.) Why test_gpu_realistic_shapes[131072-float32] (kind='lm', class_bias, reduction='none') fails:
which rows, and whether triton or the float32 reference is off the float64 reference."""
import os
import sys
import torch
sys.path.insert(0, "tests")
import test_triton_softmax as T
import mpt_kernels.reference as R

n, c = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4096, 131072)
k = c // 2 + 3
z, y, old, new = T.make_inputs(130, n=n, c=c, k=k, dtype=torch.float32, ignore_rows=(0, 7, 99))
for trial in range(3):
    bias = torch.randn(c, device=z.device, generator=torch.Generator(device=z.device).manual_seed(trial))
    kw = dict(kind="lm", class_bias=bias, reduction="none")
    lt, gt = T.run("mpt_loss", z, y, old, new, backend="triton", **kw)
    lr, gr = T.run("mpt_loss", z, y, old, new, backend="reference", **kw)
    scale = gr.abs().max().item()
    tol = float(os.environ.get('DIAG_TOL', '2e-5'))
    bad = (gt - gr).abs() > tol * scale + tol * gr.abs()
    rows = bad.any(1).nonzero().flatten().tolist()
    print(f"trial {trial}: {int(bad.sum())} bad elements in rows {rows[:10]}; loss max diff {(lt-lr).abs().max().item():.3g}")
    if not rows:
        continue
    z64, o64, n64, b64 = z.double(), old.double(), new.double(), bias.double()
    l64, g64 = T.run("mpt_loss", z64, y, o64, n64, backend="reference", kind="lm", class_bias=b64, reduction="none")
    for i in rows[:4]:
        yi = y[i].item()
        d = (gt[i] - gr[i]).double()
        cols = bad[i].nonzero().flatten().tolist()
        print(f" row {i}: y={yi} argmax new={new[i].argmax().item()} old={old[i].argmax().item()} z[:k]={z[i,:k].argmax().item()} z={z[i].argmax().item()}")
        print(f"   loss triton {lt[i].item():.9g} ref32 {lr[i].item():.9g} ref64 {l64[i].item():.9g}")
        print(f"   bad cols {cols[:6]}; grad triton {gt[i, cols[:3]].tolist()} ref32 {gr[i, cols[:3]].tolist()} ref64 {g64[i, cols[:3]].tolist()}")
        print(f"   row |triton-ref64| max {(gt[i].double()-g64[i]).abs().max().item():.3g}, |ref32-ref64| max {(gr[i].double()-g64[i]).abs().max().item():.3g}")
        for name, v in (("z-new", (z[i] - new[i]).double()), ("z[:k]-old", torch.cat([(z[i, :k] - old[i]).double(), torch.zeros(c - k, dtype=torch.float64, device=z.device)])), ("softmax", torch.softmax(z64[i] + b64, 0))):
            coef = (d * v).sum() / (v * v).sum()
            resid = (d - coef * v).abs().max().item()
            print(f"   diff ~ {coef.item():.4g} * ({name}): residual {resid:.3g} of {d.abs().max().item():.3g}")

# ---- second look (written after call 3, not yet run on a GPU): the CE's log-sum-exp the
# forward kernel saved for each row (base 2, stats[:, 0]) against float64, and the gradient
# (the stats layout up to 188e381: since then stats[:, 0] is the CE's shift, not its LSE,
# so this part needs LSE = shift + log2(Σ) rebuilt before it means anything)
# the forward wrote for an upstream gradient of 1 (no backward recomputation involved).
from mpt_kernels.backends import triton_softmax as TS

bias = torch.randn(c, device=z.device, generator=torch.Generator(device=z.device).manual_seed(0))
args = R.mpt_loss_args(z, y, old, new, new_class_bias=0.0, num_old_classes=None, class_bias=bias, kind="lm",
                       tau=5.0, alpha=1.0, beta=5.0, focus="ref_correct", scale_by_tau_sq=False, ce_weight=1.0,
                       old_weight=None, new_weight=None, label_smoothing=0.0, ignore_index=-100, reduction="none")
_, (grad1, stats, *_) = TS._forward(args, True)
lse64 = torch.logsumexp(z.double() + bias.double(), dim=1) * 1.4426950408889634
counted = y != -100
err = (stats[:, 0].double() - lse64).where(counted, torch.zeros_like(lse64))
worst = err.abs().argsort(descending=True)[:5].tolist()
print(f"saved CE LSE (base 2) - float64: max |err| {err.abs().max().item():.3g}, median {err.abs().median().item():.3g}; "
      f"worst rows {worst} errors {[round(err[i].item(), 9) for i in worst]}")
_, g1_64 = T.run("mpt_loss", z.double(), y, old.double(), new.double(), backend="reference", upstream="one",
                 kind="lm", class_bias=bias.double(), reduction="none")
d1 = (grad1.double() - g1_64)
print(f"forward-written gradient (upstream 1) - float64: max |err| {d1.abs().max().item():.3g} "
      f"at row {d1.abs().amax(1).argmax().item()}; scale {g1_64.abs().max().item():.3g}")
