"""MoE: output == a naive per-token loop, == transformers' JambaSparseMoeBlock with the same weights, with
top-k softmax routing and a shared expert == GraniteMoeHybridMoE plus its shared MLP; the
load-balancing loss == transformers' load_balancing_loss_func on the same router logits (one layer, pooled
layers, padding mask); z-loss == Switch Transformers' router_z_loss_func; renormalisation; grouping runs
each expert once; gradients; bad inputs; NaN."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.layers.moe import MoE, RouterStats, load_balancing_loss, router_z_loss
from ssmkit.testing import assert_close


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time in float64: softmax over all experts, top-k, weights as they
    are (or divided by their sum) — or, with ``router_softmax="top_k"``, the top-k logits and a softmax
    over them — sum of the chosen experts' SwiGLU outputs, plus the shared expert's."""
    w = {name: p.detach().double() for name, p in moe.named_parameters()}
    b, l, d = x.shape
    x = x.double().reshape(b * l, d)

    def swiglu(token: torch.Tensor, prefix: str) -> torch.Tensor:
        gate, up = token @ w[f"{prefix}gate_proj.weight"].T, token @ w[f"{prefix}up_proj.weight"].T
        return (gate * torch.sigmoid(gate) * up) @ w[f"{prefix}down_proj.weight"].T

    out = []
    for token in x:
        logits = token @ w["router.weight"].T
        if moe.router_softmax == "top_k":
            top, experts = torch.topk(logits, moe.top_k)
            weights = torch.softmax(top, -1)
        else:
            weights, experts = torch.topk(torch.softmax(logits, -1), moe.top_k)
        if moe.renormalize:
            weights = weights / weights.sum()
        y = torch.zeros(d, dtype=torch.float64)
        for weight, e in zip(weights, experts.tolist()):
            y = y + weight * swiglu(token, f"experts.{e}.")
        if moe.shared_mlp is not None:
            y = y + swiglu(token, "shared_mlp.")
        out.append(y)
    return torch.stack(out).view(b, l, d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,top_k,renormalize", [(4, 2, False), (4, 2, True), (6, 1, False), (3, 3, False)])
@pytest.mark.parametrize("length", [1, 63])
def test_matches_per_token_reference(dtype, experts, top_k, renormalize, length):
    moe = MoE(16, d_intermediate=24, num_experts=experts, top_k=top_k, renormalize=renormalize, dtype=dtype)
    x = torch.randn(2, length, 16, dtype=dtype)
    y = moe(x)
    assert y.dtype == dtype and y.shape == x.shape
    # bf16 logits may tie or swap near-equal experts against the float64 reference: route the reference
    # from the same bf16 logits by comparing in float32 and float64 only.
    if dtype != torch.bfloat16:
        assert_close(y, reference_moe(moe, x), dtype)
    else:
        ref = MoE(16, d_intermediate=24, num_experts=experts, top_k=top_k, renormalize=renormalize, dtype=torch.float64)
        ref.load_state_dict(moe.state_dict())
        _, _, _, chosen = moe.route(x.reshape(-1, 16))
        _, _, _, chosen64 = ref.route(x.double().reshape(-1, 16))
        same = (chosen.sort(-1).values == chosen64.sort(-1).values).all(-1).view(2, length)
        assert same.float().mean() > 0.9
        assert_close(y[same], reference_moe(ref, x)[same], dtype)
    stats = moe.last_stats
    assert stats.expert_counts.sum() == top_k * 2 * length
    assert stats.n_tokens == 2 * length


def test_renormalize_changes_weights_to_sum_one():
    moe = MoE(8, d_intermediate=12, num_experts=5, top_k=2, dtype=torch.float64)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    _, probs, weights, experts = moe.route(x.view(-1, 8))
    assert (weights.sum(-1) < 1).all()
    assert_close(weights, probs.gather(-1, experts))
    moe.renormalize = True
    _, _, renormed, _ = moe.route(x.view(-1, 8))
    assert_close(renormed.sum(-1), torch.ones(12, dtype=torch.float64))
    assert_close(moe(x), reference_moe(moe, x))
    renormed_output = moe(x)
    moe.renormalize = False
    assert (moe(x) - renormed_output).abs().max() > 1e-3


def jamba_block(moe: MoE):
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

    config = JambaConfig(hidden_size=moe.d_model, intermediate_size=moe.d_intermediate, num_experts=moe.num_experts,
                         num_experts_per_tok=moe.top_k, vocab_size=8)
    block = JambaSparseMoeBlock(config)
    sd = moe.state_dict()
    e = range(moe.num_experts)
    block.load_state_dict({
        "router.weight": sd["router.weight"],
        "experts.gate_up_proj": torch.stack([torch.cat([sd[f"experts.{i}.gate_proj.weight"],
                                                        sd[f"experts.{i}.up_proj.weight"]]) for i in e]),
        "experts.down_proj": torch.stack([sd[f"experts.{i}.down_proj.weight"] for i in e]),
    })
    return block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("experts,top_k,shared", [(6, 3, 10), (4, 1, 0), (5, 5, 7)])
def test_top_k_softmax_and_shared_expert_match_the_reference(dtype, experts, top_k, shared):
    moe = MoE(16, d_intermediate=12, num_experts=experts, top_k=top_k, router_softmax="top_k",
              shared_d_intermediate=shared, dtype=dtype)
    assert (moe.shared_mlp is None) == (shared == 0)
    x = torch.randn(2, 17, 16, dtype=dtype)
    assert_close(moe(x), reference_moe(moe, x), dtype)
    _, probs, weights, chosen = moe.route(x.view(-1, 16))
    assert_close(weights.sum(-1), torch.ones(34, dtype=weights.dtype))
    # The same experts and, up to rounding, the same weights as the softmax over all experts, renormalised.
    assert_close(weights, probs.gather(-1, chosen) / probs.gather(-1, chosen).sum(-1, keepdim=True), dtype)
    assert moe.last_stats.expert_counts.sum() == top_k * 34


def test_matches_transformers_granite_moe_and_shared_mlp():
    modeling = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
    from transformers import GraniteMoeHybridConfig

    moe = MoE(16, d_intermediate=12, num_experts=6, top_k=2, router_softmax="top_k", shared_d_intermediate=20)
    config = GraniteMoeHybridConfig(hidden_size=16, intermediate_size=12, num_local_experts=6, num_experts_per_tok=2,
                                    shared_intermediate_size=20, vocab_size=8, mamba_n_heads=4)
    block, shared = modeling.GraniteMoeHybridMoE(config), modeling.GraniteMoeHybridMLP(config)
    sd, e = moe.state_dict(), range(6)
    block.load_state_dict({
        "router.weight": sd["router.weight"],
        "experts.gate_up_proj": torch.stack([torch.cat([sd[f"experts.{i}.gate_proj.weight"],
                                                        sd[f"experts.{i}.up_proj.weight"]]) for i in e]),
        "experts.down_proj": torch.stack([sd[f"experts.{i}.down_proj.weight"] for i in e]),
    })
    shared.load_state_dict({"input_linear.weight": torch.cat([sd["shared_mlp.gate_proj.weight"],
                                                              sd["shared_mlp.up_proj.weight"]]),
                            "output_linear.weight": sd["shared_mlp.down_proj.weight"]})
    x = torch.randn(3, 21, 16)
    with torch.no_grad():
        assert_close(moe(x), block(x) + shared(x), torch.float32)


def test_top_k_softmax_refuses_renormalize():
    from ssmkit.layers.configs import MoEConfig

    with pytest.raises(ValueError, match="renormalize"):
        MoEConfig(router_softmax="top_k", renormalize=True).validate(16)
    with pytest.raises(ValueError, match="router_softmax"):
        MoE(16, num_experts=4, top_k=2, router_softmax="sigmoid")
    with pytest.raises(ValueError, match="shared_d_intermediate"):
        MoE(16, num_experts=4, top_k=2, shared_d_intermediate=-1)


def test_matches_transformers_jamba_moe_block():
    moe = MoE(16, d_intermediate=24, num_experts=8, top_k=2)
    expected_names = {"router.weight"} | {
        f"experts.{e}.{n}_proj.weight" for e in range(8) for n in ("gate", "up", "down")
    }
    assert set(moe.state_dict()) == expected_names
    x = torch.randn(3, 21, 16)
    assert_close(moe(x), jamba_block(moe)(x), torch.float32)


def test_aux_loss_equals_transformers_load_balancing_loss():
    from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

    layers = [MoE(16, d_intermediate=8, num_experts=6, top_k=2) for _ in range(3)]
    xs = [torch.randn(2, 17, 16) for _ in layers]
    logits, stats = [], []
    for moe, x in zip(layers, xs):
        moe(x)
        logits.append(moe.route(x.reshape(-1, 16))[0].detach())
        stats.append(moe.last_stats)
    one = load_balancing_loss_func((logits[0],), 6, 2)
    assert_close(stats[0].load_balancing_loss, one, torch.float32, name="one layer")
    pooled = load_balancing_loss_func(tuple(logits), 6, 2)
    assert_close(load_balancing_loss(stats), pooled, torch.float32, name="three layers pooled")
    assert not torch.allclose(load_balancing_loss(stats), sum(s.load_balancing_loss for s in stats) / 3)
    # A padding mask leaves tokens out of the statistics exactly as transformers' attention_mask does.
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0, 12:] = 0
    masked = []
    for moe, x in zip(layers, xs):
        moe(x, mask=mask)
        masked.append(moe.last_stats)
    assert_close(load_balancing_loss(masked), load_balancing_loss_func(tuple(logits), 6, 2, mask), torch.float32)
    assert masked[0].n_tokens == 29 and masked[0].expert_counts.sum() == 58


