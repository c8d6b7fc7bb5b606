"""A small zoo of architectures, as plain PyTorch code (no weights).

Each function returns a freshly initialized ``nn.Module`` in eval mode that the verifier can
trace with torch.fx. The layers used are all in the supported-operator table of the README, so
each model is also a small end-to-end test of the graph builder and the bound rules:

* :func:`mlp`: fully connected (Linear + activation), flattening its input first;
* :func:`small_cnn`: two strided convolutions, then two dense layers (optionally with pooling);
* :func:`cnn_cert`: a CNN sized for certified training on a CPU (optionally with BatchNorm);
* :func:`resnet_block_net`: a stem convolution, residual blocks (conv, BatchNorm, skip
  connection), global average pooling and a dense head;
* :func:`vit_tiny`: a small vision transformer (patch embedding, pre-LayerNorm encoder blocks
  with softmax self-attention written out and a ReLU or GELU MLP, mean over tokens, a linear head);
* :func:`vit_lipschitz`: a vision transformer built for a certified Lipschitz bound (1/d
  attention logits, convex residuals, no LayerNorm; see :class:`LipschitzViT`);
* :func:`siren`: a sinusoidal representation network (``sin(omega0 (W x + b))`` layers, SIREN
  initialization) for fitting signals of low-dimensional coordinates.

Initialize the weights yourself (``torch.manual_seed`` before the call) when you need
reproducible numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}: use one of {sorted(_ACTIVATIONS)}") from None


def mlp(in_dim: int, hidden: int | Sequence[int], out: int, activation: str = "relu") -> nn.Module:
    """``Flatten -> [Linear -> activation] * len(hidden) -> Linear``.

    ``in_dim``: the number of input features (inputs of any shape with that many elements per
    sample are flattened); ``hidden``: one width or a list of widths; ``out``: the number of
    outputs; ``activation``: "relu", "leaky_relu" (slope 0.1), "sigmoid" or "tanh".
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_dim
    for w in widths:
        layers += [nn.Linear(d, w), _activation(activation)]
        d = w
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers).eval()


def small_cnn(in_ch: int = 1, n_classes: int = 10, input_size: int = 28, width: int = 8,
              pool: str | None = None) -> nn.Module:
    """``Conv(3x3, stride 2) -> ReLU -> Conv(3x3, stride 2) -> ReLU -> [pool] -> Flatten ->
    Linear(64) -> ReLU -> Linear(n_classes)``.

    ``input_size``: the height (= width) of the square input ``[in_ch, input_size, input_size]``;
    ``width``: channels of the first convolution (the second has twice as many); ``pool``: None,
    "max" or "avg" (a 2x2, stride 2 pooling before the dense layers).
    """
    if pool not in (None, "max", "avg"):
        raise ValueError(f"pool must be None, 'max' or 'avg', got {pool!r}")
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
    ]
    side = (input_size + 1) // 2
    side = (side + 1) // 2
    if pool is not None:
        layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
        side //= 2
    if side < 1:
        raise ValueError(f"input_size={input_size} is too small for this network")
    layers += [nn.Flatten(), nn.Linear(2 * width * side * side, 64), nn.ReLU(),
               nn.Linear(64, n_classes)]
    return nn.Sequential(*layers).eval()


class ResidualBlock(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``: two 3x3 convolutions, same shape in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNetBlockNet(nn.Module):
    """A stem convolution, ``n_blocks`` residual blocks, global average pooling, a dense head."""

    def __init__(self, in_ch: int, n_classes: int, width: int, n_blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(n_blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.blocks(x)
        return self.fc(self.pool(x).flatten(1))


def resnet_block_net(in_ch: int = 3, n_classes: int = 10, width: int = 8,
                     n_blocks: int = 2) -> nn.Module:
    """A small residual network (see :class:`ResNetBlockNet`) for inputs ``[in_ch, H, W]`` of any
    size (the global average pooling makes the head independent of H and W).

    BatchNorm layers are in eval mode with their initial running statistics (mean 0, variance
    1); load or set statistics before bounding a trained model.
    """
    return ResNetBlockNet(in_ch, n_classes, width, n_blocks).eval()


def cnn_cert(in_ch: int = 1, n_classes: int = 10, input_size: int = 28, width: int = 16,
             fc: int = 256, bn: bool = False, extra_convs: int = 0) -> nn.Module:
    """A CNN for certified (IBP / CROWN-IBP) training on a CPU, in the shape of the "small" and
    "medium" models of the IBP papers: ``Conv(4x4, stride 2) -> ReLU -> Conv(4x4, stride 2) ->
    ReLU -> Flatten -> Linear(fc) -> ReLU -> Linear(n_classes)``, with a BatchNorm after each
    convolution and the hidden dense layer when ``bn``.

    ``width``: channels of the first convolution (the second has twice as many); an input of
    side s becomes s/2, then s/4 (28 -> 14 -> 7, with padding 1). ``extra_convs``: that many
    ``Conv(3x3, stride 1, padding 1) -> [BatchNorm] -> ReLU`` after each strided convolution
    (same channels and side), for a deeper model.
    """
    if extra_convs < 0:
        raise ValueError(f"extra_convs={extra_convs} must be 0 or more")
    side = (input_size + 2 - 4) // 2 + 1
    side = (side + 2 - 4) // 2 + 1
    if side < 1:
        raise ValueError(f"input_size={input_size} is too small for this network")
    norm2 = (lambda c: [nn.BatchNorm2d(c)]) if bn else (lambda c: [])
    norm1 = (lambda c: [nn.BatchNorm1d(c)]) if bn else (lambda c: [])

    def same(c: int) -> list[nn.Module]:  # the extra 3x3 convolutions of one stage
        return [m for _ in range(extra_convs)
                for m in (nn.Conv2d(c, c, 3, stride=1, padding=1), *norm2(c), nn.ReLU())]

    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, width, 4, stride=2, padding=1), *norm2(width), nn.ReLU(), *same(width),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), *norm2(2 * width), nn.ReLU(),
        *same(2 * width),
        nn.Flatten(), nn.Linear(2 * width * side * side, fc), *norm1(fc), nn.ReLU(),
        nn.Linear(fc, n_classes),
    ]
    return nn.Sequential(*layers).eval()


