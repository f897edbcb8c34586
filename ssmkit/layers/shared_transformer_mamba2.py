"""Zamba2's hybrid layer (letter ``Z``): a call of a shared transformer block, then a Mamba-2 mixer.

For the residual stream r and the model's input embeddings e (transformers' ``Zamba2HybridLayer``)::

    t = linear(shared_block(concat(r, e), this layer's adapters))     # (b, l, d)
    r <- r + mamba2(norm(r + t))

The shared block's weights belong to the model (its table of shared modules, built once by the registry
entry's ``shared`` hook: ``num_blocks`` :class:`~ssmkit.layers.shared_transformer.SharedTransformer`); this
layer holds a reference to block ``invocation % num_blocks`` (not a submodule: its parameters are the
model's, once) and owns what is its own: ``linear`` [d, d], the low-rank adapters added to the block's MLP
(``mlp_adapter``: [r, d] then [2f, r]) and, with ``attention_adapters``, to its q, k, v projections
(``q_adapter``/``k_adapter``/``v_adapter``: [r, 2d] then [h·p or hk·p, r]), and its Mamba-2 mixer
``mamba`` (the model's ``mamba2`` settings). The block's ``norm`` is the Mamba-2 input norm.

Because the layer reads the residual before the norm and the model's input embeddings, it runs through
``forward_from_residual`` (:class:`ssmkit.layers.Block` calls it); its decode state
(:class:`SharedTransformerMamba2State`) holds the attention KV of this call and the Mamba-2 states.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ssmkit.layers.attention import AttentionState
from ssmkit.layers.configs import Mamba2Config
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.shared_transformer import SharedTransformer, SharedTransformerConfig
from ssmkit.layers.state import LayerState


@dataclasses.dataclass(eq=False)
class SharedTransformerMamba2State(LayerState):
    """Decode state of one ``Z`` layer: its shared-attention call's KV cache (``k``, ``v``, ``length``: the
    fields of :class:`ssmkit.layers.AttentionState`, grown the same way) and its Mamba-2 states (``conv``,
    ``ssm``: :class:`ssmkit.layers.Mamba2State`'s)."""

    kind = "shared_transformer_mamba2"
    conv: Tensor
    ssm: Tensor
    k: Tensor
    v: Tensor
    length: Tensor

    def mamba(self) -> Mamba2State:
        """The Mamba-2 part (the same tensors)."""
        return Mamba2State(self.conv, self.ssm)

    def attention(self) -> AttentionState:
        """The attention part (the same tensors; after a call that grew it, :meth:`take` writes it back)."""
        return AttentionState(self.k, self.v, self.length)

    def take(self, attention: AttentionState) -> None:
        """Adopt the (possibly grown) KV tensors of ``attention``, an :meth:`attention` view of this state."""
        self.k, self.v = attention.k, attention.v

    def copy_(self, other: LayerState) -> SharedTransformerMamba2State:
        """Overwrite with ``other``'s values; a KV cache of another capacity is taken over as
        :meth:`ssmkit.layers.AttentionState.copy_` does."""
        if type(other) is not type(self):
            raise TypeError(f"cannot copy a {type(other).__name__} into a {type(self).__name__}")
        self.mamba().copy_(other.mamba())
        attention = self.attention()
        attention.copy_(other.attention())
        self.take(attention)
        return self


class SharedTransformerMamba2(nn.Module):
    """The ``Z`` layer (see the module docstring).

    Args:
        d_model: width d. config: the shared blocks' :class:`SharedTransformerConfig`. mamba2: the Mamba-2
        mixer's settings. shared: the model's shared blocks (an ``nn.ModuleList``); this layer calls block
        ``invocation % len(shared)`` with its own adapters. norm_eps: eps of the Mamba-2 gated norm.

    Example::

        cfg = SharedTransformerConfig(num_heads=4, d_intermediate=128, adapter_rank=8)
        blocks = build_shared_blocks(64, cfg, norm_eps=1e-5)
        layer = SharedTransformerMamba2(64, cfg, Mamba2Config(headdim=16, d_state=16), blocks, invocation=0)
        block = Block(64, layer)
        r = block(x, inputs=x)          # x: the model's input embeddings (b, l, 64)
    """

    def __init__(self, d_model: int, config: SharedTransformerConfig, mamba2: Mamba2Config, shared: nn.ModuleList,
                 invocation: int, *, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate(d_model)
        if len(shared) != config.num_blocks or not all(isinstance(b, SharedTransformer) for b in shared):
            raise ValueError(f"shared must hold the model's {config.num_blocks} SharedTransformer blocks, got "
                             f"{len(shared)} modules")
        factory = {"device": device, "dtype": dtype}
        self.config, self.d_model, self.layer_idx = config, d_model, layer_idx
        self.invocation, self.block_index = invocation, invocation % config.num_blocks
        # A reference, not a submodule: the block's parameters are the model's (its shared table), once.
        object.__setattr__(self, "shared", shared[self.block_index])
        r, f = config.adapter_rank, config.mlp_width(d_model)
        self.linear = nn.Linear(d_model, d_model, bias=False, **factory)
        self.mlp_adapter = _low_rank(d_model, r, 2 * f, factory)
        if config.attention_adapters:
            p = config.head_size(d_model)
            self.q_adapter = _low_rank(2 * d_model, r, config.num_heads * p, factory)
            self.k_adapter = _low_rank(2 * d_model, r, config.kv_heads() * p, factory)
            self.v_adapter = _low_rank(2 * d_model, r, config.kv_heads() * p, factory)
        self.mamba = Mamba2(d_model, mamba2, norm_eps=norm_eps, layer_idx=layer_idx, **factory)

    @property
    def decode_graph_blocker(self) -> str | None:
        return "a shared transformer call (full attention: its KV cache length is read on the host each step)"

    def attention_deltas(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """This call's terms added to the shared q, k, v projections of the normed input h (b, l, 2d)."""
        if not self.config.attention_adapters:
            return None
        return self.q_adapter(h), self.k_adapter(h), self.v_adapter(h)

    def mlp_delta(self, h: Tensor) -> Tensor:
        """This call's term added to the shared MLP's gate and up projections of h (b, l, d)."""
        return self.mlp_adapter(h)

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> SharedTransformerMamba2State:
        """A zero state: the Mamba-2 states and an empty KV cache (room for ``max_length`` tokens)."""
        m = self.mamba.allocate_state(batch_size, dtype=dtype, device=device)
        a = self.shared.self_attn.allocate_state(batch_size, dtype=dtype, device=device, max_length=max_length)
        return SharedTransformerMamba2State(m.conv, m.ssm, a.k, a.v, a.length)

    def forward(self, x: Tensor, **kwargs: object) -> Tensor:
        raise TypeError(f"{self._name()} reads the residual stream before its norm and the model's input "
                        "embeddings: run it inside a Block, called with inputs= (Block.forward uses "
                        "forward_from_residual)")

    def forward_from_residual(self, residual: Tensor, norm: nn.Module, *, inputs: Tensor | None,
                              seq_idx: Tensor | None = None, initial_state: SharedTransformerMamba2State | None = None,
                              cache: SharedTransformerMamba2State | None = None) -> Tensor:
        """The block's update of the residual stream: residual (b, l, d) -> residual + mamba2(norm(residual +
        t)), t this layer's shared-transformer call on (residual, inputs); ``inputs`` (b, l, d) are the
        model's input embeddings. ``initial_state`` is read, ``cache`` updated in place."""
        if inputs is None:
            raise ValueError(f"{self._name()}: needs the model's input embeddings (inputs=)")
        if inputs.shape != residual.shape:
            raise ValueError(f"{self._name()}: inputs must have the residual's shape {tuple(residual.shape)}, "
                             f"got {tuple(inputs.shape)}")
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        state = cache if cache is not None else initial_state
        if state is not None and not isinstance(state, SharedTransformerMamba2State):
            raise TypeError(f"{self._name()}: state must be a SharedTransformerMamba2State, "
                            f"got {type(state).__name__}")
        dtype = norm.weight.dtype
        attention = None if state is None else state.attention()
        t = self.shared(torch.cat([residual.to(dtype), inputs.to(dtype)], dim=-1), adapters=self, seq_idx=seq_idx,
                        cache=attention if cache is not None else None,
                        initial_state=attention if cache is None else None)
        if cache is not None:
            cache.take(attention)
        h = norm(residual + self.linear(t).to(residual.dtype)).to(dtype)
        mamba = None if state is None else state.mamba()
        y = self.mamba(h, seq_idx=seq_idx, cache=mamba if cache is not None else None,
                       initial_state=mamba if cache is None else None)
        return residual + y

    def _name(self) -> str:
        return "SharedTransformerMamba2" if self.layer_idx is None else f"SharedTransformerMamba2 (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return f"invocation={self.invocation}, shared_block={self.block_index}"


def _low_rank(n_in: int, rank: int, n_out: int, factory: dict) -> nn.Sequential:
    """An adapter ``x -> B(A(x))``, A [rank, n_in], B [n_out, rank], no biases (transformers' names .0 / .1)."""
    return nn.Sequential(nn.Linear(n_in, rank, bias=False, **factory), nn.Linear(rank, n_out, bias=False, **factory))


__all__ = ["SharedTransformerMamba2", "SharedTransformerMamba2State"]
