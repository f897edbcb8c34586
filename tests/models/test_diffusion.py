"""GaussianDiffusion against closed forms: the schedules, q(x_t | x_0), classifier-free guidance, DDIM at
eta = 0 (deterministic) and eta = 1 (the DDPM chain), and both samplers with exact (oracle) denoisers."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.models.diffusion import GaussianDiffusion, beta_schedule


def test_schedules():
    linear = beta_schedule("linear", 1000)
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    assert beta_schedule("linear", 100)[-1].item() == pytest.approx(0.2)  # scaled to keep the total noise
    cosine = beta_schedule("cosine", 50)
    abar = torch.cumprod(1 - cosine, 0)
    f = lambda t: math.cos((t / 50 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 30):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    with pytest.raises(ValueError):
        beta_schedule("quadratic", 10)


def test_q_sample_moments():
    diffusion = GaussianDiffusion(100, null_class=0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 40)
    abar = diffusion.alphas_cumprod[40].item()
    xt = diffusion.q_sample(x0, t, torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)
    # Exactly: noise 0 gives the scaled mean; the noise enters with weight sqrt(1 - abar).
    assert torch.allclose(diffusion.q_sample(x0[:2], t[:2], torch.zeros(2, 1, dtype=torch.float64)),
                          x0[:2] * math.sqrt(abar))


def _point_oracle(diffusion, target):
    """The exact ε of data that is the single point ``target``: ε = (x_t - √ᾱ x_0) / √(1 - ᾱ)."""
    def model(x, t, y):
        abar = diffusion.alphas_cumprod[t].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()
    return model


@pytest.mark.parametrize("steps", [None, 10, 3])
def test_both_samplers_recover_a_point_distribution(steps):
    diffusion = GaussianDiffusion(200, null_class=2, clip_denoised=False)
    target = torch.tensor([[0.3, -0.8, 0.5]], dtype=torch.float64)
    model, y = _point_oracle(diffusion, target), torch.zeros(4, dtype=torch.int64)
    noise = torch.randn(4, 3, dtype=torch.float64)
    ddim = diffusion.ddim_sample(model, (4, 3), y, steps=steps, noise=noise)
    ddpm = diffusion.ddpm_sample(model, (4, 3), y, steps=steps, noise=noise, generator=torch.Generator())
    assert torch.allclose(ddim, target.expand(4, 3), atol=1e-9)
    assert torch.allclose(ddpm, target.expand(4, 3), atol=1e-9)


def test_ddim_eta0_is_deterministic_and_eta1_is_the_ddpm_chain():
    diffusion = GaussianDiffusion(100, null_class=3)
    model = lambda x, t, y: torch.tanh(x) * 0.5 + 0.01 * t.view(-1, 1).to(x.dtype) / 100
    y, noise = torch.zeros(5, dtype=torch.int64), torch.randn(5, 2, dtype=torch.float64)
    a = diffusion.ddim_sample(model, (5, 2), y, steps=20, noise=noise, generator=torch.Generator().manual_seed(1))
    b = diffusion.ddim_sample(model, (5, 2), y, steps=20, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ddim1 = diffusion.ddim_sample(model, (5, 2), y, steps=20, eta=1.0, noise=noise,
                                  generator=torch.Generator().manual_seed(3))
    ddpm = diffusion.ddpm_sample(model, (5, 2), y, steps=20, noise=noise, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ddim1, ddpm, atol=1e-10) and not torch.allclose(ddim1, a)


def test_ddpm_with_the_exact_score_of_gaussian_data_has_the_closed_form_variance():
    # Data N(0, 1): E[ε | x_t] = √(1 - ᾱ_t) x_t and x̂_0 = √ᾱ_t x_t, so each step is x <- a x + √β̃ z with
    # a = c_0 √ᾱ + c_t, and Var(x_prev) = a² Var(x) + β̃ from Var(x_T) = 1. (With β̃ it ends below 1: Ho et
    # al.'s β̃ is the right variance for a point x_0, β for x_0 ~ N(0, I).)
    diffusion = GaussianDiffusion(100, null_class=1, clip_denoised=False)

    def model(x, t, y):
        abar = diffusion.alphas_cumprod[t].to(x.dtype).view(-1, 1)
        return (1 - abar).sqrt() * x

    var = 1.0
    taus = diffusion.timesteps(25)
    for i in range(len(taus) - 1, -1, -1):
        abar = diffusion.alphas_cumprod[taus[i]].item()
        prev = diffusion.alphas_cumprod[taus[i - 1]].item() if i else 1.0
        beta = 1 - abar / prev
        a = (beta * math.sqrt(prev) * math.sqrt(abar) + (1 - prev) * math.sqrt(1 - beta)) / (1 - abar)
        var = a * a * var + beta * (1 - prev) / (1 - abar)
    assert 0.5 < var < 0.99
    y = torch.zeros(20000, dtype=torch.int64)
    samples = diffusion.ddpm_sample(model, (20000, 1), y, steps=25, generator=torch.Generator().manual_seed(0))
    assert samples.mean().abs().item() < 0.03
    assert samples.var().item() == pytest.approx(var, rel=0.04)


def test_guidance_mixes_conditional_and_unconditional():
    diffusion = GaussianDiffusion(10, null_class=9)
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return x + y.to(x.dtype)[:, None]

    x, t, y = torch.zeros(2, 1), torch.tensor([3, 3]), torch.tensor([1, 2])
    assert torch.equal(diffusion.guided_eps(model, x, t, y, 1.0), torch.tensor([[1.0], [2.0]])) and len(calls) == 1
    out = diffusion.guided_eps(model, x, t, y, 3.0)
    assert torch.equal(calls[-1], torch.tensor([1, 2, 9, 9]))  # one batched call: conditional, then none
    assert torch.allclose(out, 9 + 3 * (torch.tensor([[1.0], [2.0]]) - 9))


def test_training_loss_drops_classes_and_is_the_noise_mse():
    diffusion = GaussianDiffusion(10, null_class=7)
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)

    x0 = torch.randn(64, 3)
    loss = diffusion.training_loss(model, x0, torch.zeros(64, dtype=torch.int64), p_uncond=1.0,
                                   generator=torch.Generator().manual_seed(0))
    assert (seen[-1] == 7).all()
    noise = torch.randn(64, 3, generator=_advance(torch.Generator().manual_seed(0)))
    assert loss.item() == pytest.approx((noise**2).mean().item(), rel=1e-6)
    diffusion.training_loss(model, x0, torch.zeros(64, dtype=torch.int64), p_uncond=0.0)
    assert (seen[-1] == 0).all()


def _advance(generator):
    torch.randint(0, 10, (64,), generator=generator)  # the time steps are drawn first
    return generator


def test_timesteps_and_errors():
    diffusion = GaussianDiffusion(1000, null_class=10)
    assert diffusion.timesteps(None) == list(range(1000))
    taus = diffusion.timesteps(5)
    assert taus == [0, 250, 500, 749, 999] or taus == [0, 250, 500, 750, 999]
    with pytest.raises(ValueError):
        diffusion.timesteps(0)
    with pytest.raises(ValueError, match="one label per sample"):
        diffusion.ddim_sample(lambda x, t, y: x, (3, 2), torch.zeros(2, dtype=torch.int64))


def _mixture_oracle(diffusion, data):
    """The exact ε of data spread uniformly over the rows of ``data`` (n, ...): with the posterior weights
    w_j ∝ exp(-‖x_t - √ᾱ x_j‖² / 2(1 - ᾱ)), E[x_0 | x_t] = Σ w_j x_j and ε = (x_t - √ᾱ E[x_0 | x_t]) / √(1 - ᾱ)."""
    def model(x, t, y):
        abar = diffusion.alphas_cumprod[t].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        sq = ((x[:, None] - abar.sqrt()[:, None] * data[None]) ** 2).flatten(2).sum(-1)
        w = (-sq / (2 * (1 - abar.view(-1, 1)))).softmax(dim=1)
        x0 = torch.einsum("bn,n...->b...", w, data)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return model


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_with_the_exact_denoiser_of_a_few_images_land_on_them(sampler):
    # Images in [-1, 1] with x̂_0 clipping and T = 1000 as the DiS eval uses them: every sample must end on one
    # of the training images (the exact ε of a finite set has no other fixed point), and the samples must
    # reach more than one of them (the sampler does not collapse onto one mode).
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(6, 1, 6, 6, generator=gen, dtype=torch.float64) > 0.6).to(torch.float64) * 2 - 1
    diffusion = GaussianDiffusion(1000, null_class=1)
    model, y = _mixture_oracle(diffusion, data), torch.zeros(16, dtype=torch.int64)
    sample = diffusion.ddim_sample if sampler == "ddim" else diffusion.ddpm_sample
    out = sample(model, (16, 1, 6, 6), y, steps=50, guidance=3.0, generator=gen)
    distance, nearest = ((out[:, None] - data[None]) ** 2).flatten(2).amax(-1).min(dim=1)
    assert distance.max().item() < 1e-6
    assert len(set(nearest.tolist())) > 2
