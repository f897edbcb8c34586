"""Sample quality of generated digits without any downloaded network: a small CNN trained here on the real
training digits, whose accuracy on generated samples (against the class they were asked for) and whose
features (for a Fréchet distance between generated and held-out real digits, the FID recipe with this
network in place of Inception) score a generator.

Dimensions: ``b`` images, ``S`` side, ``f`` feature width (64).

Private to :mod:`ssmkit.evals` (its name starts with ``_`` so :func:`ssmkit.evals.discover` skips it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DigitScorer(nn.Module):
    """conv 3x3 (16) - ReLU - pool - conv 3x3 (32) - ReLU - pool - adaptive pool 7x7 - Linear(1568, f) - ReLU
    - Linear(f, k). Input (b, 1, S, S) in [-1, 1]; :meth:`features` gives the (b, f) penultimate layer."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(32 * 49, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_scorer(x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, batch_size: int = 64,
                 lr: float = 2e-3) -> DigitScorer:
    """A :class:`DigitScorer` trained with Adam (cosine to 0) on images x (b, 1, S, S) and labels y (b,)."""
    torch.manual_seed(seed)
    model = DigitScorer(int(y.max()) + 1)
    steps = epochs * max(1, len(x) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for s in range(len(x) // batch_size):
            rows = order[s * batch_size:(s + 1) * batch_size]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitScorer, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes (b,), features (b, f) in float64) of images x (b, 1, S, S)."""
    labels, feats = [], []
    for s in range(0, len(x), batch_size):
        f = model.features(x[s:s + batch_size])
        feats.append(f.double())
        labels.append(model.head(f).argmax(-1))
    return torch.cat(labels), torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a - μ_b‖² + Tr(Σ_a + Σ_b - 2 (Σ_a^½ Σ_b Σ_a^½)^½) between Gaussians fitted to features a (n, f)
    and b (m, f) (unbiased covariances, float64). The matrix square roots come from symmetric
    eigendecompositions (negative rounding-level eigenvalues are set to 0)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs (n, f) and (m, f) features with n, m >= 2, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    value = float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
    return max(value, 0.0) if math.isfinite(value) else value


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