def test_z_loss_and_counts():
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    moe = MoE(16, d_intermediate=8, num_experts=4, top_k=2)
    x = torch.randn(2, 9, 16)
    moe(x)
    logits, probs, _, experts = moe.route(x.reshape(-1, 16))
    assert_close(moe.last_stats.z_loss, router_z_loss_func(logits.detach().view(2, 9, 4)), torch.float32)
    assert torch.equal(moe.last_stats.expert_counts, torch.bincount(experts.flatten(), minlength=4).float())
    assert_close(moe.last_stats.prob_sum, probs.sum(0))
    assert_close(moe.last_stats.expert_fraction.sum(), torch.tensor(1.0))
    other = MoE(16, d_intermediate=8, num_experts=4, top_k=2)
    other(torch.randn(1, 3, 16))
    pooled = router_z_loss([moe.last_stats, other.last_stats])
    assert_close(pooled, (moe.last_stats.z_sum + other.last_stats.z_sum) / 21)
    with pytest.raises(ValueError, match="at least one"):
        load_balancing_loss([])
    with pytest.raises(ValueError, match="at least one"):
        router_z_loss([])


def test_aux_losses_have_gradients_to_the_router_only_through_probabilities():
    moe = MoE(8, d_intermediate=12, num_experts=4, top_k=2, dtype=torch.float64)
    moe(torch.randn(2, 5, 8, dtype=torch.float64))
    (moe.last_stats.load_balancing_loss + moe.last_stats.z_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.experts.parameters())


