"""Gaussian diffusion (DDPM) for a noise-prediction network: noise schedule, training loss with
classifier-free guidance, and the DDPM and DDIM samplers.

Dimensions: ``b`` batch, ``...`` the sample's own shape (e.g. C, S, S), ``T`` diffusion steps.

Notation of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models") and Song et al. 2021 ("Denoising
Diffusion Implicit Models"): β_t the schedule, α_t = 1 - β_t, ᾱ_t = Π_{s<=t} α_s (t = 0..T-1), and

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I),   so   x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε.

The network ε_θ(x_t, t, c) is trained on ‖ε - ε_θ‖² at uniform t, with the class c replaced by the
"no class" label with probability ``p_uncond`` (Ho & Salimans 2022, classifier-free guidance); sampling
mixes ε̂ = ε_θ(x, t, ∅) + w (ε_θ(x, t, c) - ε_θ(x, t, ∅)) with guidance scale w (1 = plain conditional).

Both samplers walk a sub-sequence τ_1 < ... < τ_K of the T steps (all T by default). DDPM draws from the
posterior q(x_τ(i-1) | x_τi, x̂_0) of the respaced chain (β'_i = 1 - ᾱ_τi / ᾱ_τ(i-1)); DDIM takes
x_τ(i-1) = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z with σ = η √((1-ᾱ_prev)/(1-ᾱ)) √(1 - ᾱ/ᾱ_prev):
deterministic at η = 0, the same chain as DDPM at η = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("linear", "cosine")


def beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """β_0..β_(T-1) in float64: ``"linear"`` 1e-4 -> 0.02 scaled to T = 1000 (DDPM); ``"cosine"``
    ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β clipped at 0.999 (Nichol & Dhariwal 2021)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if name == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


class GaussianDiffusion:
    """The forward process and the samplers of one schedule (see the module docstring).

    Args:
        num_steps: T. schedule: one of :data:`SCHEDULES`. null_class: the label meaning "no class".
        clip_denoised: clamp x̂_0 to [-1, 1] while sampling (data scaled to [-1, 1]); ε̂ is then re-derived
            from the clamped x̂_0 so that both samplers stay consistent.

    Example::

        diffusion = GaussianDiffusion(1000, null_class=10)
        loss = diffusion.training_loss(net, x0, labels, p_uncond=0.1)
        images = diffusion.ddim_sample(net, (16, 1, 28, 28), labels, steps=50, guidance=2.0)
    """

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", *, null_class: int,
                 clip_denoised: bool = True) -> None:
        self.num_steps = num_steps
        self.schedule = schedule
        self.null_class = null_class
        self.clip_denoised = clip_denoised
        self.betas = beta_schedule(schedule, num_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for t (b,) (t = -1 means ᾱ = 1, before any noise), shaped to broadcast against ``like``."""
        abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])[t.cpu() + 1]
        return abar.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε; x0, noise (b, ...), t (b,) int64 in [0, T)."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_loss(self, model: Denoiser, x0: torch.Tensor, y: torch.Tensor, *, p_uncond: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean ‖ε - ε_θ(x_t, t, c)‖² over t ~ U{0..T-1}, ε ~ N(0, I), c -> ∅ with probability ``p_uncond``."""
        if not 0 <= p_uncond <= 1:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        b = x0.shape[0]
        t = torch.randint(0, self.num_steps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        drop = torch.rand(b, generator=generator).to(x0.device) < p_uncond
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, y), noise)

    def guided_eps(self, model: Denoiser, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   guidance: float) -> torch.Tensor:
        """ε̂ = ε_θ(x, t, ∅) + w (ε_θ(x, t, c) - ε_θ(x, t, ∅)); one batched call of the network for w != 1."""
        if guidance == 1.0:
            return model(x, t, y)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def timesteps(self, steps: int | None) -> list[int]:
        """τ_1 < ... < τ_K: ``steps`` evenly spaced steps of [0, T-1] including both ends (all T for None)."""
        if steps is None:
            return list(range(self.num_steps))
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be an int in [1, {self.num_steps}], got {steps!r}")
        if steps == 1:
            return [self.num_steps - 1]
        return sorted({round(i * (self.num_steps - 1) / (steps - 1)) for i in range(steps)})

    def _denoise(self, model: Denoiser, x: torch.Tensor, t: int, y: torch.Tensor,
                 guidance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂, ᾱ_t) at step t, x̂_0 clamped when ``clip_denoised`` (ε̂ re-derived from it)."""
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        eps = self.guided_eps(model, x, tt, y, guidance)
        abar = self._abar(tt, x)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return x0, eps, abar

    @torch.no_grad()
    def ddpm_sample(self, model: Denoiser, shape: tuple[int, ...], y: torch.Tensor, *, steps: int | None = None,
                    guidance: float = 1.0, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or ``noise``), ``steps`` respaced steps (all T by default):
        x_τ(i-1) = c_0 x̂_0 + c_t x_τi + √β̃ z with the posterior's c_0 = β' √ᾱ_prev / (1 - ᾱ),
        c_t = (1 - ᾱ_prev) √α' / (1 - ᾱ), β̃ = β' (1 - ᾱ_prev) / (1 - ᾱ); no noise at the last step."""
        return self._sample(model, shape, y, steps, guidance, generator, noise, eta=None)

    @torch.no_grad()
    def ddim_sample(self, model: Denoiser, shape: tuple[int, ...], y: torch.Tensor, *, steps: int | None = 50,
                    eta: float = 0.0, guidance: float = 1.0, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM from x_T ~ N(0, I) (or ``noise``) in ``steps`` steps; ``eta`` = 0 is deterministic given x_T."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        return self._sample(model, shape, y, steps, guidance, generator, noise, eta=eta)

    def _sample(self, model: Denoiser, shape: tuple[int, ...], y: torch.Tensor, steps: int | None,
                guidance: float, generator: torch.Generator | None, noise: torch.Tensor | None,
                eta: float | None) -> torch.Tensor:
        device = y.device
        if y.shape != (shape[0],):
            raise ValueError(f"y must have shape ({shape[0]},) (one label per sample), got {tuple(y.shape)}")
        x = torch.randn(shape, generator=generator).to(device) if noise is None else noise.clone()
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(x.shape)}")
        taus = self.timesteps(steps)
        for i in range(len(taus) - 1, -1, -1):
            t, t_prev = taus[i], (taus[i - 1] if i > 0 else -1)
            x0, eps, abar = self._denoise(model, x, t, y, guidance)
            abar_prev = self._abar(torch.full((shape[0],), t_prev, dtype=torch.int64), x)
            z = torch.randn(shape, generator=generator).to(device) if i > 0 else torch.zeros_like(x)
            if eta is None:  # DDPM: the posterior of the respaced chain
                beta = 1 - abar / abar_prev
                mean = (beta * abar_prev.sqrt() * x0 + (1 - abar_prev) * (1 - beta).sqrt() * x) / (1 - abar)
                x = mean + (beta * (1 - abar_prev) / (1 - abar)).sqrt() * z
            else:
                sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
                x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * z
        return x
