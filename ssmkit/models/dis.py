"""DiS: the noise-prediction network ε_θ(x_t, t, c) of a diffusion model, built from sequence-mixer blocks.

Dimensions: ``b`` batch, ``C`` image channels, ``S`` image side, ``P`` patch side, ``N = (S / P)²`` patches,
``D`` d_model, ``L = N + 2`` tokens.

Diffusion State Space Models (Fei et al. 2024, "Scalable Diffusion Models with State Space Backbone")
read everything as tokens: the time step and the class are one token each, put in front of the image's
patches (a linear patch embedding plus learned positions); bidirectional SSM blocks mix the tokens;
long skip connections join each shallow block's output to its mirror deep block (U-ViT's ``Linear(2D, D)``
on the concatenation); a final norm and a linear decoder turn each patch token back into P·P·C values.
The same skeleton with full self-attention + MLP blocks is the transformer (DiT/U-ViT style) baseline, so
the two differ only in how tokens are mixed.

``mixer`` picks the block: ``"mamba"`` / ``"mamba2"`` (a causal layer run both ways,
:class:`ssmkit.layers.bidirectional.Bidirectional`), ``"s4d"`` (S4D's two-sided kernel) or
``"attention"``. ``ff_width`` > 0 adds a SwiGLU MLP to each block (the transformer's, and how S4D or
attention models are made as large as a Mamba one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ssmkit.layers import S4D, Mamba, Mamba2, RMSNorm
from ssmkit.layers.bidirectional import Bidirectional, SelfAttention
from ssmkit.layers.block import Block
from ssmkit.layers.mlp import MLP

MIXERS = ("mamba", "mamba2", "s4d", "attention")


@dataclasses.dataclass
class DiSConfig:
    """Shape of a :class:`DiffusionBackbone`.

    image_size: S; channels: C; patch_size: P (divides S); num_classes: class labels 0..k-1 (label k is
    the "no class" of classifier-free guidance); d_model: D; depth: blocks (depth // 2 shallow ones each
    feed a long skip to a deep one; an odd depth has one middle block); mixer: one of :data:`MIXERS`;
    d_state: SSM state size; headdim: Mamba-2 head width; num_heads: attention heads; ff_width: SwiGLU
    MLP width in each block (0 = none).
    """

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    d_model: int = 64
    depth: int = 5
    mixer: str = "mamba"
    d_state: int = 16
    headdim: int = 16
    num_heads: int = 4
    ff_width: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "num_classes", "d_model", "depth", "d_state"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiSConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"DiSConfig: patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.mixer not in MIXERS:
            raise ValueError(f"DiSConfig.mixer must be one of {', '.join(MIXERS)}, got {self.mixer!r}")
        if not isinstance(self.ff_width, int) or self.ff_width < 0:
            raise ValueError(f"DiSConfig.ff_width must be an int >= 0, got {self.ff_width!r}")

    @property
    def num_patches(self) -> int:
        """N = (S / P)²."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps: t (b,) -> (b, dim), [cos | sin] halves
    with frequencies ``max_period^(-i / (dim / 2))`` (the DDPM / DiT embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def _mixer(config: DiSConfig) -> nn.Module:
    d = config.d_model
    if config.mixer == "mamba":
        return Bidirectional(Mamba(d, d_state=config.d_state), Mamba(d, d_state=config.d_state))
    if config.mixer == "mamba2":
        make = lambda: Mamba2(d, d_state=config.d_state, headdim=config.headdim, chunk_size=64)
        return Bidirectional(make(), make())
    if config.mixer == "s4d":
        return S4D(d, d_state=config.d_state, bidirectional=True)
    return SelfAttention(d, config.num_heads)


class DiffusionBackbone(nn.Module):
    """ε_θ(x_t, t, c): noisy images, time steps and class labels -> predicted noise (see the module docstring).

    ``forward(x, t, y)``: x (b, C, S, S) float, t (b,) time steps (int or float), y (b,) int64 labels in
    [0, num_classes] (num_classes = unconditional) -> (b, C, S, S).

    Example::

        net = DiffusionBackbone(DiSConfig(mixer="mamba"))
        eps = net(torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,)), torch.randint(0, 11, (8,)))
    """

    def __init__(self, config: DiSConfig) -> None:
        super().__init__()
        self.config = config
        d, patch_dim = config.d_model, config.patch_size**2 * config.channels
        self.patch_embed = nn.Linear(patch_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = nn.Embedding(config.num_classes + 1, d)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches + 2, d) * 0.02)
        n_skip = config.depth // 2

        def block() -> Block:
            ff = MLP(d, config.ff_width) if config.ff_width else None
            return Block(d, _mixer(config), ff=ff)

        self.in_blocks = nn.ModuleList(block() for _ in range(n_skip))
        self.mid_blocks = nn.ModuleList(block() for _ in range(config.depth - 2 * n_skip))
        self.out_blocks = nn.ModuleList(block() for _ in range(n_skip))
        self.skip_proj = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(n_skip))
        self.norm_f = RMSNorm(d)
        self.decoder = nn.Linear(d, patch_dim)
        # A zero decoder predicts ε = 0 at the start: the loss begins at E|ε|² = 1, not at a random level.
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(b, C, S, S) -> (b, N, P·P·C), patches in row-major order."""
        b, c, s, _ = x.shape
        p = self.config.patch_size
        return x.reshape(b, c, s // p, p, s // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(b, N, P·P·C) -> (b, C, S, S), the inverse of :meth:`patchify`."""
        b, c, p, s = patches.shape[0], self.config.channels, self.config.patch_size, self.config.image_size
        g = s // p
        return patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, s, s)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiffusionBackbone: x must have shape (b, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
            raise ValueError(f"DiffusionBackbone: t and y must have shape ({x.shape[0]},), got "
                             f"{tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype != torch.int64 or bool(((y < 0) | (y > cfg.num_classes)).any()):
            raise ValueError(f"DiffusionBackbone: y must be int64 labels in [0, {cfg.num_classes}] "
                             f"({cfg.num_classes} = no class)")
        time_token = self.time_embed(timestep_embedding(t, cfg.d_model).to(self.pos_embed.dtype))[:, None]
        class_token = self.class_embed(y)[:, None]
        h = torch.cat([time_token, class_token, self.patch_embed(self.patchify(x))], dim=1) + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        for blk in self.mid_blocks:
            h = blk(h)
        for blk, proj in zip(self.out_blocks, self.skip_proj):
            h = blk(proj(torch.cat([h, skips.pop()], dim=-1)))
        patches = self.decoder(self.norm_f(h[:, 2:]).to(self.decoder.weight.dtype))
        return self.unpatchify(patches)
