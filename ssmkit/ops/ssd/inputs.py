"""The validated inputs of one SSD call: built once by :func:`check_ssd_inputs`, taken by every backend.

The public op, context parallelism and the fused layer functions all validate through here, so a backend
never re-checks and never repeats the op's argument list.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops._inputs import OpInputs
from ssmkit.ops._step_sizes import NO_LIMIT, check_dt_limit
from ssmkit.ops.chunking import check_chunk_size

__all__ = ["SSDInputs", "check_ssd_inputs"]


def doc_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) bool: True where a new document begins (position 0 excluded)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


@dataclasses.dataclass(frozen=True)
class SSDInputs(OpInputs):
    """Checked arguments of ``mamba_chunk_scan_combined`` (see there for their meaning).

    Shapes: x, z (b, l, h, p); dt, input_scale (b, l, h); A, dt_bias (h,); B, C (b, l, g, n); D (h,) or
    (h, p); initial_states (b, h, p, n); seq_idx (b, l) (derived from ``cu_seqlens`` when only that was
    given); cu_seqlens (s + 1,) only when the varlen states are wanted, else None. ``device`` is the one
    all tensors share.
    """

    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    chunk_size: int
    D: torch.Tensor | None
    z: torch.Tensor | None
    dt_bias: torch.Tensor | None
    initial_states: torch.Tensor | None
    seq_idx: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    dt_softplus: bool
    dt_limit: tuple[float, float]
    input_scale: torch.Tensor | None
    device: torch.device

    def unpack(self) -> tuple:
        """The fields in order but ``device`` (what the backends take)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self)[:-1])


def check_ssd_inputs(args: Mapping[str, Any]) -> SSDInputs:
    """Check the arguments of ``mamba_chunk_scan_combined`` given by name (its ``locals()``; optional ones may
    be missing) and return them as :class:`SSDInputs`; a clear TypeError / ValueError names a wrong one."""
    x, dt, A, B, C, chunk_size = (args[k] for k in ("x", "dt", "A", "B", "C", "chunk_size"))
    D, z, dt_bias, initial_states, seq_idx, cu_seqlens, input_scale = (
        args.get(k) for k in ("D", "z", "dt_bias", "initial_states", "seq_idx", "cu_seqlens", "input_scale")
    )
    dt_softplus, dt_limit = args.get("dt_softplus", False), args.get("dt_limit", NO_LIMIT)
    return_varlen_states = args.get("return_varlen_states", False)
    dims = Dims()
    check_tensor("x", x, ("b", "l", "h", "p"), dims)
    check_tensor("dt", dt, ("b", "l", "h"), dims)
    check_tensor("A", A, ("h",), dims)
    check_tensor("B", B, ("b", "l", "g", "n"), dims)
    check_tensor("C", C, ("b", "l", "g", "n"), dims)
    check_chunk_size(chunk_size)
    if D is not None:
        check_tensor("D", D, ("h",) if isinstance(D, torch.Tensor) and D.dim() == 1 else ("h", "p"), dims)
    if z is not None:
        check_tensor("z", z, ("b", "l", "h", "p"), dims)
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, ("h",), dims)
    if initial_states is not None:
        check_tensor("initial_states", initial_states, ("b", "h", "p", "n"), dims)
    if input_scale is not None:
        check_tensor("input_scale", input_scale, ("b", "l", "h"), dims)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), dims, floating=False, integer=True)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ("num_seqs+1",), dims, floating=False, integer=True)
    for name, what in (("b", "batch"), ("l", "length"), ("h", "heads"), ("p", "head dim"), ("g", "groups"),
                       ("n", "state")):
        check_nonempty("x" if name in "blhp" else "B", dims[name], f"{what} ({name})")
    if dims["h"] % dims["g"] != 0:
        raise ValueError(f"B and C: heads (h={dims['h']}) must be divisible by groups (g={dims['g']})")
    for name, flag in (("dt_softplus", dt_softplus), ("return_varlen_states", return_varlen_states)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    dt_limit = check_dt_limit(dt_limit)
    device = check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                               initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                               input_scale=input_scale)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens")
    if cu_seqlens is not None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, seq_idx, dims["b"], dims["l"])
    return SSDInputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     cu_seqlens if return_varlen_states else None, dt_softplus, dt_limit, input_scale, device)


def _seq_idx_from_cu_seqlens(
    cu_seqlens: torch.Tensor, seq_idx: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor:
    """Check ``cu_seqlens`` and return the ``seq_idx`` it implies (checked against a given one)."""
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of 1; x has batch {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(e <= s for s, e in itertools.pairwise(bounds)):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to the length {length} (no empty sequences), got {bounds}"
        )
    lengths = torch.tensor([e - s for s, e in itertools.pairwise(bounds)], device=cu_seqlens.device)
    implied = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[None]
    if seq_idx is None:
        return implied.to(torch.int32)
    if not torch.equal(doc_starts(seq_idx), doc_starts(implied)):
        raise ValueError("seq_idx must change exactly at the cu_seqlens boundaries")
    return seq_idx
