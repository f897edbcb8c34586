"""The model owns its loss: cross-entropy against targets (aligned with the predictions), sums that stay
exact across micro-batches, and the MoE router losses with their coefficients."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.data import IGNORE
from ssmkit.layers import MoE
from ssmkit.models import AttentionConfig, LanguageModel, Mamba2Config, MLPConfig, ModelConfig, MoEConfig
from ssmkit.models.language_model import shift_labels
from ssmkit.testing import assert_close


def moe_model(aux=0.3, z=0.01, renormalize=False):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(
        vocab_size=50, d_model=16, n_layer=4, layer_pattern="2eAm",
        mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=8), attention=AttentionConfig(num_heads=2),
        mlp=MLPConfig(d_intermediate=16),
        moe=MoEConfig(num_experts=4, top_k=2, d_intermediate=8, router_aux_loss_coef=aux, router_z_loss_coef=z,
                      renormalize=renormalize)))


def router_logits(model, ids, **kwargs):
    """The model's output and each MoE layer's router logits (t, E), captured by hooks."""
    captured = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: captured.append(out))
             for m in model.modules() if isinstance(m, MoE)]
    try:
        out = model(ids, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, captured


def hand_load_balancing(logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch load balancing written out: E · Σ_e f_e · P_e over the tokens of every layer together,
    f_e = share of tokens with e among their top-k (so Σ_e f_e = k), P_e = mean router probability."""
    probs = torch.cat([torch.softmax(x.double(), -1) for x in logits])
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).double()
    return num_experts * (chosen.mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_loss_is_cross_entropy_plus_weighted_router_losses(renormalize):
    model = moe_model(renormalize=renormalize).double()
    ids = torch.randint(0, 50, (3, 11))
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = IGNORE
    out, logits = router_logits(model, ids, targets=targets)
    assert len(logits) == 2
    keep = targets != IGNORE
    ce = -torch.log_softmax(out.logits.double(), -1)[keep].gather(-1, targets[keep][:, None]).mean()
    lb = hand_load_balancing(logits, 4, 2)
    z = torch.cat([torch.logsumexp(x.double(), -1) ** 2 for x in logits]).mean()
    assert_close(out.aux_loss, lb, name="load balancing")
    assert_close(out.z_loss, z, name="z-loss")
    assert_close(out.loss, ce + 0.3 * lb + 0.01 * z, name="loss")
    assert_close(out.loss_sum, ce * keep.sum(), name="loss_sum")
    assert int(out.n_targets) == int(keep.sum())
    assert out.loss > ce + 0.3 * lb  # the z term is there, and positive
    out.loss.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, MoE))


def test_load_balancing_matches_transformers():
    """transformers' load_balancing_loss_func (what its Jamba and Mixtral add to their loss) on the same
    router logits gives the model's aux_loss."""
    modeling = pytest.importorskip("transformers.models.jamba.modeling_jamba")
    model = moe_model().double()
    out, logits = router_logits(model, torch.randint(0, 50, (2, 9)))
    want = modeling.load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2)
    # transformers computes in float32 whatever the logits.
    assert_close(out.aux_loss, want.to(out.aux_loss.dtype), rtol=1e-6, atol=1e-7, name="aux_loss")


def test_coefficients_zero_leave_the_plain_cross_entropy():
    model = moe_model(aux=0.0, z=0.0)
    ids = torch.randint(0, 50, (2, 9))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    ce = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    assert_close(out.loss, ce, name="loss")
    assert out.aux_loss > 0 and out.auxiliary == 0


def test_targets_and_transformers_labels_agree():
    model = moe_model()
    ids = torch.randint(0, 50, (2, 12))
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    by_labels = model(ids, labels=ids, seq_idx=seq_idx)
    targets = shift_labels(ids, seq_idx)
    assert targets[0, 4] == IGNORE and targets[0, 11] == IGNORE and targets[0, 3] == ids[0, 4]
    by_targets = model(ids, targets=targets, seq_idx=seq_idx)
    assert_close(by_targets.loss, by_labels.loss, name="loss")
    assert int(by_targets.n_targets) == 2 * 11 - 1
    with pytest.raises(ValueError, match="not both"):
        model(ids, targets=targets, labels=ids)
    with pytest.raises(ValueError, match="targets must be token ids"):
        model(ids, targets=torch.full_like(ids, 60))


def test_loss_shares_of_micro_batches_add_up_to_the_whole_batch_loss():
    """Micro-batches with different numbers of targets: the shares of the global count add up to the
    loss of the whole batch (a mean of the micro-batch means would not)."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=16, n_layer=2, layer_pattern="2",
                                      mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=8))).double()
    ids = torch.randint(0, 50, (4, 10))
    targets = torch.randint(0, 50, (4, 10))
    targets[:2, :7] = IGNORE
    whole = model(ids, targets=targets).loss
    total = int((targets != IGNORE).sum())
    shares = sum(model(ids[i:i + 2], targets=targets[i:i + 2]).loss_share(total) for i in (0, 2))
    assert_close(shares, whole, name="sum of shares")
    means = sum(model(ids[i:i + 2], targets=targets[i:i + 2]).loss for i in (0, 2)) / 2
    assert (means - whole).abs() > 1e-3