# name -> (builder, keyword arguments of a small instance, per-sample input shape)
class _Attention(nn.Module):
    """Multi-head self-attention written out: ``softmax(q k^T / sqrt(d)) v``, then a projection."""

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__()
        self.heads, self.d, self.tokens = heads, dim // heads, tokens
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sizes from the module, not from x.shape: the ONNX export then has no Shape ops
        t, dim = self.tokens, self.heads * self.d
        qkv = self.qkv(x)
        q, k, v = (qkv[..., i * dim:(i + 1) * dim].reshape(-1, t, self.heads, self.d).transpose(1, 2)
                   for i in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(-1, t, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, tokens: int, mlp: int, activation: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = _Attention(dim, heads, tokens)
        act = nn.GELU() if activation == "gelu" else _activation(activation)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), act, nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, in_ch: int, n_classes: int, input_size: int, patch: int, dim: int,
                 depth: int, heads: int, mlp: int, activation: str):
        super().__init__()
        self.embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (input_size // patch) ** 2, dim) * 0.02)
        tokens = (input_size // patch) ** 2
        self.blocks = nn.Sequential(*[_Block(dim, heads, tokens, mlp, activation)
                                      for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x.mean(1))


def vit_tiny(in_ch: int = 1, n_classes: int = 10, input_size: int = 28, patch: int = 7,
             dim: int = 32, depth: int = 2, heads: int = 2, mlp: int = 64,
             activation: str = "relu") -> nn.Module:
    """A vision transformer small enough to bound on a CPU: ``(input_size / patch)^2`` tokens of
    width ``dim``, ``depth`` pre-LayerNorm blocks of ``heads``-head softmax attention and an MLP
    (``activation``: relu, gelu, ...), LayerNorm, the mean over tokens, a linear head."""
    return ViT(in_ch, n_classes, input_size, patch, dim, depth, heads, mlp, activation).eval()


class _LipAttention(nn.Module):
    """Self-attention for a certified Lipschitz bound: ``softmax(q k^T / d) v`` (logits scaled by
    ``1/d``, not ``1/sqrt(d)``), separate bias-free ``q, k, v, o`` matrices (each one spectrally
    constrained on its own)."""

    def __init__(self, dim: int, heads: int, tokens: int, scale: float = 1.0):
        super().__init__()
        self.heads, self.d, self.tokens, self.scale = heads, dim // heads, tokens, float(scale)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h, d = self.tokens, self.heads, self.d
        q, k, v = (m(x).reshape(-1, t, h, d).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) * (self.scale / d), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(-1, t, h * d))


class _LipBlock(nn.Module):
    """``x <- (1 - a) x + a att(x)``, then ``x <- (1 - a) x + a mlp(x)``: convex residual
    combinations (Lipschitz ``(1 - a) + a L_branch``), no LayerNorm, a ReLU MLP."""

    def __init__(self, dim: int, heads: int, tokens: int, mlp: int, alpha: float,
                 att_scale: float = 1.0):
        super().__init__()
        self.alpha = float(alpha)
        self.att = _LipAttention(dim, heads, tokens, att_scale)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.ReLU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        x = (1 - a) * x + a * self.att(x)
        return (1 - a) * x + a * self.mlp(x)


class LipschitzViT(nn.Module):
    """A vision transformer whose L2 Lipschitz constant on a bounded input domain is certified
    by composition (``verifier.analysis.lipschitz.lipschitz_constant(..., domain=(0, 1))``):
    a patch embedding (non-overlapping convolution), a learned position embedding, ``depth``
    blocks of ``_LipBlock``, the tokens flattened (``pool="flatten"``: the head sees every
    token, an operator of norm 1) or averaged (``"mean"``, norm ``1/sqrt(tokens)``), a linear
    head. ``att_scale`` multiplies the ``1/d`` of the logits. Every matrix (embedding, q, k,
    v, o, MLP, head) is an ``nn.Linear`` / ``nn.Conv2d`` weight, so Lipschitz training
    (``verifier train --lipschitz``) constrains each of them."""

    def __init__(self, in_ch: int, n_classes: int, input_size: int, patch: int, dim: int,
                 depth: int, heads: int, mlp: int, alpha: float, att_scale: float = 1.0,
                 pool: str = "flatten"):
        super().__init__()
        if pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'flatten' or 'mean', got {pool!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        tokens = (input_size // patch) ** 2
        self.embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[_LipBlock(dim, heads, tokens, mlp, alpha, att_scale)
                                      for _ in range(depth)])
        self.pool, self.tokens, self.dim = pool, tokens, dim
        self.head = nn.Linear(dim * tokens if pool == "flatten" else dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x).flatten(2).transpose(1, 2) + self.pos)
        return self.head(x.reshape(-1, self.tokens * self.dim) if self.pool == "flatten"
                         else x.mean(1))


def vit_lipschitz(in_ch: int = 1, n_classes: int = 10, input_size: int = 28, patch: int = 7,
                  dim: int = 32, depth: int = 2, heads: int = 2, mlp: int = 64,
                  alpha: float = 0.5, att_scale: float = 1.0, pool: str = "flatten") -> nn.Module:
    """The Lipschitz-constrained counterpart of :func:`vit_tiny` (same patches, width, depth,
    heads, MLP): attention logits scaled by ``1/d``, convex residuals ``(1 - alpha) x + alpha
    f(x)``, no LayerNorm, bias-free attention matrices, the tokens flattened into the head
    (``pool``; see :class:`LipschitzViT`)."""
    return LipschitzViT(in_ch, n_classes, input_size, patch, dim, depth, heads, mlp, alpha,
                        att_scale, pool).eval()


class Siren(nn.Module):
    """``depth`` layers ``h <- sin(omega0 (W h + b))`` and a linear output layer, initialized as
    SIRENs are: the first layer's weights uniform in ``+-1/in_dim``, the later ones uniform in
    ``+-sqrt(6 / fan_in) / omega0`` (so each sine's argument stays of order one)."""

    def __init__(self, in_dim: int, hidden: int, depth: int, out: int, omega0: float = 30.0):
        super().__init__()
        self.omega0 = float(omega0)
        dims = [in_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, out)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("weight"):
                    bound = self.init_bound(name)
                    p.uniform_(-bound, bound)

    def init_bound(self, name: str) -> float:
        """The half-width of the uniform initialization of weight ``name`` (``layers.0.weight``,
        ..., ``out.weight``)."""
        fan_in = self.get_parameter(name).shape[1]
        return 1.0 / fan_in if name == "layers.0.weight" else (6.0 / fan_in) ** 0.5 / self.omega0

    def noise_radii(self, noise: float, k: float = 1.0) -> dict[str, float]:
        """Element-wise radius per weight tensor for Gaussian initialization noise of standard
        deviation ``noise`` times the layer's uniform bound: ``k`` standard deviations."""
        return {name: k * noise * self.init_bound(name)
                for name, _ in self.named_parameters() if name.endswith("weight")}

    def forward(self, x):
        for layer in self.layers:
            x = torch.sin(self.omega0 * layer(x))
        return self.out(x)


def siren(in_dim: int = 1, hidden: int = 32, depth: int = 3, out: int = 1,
          omega0: float = 30.0) -> nn.Module:
    """A SIREN on ``in_dim`` coordinates: ``depth`` sine layers of width ``hidden`` with
    frequency ``omega0``, a linear output of ``out`` values."""
    return Siren(in_dim, hidden, depth, out, omega0).eval()


ZOO = {
    "mlp": (mlp, dict(in_dim=784, hidden=[64, 32], out=10), (1, 28, 28)),
    "mlp_tanh": (mlp, dict(in_dim=20, hidden=[16, 16], out=4, activation="tanh"), (20,)),
    "small_cnn": (small_cnn, dict(in_ch=1, n_classes=10, input_size=28), (1, 28, 28)),
    "small_cnn_maxpool": (small_cnn, dict(in_ch=3, n_classes=10, input_size=32, pool="max"),
                          (3, 32, 32)),
    "cnn_cert": (cnn_cert, dict(in_ch=1, n_classes=10, input_size=28), (1, 28, 28)),
    "resnet_block_net": (resnet_block_net, dict(in_ch=3, n_classes=10, width=8, n_blocks=2),
                         (3, 16, 16)),
    "vit_tiny": (vit_tiny, dict(in_ch=1, n_classes=10, input_size=28), (1, 28, 28)),
    "vit_lipschitz": (vit_lipschitz, dict(in_ch=1, n_classes=10, input_size=28), (1, 28, 28)),
    "siren": (siren, dict(in_dim=2, hidden=16, depth=2, out=3, omega0=10.0), (2,)),
}


def build(name: str, seed: int | None = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A small instance of a zoo entry: ``(model, input_shape)``; the weights are drawn with
    ``torch.manual_seed(seed)`` (no seeding when ``seed`` is None)."""
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}: the zoo holds {sorted(ZOO)}")
    fn, kwargs, shape = ZOO[name]
    if seed is not None:
        torch.manual_seed(seed)
    return fn(**kwargs), shape