def test_each_expert_runs_once_on_its_group_even_when_unbalanced():
    """Dropless grouping: one call per expert (an idle expert gets 0 tokens), every token kept."""
    moe = MoE(8, d_intermediate=12, num_experts=5, top_k=2, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3, 0] = moe.router.weight[1, 0] = 10.0  # all tokens with x[..., 0] > 0 pick 3 and 1
    x = torch.randn(4, 30, 8, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 0.1
    sizes = {}
    hooks = [e.register_forward_hook(lambda m, args, out, i=i: sizes.setdefault(i, []).append(args[0].shape[0]))
             for i, e in enumerate(moe.experts)]
    y = moe(x)
    for h in hooks:
        h.remove()
    assert sizes == {0: [0], 1: [120], 2: [0], 3: [120], 4: [0]}
    assert moe.last_stats.expert_counts.tolist() == [0, 120, 0, 120, 0]
    assert_close(y, reference_moe(moe, x))


def test_gradients():
    moe = MoE(4, d_intermediate=6, num_experts=3, top_k=2, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe, (x,))
    # fp32 parameter gradients vs the float64 per-token reference's.
    moe32 = MoE(16, d_intermediate=24, num_experts=4, top_k=2)
    x32 = torch.randn(2, 15, 16)
    moe32(x32).square().sum().backward()
    ref = MoE(16, d_intermediate=24, num_experts=4, top_k=2, dtype=torch.float64)
    ref.load_state_dict(moe32.state_dict())
    params = dict(ref.named_parameters())
    loss = torch.stack([v.square().sum() for v in _reference_with_params(ref, params, x32)]).sum()
    loss.backward()
    for name, p in moe32.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float32, name=name)


