"""Context parallelism on CPU: gloo processes, each with its part of the sequence, against one process.

Every worker builds the same full inputs from a seed, runs the single-process computation on the whole
sequence, then its part through the context-parallel path, and compares its outputs and gradients with
the matching part of the single-process ones (per-position gradients directly, shared ones summed over
ranks), within float32 tolerance.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssmkit.distributed import ContextParallel, context_parallel_chunk_scan, split_sequence
from ssmkit.layers import Mamba2
from ssmkit.layers.mamba2 import Mamba2State
from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops import mamba_chunk_scan_combined
from ssmkit.testing import assert_close
from ssmkit.train.distributed import teardown

F32 = torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, checks: list[str]) -> None:
    torch.set_num_threads(1)
    # Triton kernels run in its CPU interpreter, which must be on before triton is first imported.
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    finished = False
    try:
        _run_checks(rank, world, checks)
        finished = True
    finally:
        # Frees the groups now, not at interpreter exit, where gloo's threads would abort the process.
        teardown(wait_for_all=finished)


def _run_checks(rank: int, world: int, checks: list[str]) -> None:
    """The checks on one group, which lives only in here (so teardown can free it)."""
    group = dist.new_group(list(range(world)))
    for check in checks:
        CHECKS[check](rank, world, group)


def _spawn(checks: list[str], world: int) -> None:
    """Run the checks in ``world`` fresh processes (one spawn for several: starting them costs most)."""
    mp.spawn(_worker, args=(world, _free_port(), checks), nprocs=world, join=True)


def _sum_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _op_inputs(b: int, l: int, h: int, p: int, g: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).requires_grad_()

    return {"x": rand(b, l, h, p), "dt": rand(b, l, h, scale=0.5, shift=-1.0),
            "A": (-torch.rand(h, generator=gen) - 0.05).requires_grad_(), "B": rand(b, l, g, n),
            "C": rand(b, l, g, n), "D": rand(h), "z": rand(b, l, h, p), "dt_bias": rand(h, scale=0.1)}


def _seq_idx_rows(world: int, part: int) -> torch.Tensor:
    """Rows with documents that span boundaries, start exactly at one, and start inside a part."""
    l = world * part
    span = torch.zeros(l, dtype=torch.int32)
    span[part - 5:] = 1  # starts 5 positions before the first boundary, runs to the end
    at_edge = torch.zeros(l, dtype=torch.int32)
    at_edge[part:] = 1  # starts exactly at the first boundary
    at_edge[l - 3:] = 2
    inside = torch.zeros(l, dtype=torch.int32)
    inside[part + 7:] = 4  # starts inside rank 1's part (ids need not be consecutive)
    return torch.stack([span, at_edge, inside])


def _check_op_case(rank, world, group, *, part, seq_idx=None, with_z=True, d_per_channel=False,
                   dt_limit=(0.0, float("inf")), initial=False, seed=0, backend="auto"):
    b = 3 if seq_idx is not None else 2
    h, p, g, n, chunk = 4, 8, 2, 8, 16
    inp = _op_inputs(b, world * part, h, p, g, n, seed)
    if d_per_channel:
        inp["D"] = torch.randn(h, p, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
    if not with_z:
        del inp["z"]
    init = torch.randn(b, h, p, n, generator=torch.Generator().manual_seed(seed + 2)).requires_grad_()
    kwargs = {"dt_softplus": True, "dt_limit": dt_limit}
    gen = torch.Generator().manual_seed(seed + 3)
    w_out = torch.randn(b, world * part, h, p, generator=gen)
    w_state = torch.randn(b, h, p, n, generator=gen)

    out, final = mamba_chunk_scan_combined(**inp, chunk_size=chunk, seq_idx=seq_idx, return_final_states=True,
                                           initial_states=init if initial else None, **kwargs)
    ((out * w_out).sum() + (final * w_state).sum()).backward()
    full_grads = {k: v.grad for k, v in inp.items()}
    init_grad = init.grad

    local = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    sliced = {k: split_sequence(v, group) if v.dim() >= 3 else v for k, v in local.items()}
    my_init = init.detach().clone().requires_grad_()
    my_out, my_final = context_parallel_chunk_scan(
        **sliced, chunk_size=chunk, seq_idx=None if seq_idx is None else split_sequence(seq_idx, group),
        initial_states=my_init if initial and rank == 0 else None, return_final_states=True, group=group,
        backend=backend, **kwargs)
    loss = (my_out * split_sequence(w_out, group)).sum()
    if rank == world - 1:
        loss = loss + (my_final * w_state).sum()
    loss.backward()

    assert_close(my_out, split_sequence(out.detach(), group), F32, name=f"rank {rank} out")
    end = (rank + 1) * part
    _, prefix_final = mamba_chunk_scan_combined(
        **{k: v.detach()[:, :end] if v.dim() >= 3 else v.detach() for k, v in inp.items()}, chunk_size=chunk,
        seq_idx=None if seq_idx is None else seq_idx[:, :end], return_final_states=True,
        initial_states=init.detach() if initial else None, **kwargs)
    assert_close(my_final.detach(), prefix_final, F32, name=f"rank {rank} final state")
    for k, v in local.items():
        if v.dim() >= 3:
            assert_close(split_sequence(v.grad, group), split_sequence(full_grads[k], group), F32,
                         name=f"rank {rank} d{k}")
        else:
            assert_close(_sum_over_ranks(v.grad, group), full_grads[k], F32, name=f"d{k}")
    if initial:
        grad = my_init.grad if rank == 0 else torch.zeros_like(init)
        assert_close(_sum_over_ranks(grad, group), init_grad, F32, name="d initial_states")


def _check_op(rank, world, group):
    _check_op_case(rank, world, group, part=37)
    seq_idx = _seq_idx_rows(world, 40)
    _check_op_case(rank, world, group, part=40, seq_idx=seq_idx, with_z=False, d_per_channel=True,
                   dt_limit=(0.01, 0.5), seed=1)
    _check_op_docs(rank, world, group)


def _check_op_docs(rank, world, group):
    _check_op_case(rank, world, group, part=40, seq_idx=_seq_idx_rows(world, 40), initial=True, seed=2)


def _check_op_triton(rank, world, group):
    """Each part scanned by the Triton kernels (what a GPU runs), against the chunked single process."""
    _check_op_case(rank, world, group, part=40, seq_idx=_seq_idx_rows(world, 40), initial=True, seed=3,
                   backend="triton")


def _check_op_errors(rank, world, group):
    inp = {k: v.detach() for k, v in _op_inputs(2, 16, 4, 8, 2, 8, 0).items()}
    if rank == 1:
        # Refused before any collective, so rank 0 need not take part.
        with pytest.raises(ValueError, match="only rank 0"):
            context_parallel_chunk_scan(**inp, chunk_size=8, initial_states=torch.zeros(2, 4, 8, 8), group=group)
    dist.barrier(group)
    other = {k: (v[:1] if v.dim() >= 3 and rank == 1 else v) for k, v in inp.items()}
    with pytest.raises(ValueError, match="ranks disagree"):
        context_parallel_chunk_scan(**other, chunk_size=8, group=group)
    with pytest.raises(TypeError, match="ProcessGroup"):
        context_parallel_chunk_scan(**inp, chunk_size=8, group="world")


def _check_layer(rank, world, group):
    torch.manual_seed(0)
    layer = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, chunk_size=16)
    split = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, chunk_size=16,
                   context_parallel=ContextParallel(group))
    split.load_state_dict(layer.state_dict())
    part = 20
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, world * part, 32, generator=gen)
    w = torch.randn(2, world * part, 32, generator=gen)
    seq_idx = torch.zeros(2, world * part, dtype=torch.int32)
    seq_idx[0, part - 2:] = 1  # the convolution's halo holds two positions of the continuing document
    seq_idx[1, part:] = 1
    for sidx in (None, seq_idx):
        layer.zero_grad()
        full_x = x.clone().requires_grad_()
        out = layer(full_x, seq_idx=sidx)
        (out * w).sum().backward()
        full_grads = {k: v.grad.clone() for k, v in layer.named_parameters()}

        split.zero_grad()
        my_x = split_sequence(x, group).clone().requires_grad_()
        my_out = split(my_x, seq_idx=None if sidx is None else split_sequence(sidx, group))
        (my_out * split_sequence(w, group)).sum().backward()
        what = "seq_idx" if sidx is not None else "one document"
        assert_close(my_out, split_sequence(out.detach(), group), F32, name=f"rank {rank} layer out ({what})")
        assert_close(my_x.grad, split_sequence(full_x.grad, group), F32, name=f"rank {rank} layer dx ({what})")
        for k, v in split.named_parameters():
            assert_close(_sum_over_ranks(v.grad, group), full_grads[k], F32, name=f"d{k} ({what})")

    with pytest.raises(ValueError, match="no cache or initial_state"):
        split(split_sequence(x, group), cache=split.allocate_state(2))
    assert isinstance(split.allocate_state(2), Mamba2State)


def _check_language_model(rank, world, group):
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug-mamba2"))
    part = 24
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (2, world * part), generator=gen)
    seq_idx = torch.zeros(2, world * part, dtype=torch.int32)
    seq_idx[0, part - 1:] = 1
    logits = model(ids, seq_idx=seq_idx).logits
    w = torch.randn(logits.shape, generator=gen)
    (logits * w).sum().backward()
    full_grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    split = LanguageModel(get_preset("debug-mamba2"), context_parallel=ContextParallel(group))
    split.load_state_dict(model.state_dict())

    my_logits = split(split_sequence(ids, group), seq_idx=split_sequence(seq_idx, group)).logits
    (my_logits * split_sequence(w, group)).sum().backward()
    assert_close(my_logits, split_sequence(logits.detach(), group), F32, name=f"rank {rank} logits")
    for k, v in split.named_parameters():
        assert_close(_sum_over_ranks(v.grad, group), full_grads[k], F32, name=f"d{k}")

    with pytest.raises(ValueError, match=r"\(Mamba-2\) only"):
        LanguageModel(get_preset("debug-hybrid"), context_parallel=ContextParallel(group))


CHECKS = {"op": _check_op, "op_docs": _check_op_docs, "op_triton": _check_op_triton, "op_errors": _check_op_errors, "layer": _check_layer,
          "language_model": _check_language_model}


def test_two_ranks_match_one_process():
    """Scan: outputs, final states and every gradient, with documents across boundaries, D, z, groups,
    dt_limit and an initial state; bad calls refused. Mamba2 layer: the convolution's halo from the
    previous rank, with and without documents crossing the boundary. A tiny LanguageModel: logits and
    every parameter's gradient."""
    _spawn(["op", "op_errors", "layer", "language_model"], world=2)


def test_three_ranks_pass_states_through_a_middle_part():
    """Documents that span, start at and start inside the middle part; an initial state on rank 0."""
    _spawn(["op_docs"], world=3)


def test_two_ranks_with_the_triton_scan():
    pytest.importorskip("triton")
    _spawn(["op_triton"], world=2)


def test_split_sequence_needs_a_group():
    with pytest.raises(RuntimeError, match="initialised"):
        split_sequence(torch.zeros(2, 4), group=None)
