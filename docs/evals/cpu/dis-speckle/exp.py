"""Scratch experiment: train a DiS backbone on MNIST (optionally downsampled), score samples."""
import argparse, copy, math, time, json, sys
import torch, torch.nn.functional as F
from ssmkit.data.images import load_pixel_sequences, stratified_split
from ssmkit.models.diffusion import GaussianDiffusion
from ssmkit.models.dis import DiffusionBackbone, DiSConfig
from ssmkit.evals._digit_scorer import train_scorer, predict, frechet_distance
from ssmkit.evals.dis import encode_grid, decode_grid

p = argparse.ArgumentParser()
p.add_argument("--mixer", default="attention"); p.add_argument("--side", type=int, default=14)
p.add_argument("--patch", type=int, default=2); p.add_argument("--d", type=int, default=64)
p.add_argument("--depth", type=int, default=3); p.add_argument("--steps", type=int, default=1000)
p.add_argument("--batch", type=int, default=64); p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--ema", type=float, default=0.995); p.add_argument("--guidance", type=float, default=3.0)
p.add_argument("--ff", type=int, default=0); p.add_argument("--tag", default="run")
p.add_argument("--kw", default="{}")
a = p.parse_args()
torch.manual_seed(0)
im = load_pixel_sequences("mnist")
x = torch.from_numpy(im.pixels * 2 - 1).view(-1, 1, 28, 28)
if a.side != 28:
    x = F.interpolate(x, size=(a.side, a.side), mode="area")
y = torch.from_numpy(im.labels)
tr, te = stratified_split(im.labels, 0.2, 0)
scorer = train_scorer(x[tr], y[tr], epochs=5, seed=0)
tp, tf = predict(scorer, x[te]); print("scorer", float((tp == y[te]).float().mean()), flush=True)
cfg = None if a.mixer == "cnn" else DiSConfig(image_size=a.side, patch_size=a.patch, d_model=a.d, depth=a.depth, mixer=a.mixer, d_state=16,
                num_heads=max(1, a.d // 16), ff_width=a.ff, **json.loads(a.kw))
class TinyUNet(torch.nn.Module):
    """Reference denoiser: a small conv net with time+class embeddings added to every feature map."""
    def __init__(s, c=48):
        super().__init__()
        from ssmkit.models.dis import timestep_embedding
        s.te = timestep_embedding; s.c = c
        s.t = torch.nn.Sequential(torch.nn.Linear(c, c), torch.nn.SiLU(), torch.nn.Linear(c, c)); s.y = torch.nn.Embedding(11, c)
        s.inp = torch.nn.Conv2d(1, c, 3, padding=1)
        s.d1 = torch.nn.Conv2d(c, c, 3, padding=1); s.d2 = torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        s.m = torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1); s.u = torch.nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        s.o1 = torch.nn.Conv2d(2 * c, c, 3, padding=1); s.out = torch.nn.Conv2d(c, 1, 3, padding=1)
        s.p1 = torch.nn.Linear(c, c); s.p2 = torch.nn.Linear(c, 2 * c)
    def forward(s, x, t, y):
        e = s.t(s.te(t, s.c)) + s.y(y); a = F.silu
        h1 = a(s.d1(a(s.inp(x))) + s.p1(e)[:, :, None, None])
        h2 = a(s.m(a(s.d2(h1)) + s.p2(e)[:, :, None, None]))
        return s.out(a(s.o1(torch.cat([s.u(h2), h1], 1))))
net = TinyUNet() if a.mixer == "cnn" else DiffusionBackbone(cfg)
print(a, sum(p.numel() for p in net.parameters()), flush=True)
diff = GaussianDiffusion(1000, null_class=10)
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.0)
warm = max(1, a.steps // 20)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
ema = copy.deepcopy(net).requires_grad_(False)
g = torch.Generator().manual_seed(0)
xtr, ytr = x[tr], y[tr]
t0 = time.time(); acc = 0
for step in range(1, a.steps + 1):
    rows = torch.randint(0, len(xtr), (a.batch,), generator=g)
    loss = diff.training_loss(net, xtr[rows], ytr[rows], p_uncond=0.1, generator=g)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); sch.step()
    dec = min(a.ema, (1 + step) / (10 + step))
    with torch.no_grad(): torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - dec)
    acc += loss.item()
    if step % max(1, a.steps // 10) == 0:
        print(f"step {step} loss {acc / max(1, a.steps // 10):.4f} {time.time() - t0:.0f}s", flush=True); acc = 0
ema.eval(); torch.save(ema.state_dict(), f"{a.tag}.pt")
# per-t loss on held out
with torch.no_grad():
    gg = torch.Generator().manual_seed(5)
    xs, ys = x[te][:256], y[te][:256]
    prof = {}
    for t in (10, 50, 200, 500, 900):
        tt = torch.full((len(xs),), t); n = torch.randn(xs.shape, generator=gg)
        prof[t] = F.mse_loss(ema(diff.q_sample(xs, tt, n), tt, ys), n).item()
    print("per-t loss", {k: round(v, 4) for k, v in prof.items()}, flush=True)
    labels = torch.arange(10).repeat_interleave(20)
    res = {}
    for gdc in (1.0, a.guidance):
        s = diff.ddim_sample(ema, (200, 1, a.side, a.side), labels, steps=50, guidance=gdc, generator=torch.Generator().manual_seed(1))
        pr, fe = predict(scorer, s)
        res[gdc] = (float((pr == labels).float().mean()), frechet_distance(fe, tf))
        print(f"guidance {gdc}: acc {res[gdc][0]:.3f} frechet {res[gdc][1]:.1f}", flush=True)
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    grid = s.view(10, 20, 1, a.side, a.side)[:, :8]
    m = ((grid.clamp(-1, 1) + 1) * 127.5)[:, :, 0].permute(0, 2, 1, 3).reshape(10 * a.side, 8 * a.side)
    plt.imsave(f"{a.tag}.png", m.numpy(), cmap="gray", vmin=0, vmax=255)
print("total", time.time() - t0)
