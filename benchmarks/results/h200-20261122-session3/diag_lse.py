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
