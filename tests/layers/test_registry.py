"""The layer registry: a new kind added through it alone (one layer class, one config, one entry) trains,
decodes, saves and reloads in a model, and appears in the CLI's options; the built-in kinds' FLOP formulas
agree with torch's counter where it can count."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssmkit.models import ModelCache
from ssmkit.layers import LayerState
from ssmkit.layers.registry import (
    LayerKind,
    by_letter,
    kinds,
    linear_flops,
    register,
    sections,
    unregister,
)
from ssmkit.models import (
    LanguageModel,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    get_preset,
)


@dataclasses.dataclass(kw_only=True)
class LeakyConfig:
    """Settings of the throwaway mixer."""

    decay: float = 0.8
    """Initial per-channel decay of the running average."""

    def validate(self, d_model: int) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"leaky.decay must be in (0, 1), got {self.decay}")


@dataclasses.dataclass(eq=False)
class LeakyState(LayerState):
    kind = "test-leaky"
    h: torch.Tensor


class Leaky(nn.Module):
    """h_t = a h_{t-1} + (1 - a) W_in x_t, y_t = W_out h_t, restarting where seq_idx changes."""

    def __init__(self, d_model: int, config: LeakyConfig, *, layer_idx: int, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.logit = nn.Parameter(torch.full((d_model,), config.decay, device=device).logit())

    def allocate_state(self, batch_size, dtype=None, device=None, max_length=None) -> LeakyState:
        return LeakyState(torch.zeros(batch_size, self.in_proj.in_features, device=device or self.logit.device,
                                      dtype=torch.float32))

    def forward(self, x, *, seq_idx=None, initial_state=None, cache=None):
        a = torch.sigmoid(self.logit)
        u = self.in_proj(x)
        state = cache if cache is not None else initial_state
        h = torch.zeros_like(u[:, 0]) if state is None else state.h.to(u.dtype)
        out = []
        for t in range(x.shape[1]):
            if seq_idx is not None and t > 0:
                h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(h.dtype)[:, None]
            h = a * h + (1 - a) * u[:, t]
            out.append(h)
        if cache is not None:
            cache.h.copy_(h.detach())
        return self.out_proj(torch.stack(out, 1))


@pytest.fixture
def leaky_kind():
    kind = register(LayerKind("L", "leaky", "leaky", LeakyConfig, Leaky,
                              flops=lambda layer, length: linear_flops(layer) + 4 * layer.in_proj.in_features,
                              state=LeakyState, doc="throwaway running average"))
    yield kind
    unregister("L")


def test_a_kind_added_through_the_registry_alone_trains_decodes_saves_and_reloads(leaky_kind, tmp_path):
    config = ModelConfig(vocab_size=32, d_model=16, n_layer=3, layer_pattern="L2m", leaky=LeakyConfig(decay=0.5),
                         mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=8), mlp=MLPConfig(d_intermediate=16))
    assert config.leaky.decay == 0.5 and "leaky" in config.to_dict()
    torch.manual_seed(0)
    model = LanguageModel(config)
    assert isinstance(model.layers[0].mixer, Leaky) and model.flops_per_token(64) > 0

    # trains: the model's own loss goes down
    ids = torch.randint(0, 32, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3

    # decodes: token by token through the cache == one parallel pass; generate works
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(4)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(ids.shape[1])], 1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    cache.save(tmp_path / "state.safetensors")
    assert isinstance(ModelCache.load(tmp_path / "state.safetensors").states[0], LeakyState)
    new = model.generate([[1, 2, 3]], max_new_tokens=5, temperature=0)
    assert len(new[0]) == 5

    # saves and reloads: the config section and the weights
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == config and loaded.config.leaky == LeakyConfig(decay=0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, full)


def test_a_new_kind_gets_its_cli_options_and_pattern_letter(leaky_kind):
    from ssmkit.cli import build_parser

    help_text = next(a for a in build_parser()._actions if a.dest == "command").choices["train"].format_help()
    assert "--model.leaky.decay" in help_text and "Initial per-channel decay" in help_text
    with pytest.raises(ValueError, match=r"leaky.decay must be in \(0, 1\)"):
        ModelConfig(vocab_size=8, d_model=8, n_layer=1, layer_pattern="L", leaky=LeakyConfig(decay=2.0))
    with pytest.raises(ValueError, match="unknown mixer letter 'Q'.*L \\(leaky\\)"):
        ModelConfig(vocab_size=8, d_model=8, n_layer=1, layer_pattern="Q")


def test_registry_refuses_clashes_and_lists_the_builtin_kinds():
    assert [k.letter for k in kinds()] == ["M", "2", "3", "A", "W", "S", "4", "H", "F", "Z", "m", "e", "u"]
    assert sections()["attention"] is by_letter("W").config is by_letter("A").config
    with pytest.raises(ValueError, match="clashes"):
        register(dataclasses.replace(by_letter("M"), name="other"))
    with pytest.raises(ValueError, match="already holds"):
        register(LayerKind("Z", "z", "mamba", LeakyConfig, Leaky, flops=lambda layer, length: 0.0))


@pytest.mark.parametrize("pattern", ["2", "Am", "Wm", "M"])
def test_flop_formulas_cover_what_torch_counts(pattern):
    """torch's counter sees the matrix products (and, for attention, the score products of the math kernel);
    the registry formula counts those and the scans, so it is at least the counter's figure and not far
    above it."""
    config = get_preset("debug-hybrid")
    config.layer_pattern, config.n_layer = pattern, 2
    # The math kernel computes every score of the window; a window as long as the input keeps that the
    # causal half the formula counts (as a causal kernel computes).
    config.attention.num_heads, config.attention.window = 4, 64
    config.mlp.d_intermediate = 64
    model = LanguageModel(config)
    length = 64
    with torch.no_grad(), FlopCounterMode(display=False) as counter, \
            torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        model(torch.zeros(1, length, dtype=torch.long))
    counted = counter.get_total_flops() / length
    ours = model.flops_per_token(length)
    assert 0.8 * counted <= ours <= 2.5 * counted, (ours, counted)


@pytest.mark.parametrize("letter", [k.letter for k in kinds() if not k.feed_forward])
def test_every_builtin_kind_has_a_positive_flop_count_that_grows_only_for_attention(letter):
    """Each registered mixer's formula runs on its layer (built on the meta device) and, apart from full
    attention, costs about the same per token at any length (the scans are linear)."""
    config = ModelConfig(vocab_size=64, d_model=32, n_layer=1, layer_pattern=letter,
                         mamba2=Mamba2Config(headdim=16, d_state=16), s4=get_preset("debug-mamba").s4)
    config.mamba3.headdim, config.attention.num_heads, config.attention.window = 16, 4, 64
    model = LanguageModel(config, device="meta")
    short, long = model.flops_per_token(128), model.flops_per_token(8192)
    assert short > 2 * model.head_weight.numel()
    if letter == "A":
        assert long > 10 * short
    elif letter == "Z":  # a call of a shared transformer block (full attention) beside Mamba-2 and an MLP
        assert long > 4 * short
    elif letter == "F":  # full attention beside a Mamba-2 layer
        assert long > 2 * short
    else:
        assert long < 2 * short


def test_a_config_made_before_a_kind_is_registered_gets_its_defaults():
    config = ModelConfig(vocab_size=8, d_model=8, n_layer=1, layer_pattern="M")
    register(LayerKind("L", "leaky", "leaky", LeakyConfig, Leaky, flops=lambda layer, length: 0.0))
    try:
        assert config.leaky == LeakyConfig() and config.to_dict()["leaky"] == {"decay": 0.8}
        config.validate()
    finally:
        unregister("L")
    with pytest.raises(ValueError, match="leaky: no registered layer kind has this settings section"):
        config.validate()
