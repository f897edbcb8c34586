"""SequenceClassifier: padding is invisible, every mixer kind plugs in, a tiny task is learned."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import ModelConfig
from ssmkit.models.classifier import SequenceClassifier
from ssmkit.models.config import HyenaConfig, MambaConfig, S4Config, S4DConfig
from ssmkit.testing import assert_close


def config(pattern: str, bidirectional: bool = True, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=12, d_model=16, n_layer=len(pattern), layer_pattern=pattern,
                       s4d=S4DConfig(d_state=8, bidirectional=bidirectional),
                       s4=S4Config(d_state=8, l_max=32, bidirectional=bidirectional),
                       hyena=HyenaConfig(l_max=16, filter_order=8), mamba=MambaConfig(d_state=4), **kw)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("pattern", ["S", "4", "H", "M", "S4HM"])
def test_padded_rows_give_the_unpadded_outputs(pattern, pooling):
    torch.manual_seed(0)
    model = SequenceClassifier(config(pattern), 3, pooling=pooling, dtype=torch.float64)
    a, b = torch.randint(1, 12, (1, 7)), torch.randint(1, 12, (1, 10))
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    ids[0, :7], mask[0, :7] = a, True  # right padding
    ids[1, 2:], mask[1, 2:] = b, True  # left padding
    out = model(ids, mask=mask)
    assert out.logits.shape == (2, 3) and out.pooled.dtype == torch.float64
    assert_close(out.logits[0], model(a).logits[0], name="right-padded row")
    assert_close(out.logits[1], model(b).logits[0], name="left-padded row")
    other = ids.masked_fill(~mask, 5)  # what the padding holds does not matter
    assert_close(model(other, mask=mask).logits, out.logits, name="padding content")


def test_learns_a_tiny_task():
    """Is token 11 in the sequence? A bidirectional S4D stack with mean pooling learns it."""
    torch.manual_seed(0)
    model = SequenceClassifier(config("SS"), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch(n):
        ids = torch.randint(0, 11, (n, 16))
        labels = torch.randint(0, 2, (n,))
        pos = torch.randint(0, 16, (n,))
        ids[labels.bool(), pos[labels.bool()]] = 11
        lengths = torch.randint(10, 17, (n,))
        mask = torch.arange(16)[None] < lengths[:, None]
        ids[labels.bool() & (pos >= lengths)] = 11  # keep positives positive after truncation
        return ids, mask, labels

    for _ in range(30):
        ids, mask, labels = batch(64)
        loss = model(ids, mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, mask, labels = batch(256)
    with torch.no_grad():
        accuracy = (model(ids, mask=mask).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.95, accuracy


def test_real_valued_inputs_and_gradients():
    model = SequenceClassifier(config("4H", bidirectional=False), 4, d_input=3, pooling="last")
    x = torch.randn(2, 20, 3)
    out = model(inputs=x, labels=torch.tensor([0, 3]))
    out.loss.backward()
    assert model.encoder.weight.grad.abs().sum() > 0 and model.embedding is None
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert "head.weight" in model.state_dict() and "encoder.bias" in model.state_dict()


def test_config_round_trip_and_bad_inputs():
    cfg = config("S4H")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown config key\(s\): s4.rank"):
        ModelConfig.from_dict({**cfg.to_dict(), "s4": {**cfg.to_dict()["s4"], "rank": 2}})
    with pytest.raises(ValueError, match="s4.measure must be"):
        ModelConfig.from_dict({**cfg.to_dict(), "s4": {**cfg.to_dict()["s4"], "measure": "cheb"}})
    with pytest.raises(ValueError, match="hyena.emb_dim must be odd"):
        ModelConfig(vocab_size=12, d_model=16, n_layer=1, layer_pattern="H", hyena=HyenaConfig(emb_dim=4))
    model = SequenceClassifier(cfg, 2)
    ids = torch.randint(0, 12, (2, 6))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        model(ids, mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="mask has a row with no valid position"):
        model(ids, mask=torch.tensor([[True] * 6, [False] * 6]))
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, length\)"):
        model(ids, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\)"):
        model(ids, labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs=torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match=r"input_ids has ids outside \[0, 12\)"):
        model(ids + 12)
    with pytest.raises(ValueError, match="pooling must be one of"):
        SequenceClassifier(cfg, 2, pooling="max")


def test_feed_forward_letters_build_feed_forwards():
    """A pattern's MLP / MoE letters give the classifier's blocks the same feed-forwards as a LanguageModel."""
    from ssmkit.layers import MLP, MoE
    from ssmkit.models import LanguageModel
    from ssmkit.models.config import MLPConfig, MoEConfig

    cfg = config("MmMe", mlp=MLPConfig(d_intermediate=32), moe=MoEConfig(d_intermediate=16, num_experts=4, top_k=2))
    model = SequenceClassifier(cfg, 3)
    assert isinstance(model.layers[0].ff, MLP) and isinstance(model.layers[1].ff, MoE)
    lm = LanguageModel(config("MmMe", mlp=cfg.mlp, moe=cfg.moe))
    body = {k: v.shape for k, v in lm.state_dict().items() if k.startswith("layers.")}
    assert body == {k: v.shape for k, v in model.state_dict().items() if k.startswith("layers.")}
    out = model(torch.randint(1, 12, (2, 9)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.layers[0].ff.down_proj.weight.grad.abs().sum() > 0


def test_embedding_multiplier_scales_the_token_embedding():
    """A classifier of a config with ``embedding_multiplier`` (Granite-4.0) equals one without it whose
    embedding is scaled by the multiplier."""
    torch.manual_seed(0)
    plain = SequenceClassifier(config("SS"), 3, dtype=torch.float64)
    scaled = SequenceClassifier(config("SS", embedding_multiplier=2.5), 3, dtype=torch.float64)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.embedding.weight.mul_(2.5)
    ids = torch.randint(0, 12, (2, 9))
    torch.testing.assert_close(scaled(ids).logits, plain(ids).logits)