def _reference_with_params(moe, params, x):
    """reference_moe, differentiable in the parameters (float64)."""
    b, l, d = x.shape
    out = []
    for token in x.double().reshape(b * l, d):
        weights, experts = torch.topk(torch.softmax(token @ params["router.weight"].T, -1), moe.top_k)
        y = 0
        for weight, e in zip(weights, experts.tolist()):
            gate = token @ params[f"experts.{e}.gate_proj.weight"].T
            up = token @ params[f"experts.{e}.up_proj.weight"].T
            y = y + weight * ((gate * torch.sigmoid(gate) * up) @ params[f"experts.{e}.down_proj.weight"].T)
        out.append(y)
    return out


def test_nan_stays_in_its_token():
    moe = MoE(8, d_intermediate=12, num_experts=4, top_k=2)
    x = torch.randn(2, 6, 8)
    x[0, 4, 1] = math.nan
    y = moe(x)
    nan = torch.isnan(y).any(-1)
    assert nan[0, 4] and nan.sum() == 1
    assert torch.isnan(moe.last_stats.load_balancing_loss)


@given(b=st.integers(1, 3), l=st.integers(1, 20), experts=st.integers(1, 6), k=st.integers(1, 6),
       renormalize=st.booleans())
def test_fuzz_shapes(b, l, experts, k, renormalize):
    k = min(k, experts)
    moe = MoE(6, d_intermediate=5, num_experts=experts, top_k=k, renormalize=renormalize, dtype=torch.float64)
    x = torch.randn(b, l, 6, dtype=torch.float64)
    assert_close(moe(x), reference_moe(moe, x))
    assert isinstance(moe.last_stats, RouterStats)
    assert moe.last_stats.expert_counts.sum() == k * b * l


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, d_intermediate=12, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, d_intermediate=12, num_experts=4, top_k=0)
    with pytest.raises(ValueError, match="num_experts"):
        MoE(8, d_intermediate=12, num_experts=0, top_k=1)
    moe = MoE(8, d_intermediate=12, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        moe(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="x must have shape"):
        moe(torch.randn(10, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        moe(torch.ones(2, 5, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty batch"):
        moe(torch.randn(0, 5, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        moe(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool or integer"):
        moe(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="one device"):
        moe(x, mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))


def test_experts_without_tokens_run_only_under_autograd():
    """Inference skips the experts no token was routed to (most of them at a decode step) with the same
    output; under autograd every expert runs, so each parameter gets a gradient (zero when unused)."""
    moe = MoE(16, d_intermediate=8, num_experts=8, top_k=2, router_softmax="top_k", shared_d_intermediate=4)
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda module, args, out, e=e: calls.append((e, args[0].shape[0])))
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        y = moe(x)
    assert len(calls) == 2 and all(n == 1 for _, n in calls)
    calls.clear()
    y_grad = moe(x)
    assert len(calls) == 8
    assert_close(y_grad.detach(), y, torch.float32)
    y_grad.sum().backward()
    assert all(p.grad is not None for p in moe.parameters())
