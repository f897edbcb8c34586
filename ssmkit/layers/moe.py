"""Mixture of SwiGLU experts with a softmax top-k router (Jamba's and Granite-4.0's semantics), dropless,
with an optional shared expert.

Dimensions: b batch, l length, t = b·l tokens, d model width, f expert intermediate width, E experts,
k experts per token.

Routing, ``router_softmax="all"`` (transformers' ``JambaTopKRouter``): logits = router(x) in x's dtype,
probabilities = softmax over all E experts in float32 (float64 for float64 models), the top-k kept with
their probabilities as weights — **not** renormalised to sum to 1 (``renormalize=True`` divides them by
their sum, as Mixtral does). ``router_softmax="top_k"`` (transformers' ``GraniteMoeHybridTopKRouter``):
the top-k of the logits (in float32 or wider), weights = softmax over those k. Output of token i:
Σ_{e in topk(i)} w_ie · expert_e(x_i), accumulated in float32 (float64), plus ``shared_mlp(x_i)`` when
``shared_d_intermediate > 0`` (Granite-4.0's shared expert, which every token passes through).

Auxiliary losses (ALGORITHMS.md, "Mixture of experts"): the Switch load-balancing loss
E · Σ_e f_e · P_e with f_e = (top-k slots routed to e) / tokens — so Σ_e f_e = k, exactly as transformers'
``load_balancing_loss_func`` counts — and P_e = mean router probability of e; the router z-loss of ST-MoE,
mean over tokens of logsumexp(logits)². The coefficients belong to the model: the layer only measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssmkit.layers.configs import MoEConfig, layer_settings
from ssmkit.layers.mlp import MLP
from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor


@dataclass
class RouterStats:
    """What one MoE forward measured about its routing (float32, float64 for float64 models; the losses
    keep their graph).

    Tokens excluded by the forward's ``mask`` count nowhere.

    Attributes:
        expert_counts: (E,) top-k slots routed to each expert (sums to k · n_tokens).
        prob_sum: (E,) sum over tokens of the router probabilities (differentiable).
        n_tokens: () number of tokens counted.
        z_sum: () sum over tokens of logsumexp(logits)² (differentiable).
    """

    expert_counts: Tensor
    prob_sum: Tensor
    n_tokens: Tensor
    z_sum: Tensor

    @property
    def load_balancing_loss(self) -> Tensor:
        """E · Σ_e f_e P_e for this layer alone (the one-layer case of :func:`load_balancing_loss`)."""
        return load_balancing_loss([self])

    @property
    def z_loss(self) -> Tensor:
        """Mean over tokens of logsumexp(router logits)² for this layer."""
        return router_z_loss([self])

    @property
    def expert_fraction(self) -> Tensor:
        """(E,) share of routed slots per expert (sums to 1), for usage metrics."""
        return self.expert_counts / self.expert_counts.sum().clamp_min(1)


def load_balancing_loss(stats: Sequence[RouterStats]) -> Tensor:
    """Switch load-balancing loss over several MoE layers, pooled as transformers'
    ``load_balancing_loss_func`` pools a tuple of per-layer router logits: slot counts and probability
    sums are added over layers and divided by the total token count before the product,
    L = E · Σ_e (Σ counts_e / N) (Σ prob_e / N). Returns a scalar in the stats' dtype (0 when no token
    was counted, where transformers would give NaN)."""
    if not stats:
        raise ValueError("load_balancing_loss needs the stats of at least one MoE layer")
    counts = torch.stack([s.expert_counts for s in stats]).sum(0)
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)
    n = torch.stack([s.n_tokens for s in stats]).sum().clamp_min(1)
    return counts.numel() * ((counts / n) * (probs / n)).sum()


def router_z_loss(stats: Sequence[RouterStats]) -> Tensor:
    """Router z-loss (ST-MoE) pooled over layers: Σ logsumexp² over every counted token of every layer,
    divided by their number (0 when none)."""
    if not stats:
        raise ValueError("router_z_loss needs the stats of at least one MoE layer")
    return torch.stack([s.z_sum for s in stats]).sum() / torch.stack([s.n_tokens for s in stats]).sum().clamp_min(1)


class MoE(nn.Module):
    """Mixture of E SwiGLU experts, top-k routed; every token is computed (no capacity, no dropping).

    Parameters ``router.weight`` [E, d] and ``experts.{e}.{gate,up,down}_proj.weight`` — the names of
    transformers' Jamba checkpoints on disk (``feed_forward.router.weight``,
    ``feed_forward.experts.{e}.gate_proj.weight`` ...), one :class:`MLP` per expert; with a shared expert
    also ``shared_mlp.{gate,up,down}_proj.weight``.

    Tokens are grouped per expert by one stable argsort of their expert ids, each expert runs once on its
    contiguous group, and the weighted results are summed back with ``index_add_`` in float32. The only
    Python loop is over experts (those routed no token are skipped outside autograd). After each forward, :attr:`last_stats` holds the :class:`RouterStats` of
    that forward (aux losses and per-expert counts for the trainer).

    Example::

        moe = MoE(512, d_intermediate=1024, num_experts=16, top_k=2)
        y = moe(torch.randn(2, 10, 512))               # (2, 10, 512)
        loss = task_loss + 1e-3 * moe.last_stats.load_balancing_loss
    """

    def __init__(self, d_model: int, config: MoEConfig | None = None, *, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        # The router loss coefficients of the config belong to the model's loss; the layer only measures.
        self.config = config = layer_settings(MoEConfig, config, settings, "MoE")
        d_intermediate, num_experts, top_k, renormalize = (config.d_intermediate, config.num_experts, config.top_k,
                                                           config.renormalize)
        for name, value in (("d_model", d_model), ("d_intermediate", d_intermediate), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        self.d_model, self.d_intermediate = d_model, d_intermediate
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.router = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(
            MLP(d_model, d_intermediate, bias=bias, device=device, dtype=dtype) for _ in range(num_experts)
        )
        self.router_softmax = config.router_softmax
        shared = config.shared_d_intermediate
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ValueError(f"shared_d_intermediate must be an int >= 0, got {shared!r}")
        if self.router_softmax not in ("all", "top_k"):
            raise ValueError(f"router_softmax must be 'all' or 'top_k', got {self.router_softmax!r}")
        self.shared_mlp = MLP(d_model, shared, bias=bias, device=device, dtype=dtype) if shared else None
        self.last_stats: RouterStats | None = None

    decode_graph_blocker = "a MoE feed-forward (data-dependent shapes)"
    """Routing groups tokens by expert with data-dependent sizes: not capturable in a CUDA graph."""

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"router_softmax={self.router_softmax!r}, shared_d_intermediate={self.config.shared_d_intermediate}")

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router of x (t, d), as transformers' ``JambaTopKRouter`` plus optional renormalisation, or with
        ``router_softmax="top_k"`` as ``GraniteMoeHybridTopKRouter``.

        Returns logits (t, E) in x's dtype, probabilities (t, E) over all experts (for the statistics) and
        top-k weights (t, k) in float32 (float64 for float64 x) and top-k expert ids (t, k) int64.
        """
        logits = self.router(x)
        wide = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits, dim=-1, dtype=wide)
        if self.router_softmax == "top_k":
            top_logits, experts = torch.topk(logits.to(wide), self.top_k, dim=-1)
            return logits, probs, torch.softmax(top_logits, dim=-1), experts
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, weights, experts

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Mix x (b, l, d) -> (b, l, d) in x's dtype and record :attr:`last_stats`.

        Args:
            x: (b, l, d) floating input.
            mask: optional (b, l) bool/int, nonzero for real tokens: padding (0) is still computed but left
                out of the statistics and losses, as transformers' ``attention_mask`` in
                ``load_balancing_loss_func``.

        NaN in a token's input makes that token's output NaN (and the losses NaN); other tokens' outputs
        are unaffected, as each token is computed on its own.
        """
        bound = Dims(d=self.d_model)
        check_tensor("x", x, ("b", "l", "d"), bound)
        if mask is not None:
            check_tensor("mask", mask, ("b", "l"), bound, floating=False)
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"mask must be a bool or integer tensor, got {mask.dtype}")
            check_same_device(x=x, mask=mask)
        b, l, d = x.shape
        check_nonempty("x", b, "batch")
        check_nonempty("x", l, "length")
        flat = x.reshape(b * l, d)
        logits, probs, weights, experts = self.route(flat)

        # Dropless grouping: slots sorted by expert id, so expert e's tokens are one contiguous slice.
        slot_expert = experts.flatten()
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        slot_token = order // self.top_k
        groups = flat[slot_token].split(counts.tolist())
        # Under autograd every expert runs, an empty group giving zero gradients (so that distributed training
        # sees every parameter used); without it the empty groups are skipped: most of them at a decode step,
        # where each token visits k of the E experts.
        run_all = torch.is_grad_enabled()
        outputs = torch.cat([expert(group) for expert, group in zip(self.experts, groups) if run_all or len(group)])
        mixed = torch.zeros(b * l, d, dtype=weights.dtype, device=x.device)
        mixed.index_add_(0, slot_token, outputs.to(weights.dtype) * weights.flatten()[order, None])

        self.last_stats = self._stats(logits, probs, experts, mask)
        out = mixed.to(x.dtype).view(b, l, d)
        return out if self.shared_mlp is None else out + self.shared_mlp(x)

    def _stats(self, logits: Tensor, probs: Tensor, experts: Tensor, mask: Tensor | None) -> RouterStats:
        z = torch.logsumexp(logits.to(probs.dtype), dim=-1) ** 2
        keep = torch.ones_like(z) if mask is None else mask.reshape(-1).to(probs.dtype)
        counts = torch.zeros(self.num_experts, dtype=probs.dtype, device=logits.device)
        counts.scatter_add_(0, experts.flatten(), keep.repeat_interleave(self.top_k))
        return RouterStats(
            expert_counts=counts,
            prob_sum=(probs * keep[:, None]).sum(0),
            n_tokens=keep.sum(),
            z_sum=(z * keep).sum(),
        )
