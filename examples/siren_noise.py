"""How far can a SIREN's output move when its weights carry initialization-scale noise?

A SIREN (sine layers, ``models.siren``) is fitted to a 1-D signal. Initialization schemes for
SIRENs perturb the uniform initial weights with Gaussian noise whose standard deviation is a
fraction ``noise`` of each layer's uniform bound. Here every weight entry of every layer moves by
at most ``3 noise`` times its layer's bound (3 standard deviations, per layer, element-wise), and
the output at a few coordinates is bounded with CROWN and alpha-CROWN; beside the bounds: the
range seen over random noisy models and the range a joint PGD attack reaches. Then the
coordinates move in a box too (both at once).

Run: python examples/siren_noise.py   (about 20 s on one core)
"""
import math
import sys
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the models/ zoo
from models import siren                                          # noqa: E402

from verifier import BoundedModel, Box                             # noqa: E402
from verifier.weights import WeightPerturbation                    # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)

# 1. fit the signal f(t) = sin(2 pi t) + 0.5 sin(7 pi t) exp(-t^2) on [-1, 1]
t = torch.linspace(-1, 1, 256).unsqueeze(1)
f = torch.sin(2 * math.pi * t) + 0.5 * torch.sin(7 * math.pi * t) * torch.exp(-t ** 2)
net = siren(in_dim=1, hidden=32, depth=3, out=1, omega0=30.0)
opt = torch.optim.Adam(net.parameters(), lr=5e-4)
for _ in range(400):
    opt.zero_grad()
    loss = ((net(t) - f) ** 2).mean()
    loss.backward()
    opt.step()
net.eval()
print(f"fitted: mean squared error {loss.item():.2e} on 256 coordinates")

model = BoundedModel(net, input_shape=(1,))
coords = torch.tensor([[-0.8], [-0.3], [0.0], [0.45], [0.9]])
weights0 = {k: v.detach() for k, v in net.named_parameters()}


def empirical(radii, delta, n=2000, steps=60):
    """(min, max) per coordinate of the output over random models and coordinates in the sets
    (uniform in the boxes) and a joint signed-gradient attack from random starts."""
    lo = torch.full((len(coords),), math.inf)
    hi = -lo
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(n // 100):
            ps = {k: v + radii.get(k, 0.0) * (2 * torch.rand((100, *v.shape), generator=gen) - 1)
                  for k, v in weights0.items()}
            c = coords + delta * (2 * torch.rand((100, *coords.shape), generator=gen) - 1)
            y = torch.vmap(lambda p, x: functional_call(net, p, (x,)))(ps, c)[..., 0]  # [100, 5]
            lo, hi = torch.minimum(lo, y.min(0).values), torch.maximum(hi, y.max(0).values)
    for sign in (1.0, -1.0):        # maximize (+1) and minimize (-1) each coordinate's output
        ps = {k: (v + radii.get(k, 0.0) * (2 * torch.rand(v.shape, generator=gen) - 1))
              .expand(len(coords), *v.shape).clone().requires_grad_() for k, v in weights0.items()}
        c = coords.clone().requires_grad_()
        for it in range(steps):
            y = torch.vmap(lambda p, x: functional_call(net, p, (x,)))(ps, c)[:, 0]
            grads = torch.autograd.grad((sign * y).sum(), [*ps.values(), c])
            size = 0.25 * (1 - it / steps) + 0.02
            with torch.no_grad():
                for (k, p), g in zip(ps.items(), grads):
                    r = radii.get(k, 0.0)
                    p.add_(size * r * g.sign()).clamp_(weights0[k] - r, weights0[k] + r)
                c.add_(size * delta * grads[-1].sign()).clamp_(coords - delta, coords + delta)
        with torch.no_grad():
            y = torch.vmap(lambda p, x: functional_call(net, p, (x,)))(ps, c)[:, 0]
        lo, hi = torch.minimum(lo, y), torch.maximum(hi, y)
    return lo, hi


def show(title, radii, delta):
    w = WeightPerturbation(None, radii) if radii else None
    x = Box(coords - delta, coords + delta) if delta else coords
    lo, hi = empirical(radii, delta)
    print(f"\n{title}")
    print("      t    f(t)   CROWN [lower, upper]    alpha-CROWN [lower, upper]    "
          "seen (samples + attack)")
    res = {m: model.bounds(x, m, weights=w) for m in ("crown", "alpha-crown")}
    y0 = net(coords).detach()[:, 0]
    for i in range(len(coords)):
        cl, cu = res["crown"].lower[i, 0].item(), res["crown"].upper[i, 0].item()
        al, au = res["alpha-crown"].lower[i, 0].item(), res["alpha-crown"].upper[i, 0].item()
        assert cl <= lo[i] + 1e-5 and hi[i] <= cu + 1e-5 and al <= lo[i] + 1e-5 and hi[i] <= au + 1e-5
        print(f"{coords[i, 0].item():7.2f} {y0[i].item():7.3f}   [{cl:7.3f}, {cu:7.3f}]"
              f"      [{al:7.3f}, {au:7.3f}]          [{lo[i].item():7.3f}, {hi[i].item():7.3f}]")


for noise in (0.001, 0.003):
    show(f"weights: every entry within 3 x {noise} x its layer's init bound",
         net.noise_radii(noise, k=3.0), 0.0)
show("coordinates: t +- 0.005 (weights fixed)", {}, 0.005)
show("both: weights (noise 0.001) and t +- 0.005", net.noise_radii(0.001, k=3.0), 0.005)
