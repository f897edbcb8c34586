"""mamba_ssm's fused layer functions composed from ssmkit's ops, against float64 compositions written
out step by step here (torch's own convolution, the SSD / selective-scan references, the norm formula)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.fused import mamba_inner_fn, mamba_split_conv1d_scan_combined
from ssmkit.ops.selective_scan import selective_scan_fn
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.testing import assert_outputs_and_grads_close, float64_leaf


def _conv(x, weight, bias, activation, seq_idx=None):
    """Causal depthwise convolution of x (b, d, l) by torch's conv1d, one document at a time."""
    if seq_idx is None:
        out = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
        return F.silu(out) if activation else out
    outs = []
    for row in range(x.shape[0]):
        ids = seq_idx[row]
        starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
        outs.append(torch.cat([_conv(x[row : row + 1, :, s:e], weight, bias, activation)
                               for s, e in zip(starts[:-1], starts[1:])], dim=-1))
    return torch.cat(outs)


def _gated_rms(y, z, weight, eps, group_size, norm_before_gate):
    h = y if norm_before_gate else y * F.silu(z)
    g = h.unflatten(-1, (-1, group_size))
    out = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return out * F.silu(z) if norm_before_gate else out


def _split_conv1d_scan_composed(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk, init, seq_idx, dt_limit,
                                norm_w, out_w, out_b, headdim, ngroups, norm_before_gate, d_nonssm):
    h = A.shape[0]
    dim = h * headdim
    dstate = (conv_w.shape[0] - dim) // (2 * ngroups)
    zx0, z, xBC, dt = zxbcdt.split([2 * d_nonssm, dim, dim + 2 * ngroups * dstate, h], dim=-1)
    xBC = _conv(xBC.transpose(1, 2), conv_w, conv_b, True, seq_idx).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    b, l = zxbcdt.shape[:2]
    zz = z.unflatten(-1, (h, headdim))
    y, final = mamba_chunk_scan_combined(
        x.unflatten(-1, (h, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate)),
        chunk, D=D, z=zz if norm_w is None else None, dt_bias=dt_bias, initial_states=init, seq_idx=seq_idx,
        dt_softplus=True, dt_limit=dt_limit, return_final_states=True, backend="reference")
    y = y.reshape(b, l, dim)
    if norm_w is not None:
        y = _gated_rms(y, z, norm_w, 1e-5, dim // ngroups, norm_before_gate)
    if d_nonssm:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if out_w is not None:
        y = F.linear(y, out_w, out_b)
    return y, final


SPLIT_CASES = {
    "mamba2_layer": dict(norm=True, out=True, d_nonssm=0, D2=False, docs=False, init=True, groups=2, before=False),
    "gate_in_scan_no_proj": dict(norm=False, out=False, d_nonssm=0, D2=True, docs=False, init=False, groups=1,
                                 before=True),
    "nonssm_mlp_docs": dict(norm=True, out=True, d_nonssm=3, D2=False, docs=True, init=False, groups=1, before=True),
    "limit_docs_init": dict(norm=False, out=True, d_nonssm=2, D2=True, docs=True, init=True, groups=2, before=False,
                            limit=(0.05, 0.4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_conv1d_scan_outputs_and_every_gradient(case, dtype):
    opts = SPLIT_CASES[case]
    b, l, h, p, g, n, w, chunk = 2, 19, 4, 3, 2, 5, 4, 8
    g = opts["groups"]
    dim, d_nonssm = h * p, opts["d_nonssm"]
    conv_dim = dim + 2 * g * n
    named = {
        "zxbcdt": torch.randn(b, l, 2 * d_nonssm + dim + conv_dim + h),
        "conv1d_weight": torch.randn(conv_dim, w) * 0.5,
        "conv1d_bias": torch.randn(conv_dim) * 0.1,
        "dt_bias": torch.randn(h) - 1,
        "A": -torch.rand(h) - 0.2,
        "D": torch.randn(h, p) if opts["D2"] else torch.randn(h),
        "initial_states": torch.randn(b, h, p, n) if opts["init"] else None,
        "rmsnorm_weight": 1 + 0.1 * torch.randn(dim) if opts["norm"] else None,
        "outproj_weight": torch.randn(7, dim + d_nonssm) * 0.3 if opts["out"] else None,
        "outproj_bias": torch.randn(7) if opts["out"] else None,
    }
    named = {k: None if t is None else t.to(dtype).requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    seq_idx = torch.tensor([[0] * 7 + [1] * 12, [0] * 13 + [2] * 6], dtype=torch.int32) if opts["docs"] else None
    limit = opts.get("limit", (0.0, float("inf")))
    out, final = mamba_split_conv1d_scan_combined(
        named["zxbcdt"], named["conv1d_weight"], named["conv1d_bias"], named["dt_bias"], named["A"], named["D"],
        chunk, named["initial_states"], seq_idx, limit, True, "silu", named["rmsnorm_weight"], 1e-5,
        named["outproj_weight"], named["outproj_bias"], headdim=p, ngroups=g, norm_before_gate=opts["before"],
        backend="chunked",
    )
    exp, exp_final = _split_conv1d_scan_composed(
        named64["zxbcdt"], named64["conv1d_weight"], named64["conv1d_bias"], named64["dt_bias"], named64["A"],
        named64["D"], chunk, named64["initial_states"], seq_idx, limit, named64["rmsnorm_weight"],
        named64["outproj_weight"], named64["outproj_bias"], p, g, opts["before"], d_nonssm,
    )
    assert out.dtype == dtype
    assert_outputs_and_grads_close([out, final.to(dtype) if dtype != torch.float32 else final], [exp, exp_final],
                                   named, named64, dtype, names=["out", "final_states"])


def test_split_conv1d_scan_checks_shapes():
    h, p, n, dim = 2, 4, 3, 8
    zxbcdt = torch.randn(1, 5, 2 * dim + 2 * n + h)
    args = (torch.randn(dim + 2 * n, 4), None, torch.zeros(h), -torch.ones(h))
    with pytest.raises(ValueError, match="headdim"):
        mamba_split_conv1d_scan_combined(zxbcdt, *args, torch.ones(h), 4)
    with pytest.raises(ValueError, match="zxbcdt's last dimension"):
        mamba_split_conv1d_scan_combined(zxbcdt[..., 1:], *args, torch.ones(h), 4, headdim=p)
    with pytest.raises(ValueError, match="ngroups"):
        mamba_split_conv1d_scan_combined(zxbcdt, *args, torch.ones(h), 4, headdim=p, ngroups=3)
    with pytest.raises(ValueError, match="outproj_bias"):  # mamba_ssm asserts; it must not be dropped silently
        mamba_split_conv1d_scan_combined(zxbcdt, *args, None, 4, headdim=p, outproj_bias=torch.ones(dim))
    out = mamba_split_conv1d_scan_combined(zxbcdt, *args, None, 4, headdim=p)
    assert out.shape == (1, 5, dim)


def _inner_composed(xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, A, D, delta_bias, B_bias, C_bias,
                    b_rms, c_rms, dt_rms, eps):
    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    x, z = xz.chunk(2, dim=1)
    x = _conv(x, conv_w[:, 0], conv_b, True)
    n = A.shape[1]
    dt, B, C = x_proj.shape[0] - 2 * n, None, None
    x_dbl = x.transpose(1, 2) @ x_proj.T
    delta = x_dbl[..., :dt] @ dt_proj.T
    B, C = x_dbl[..., dt : dt + n], x_dbl[..., dt + n :]
    if B_bias is not None:
        B, C = B + B_bias, C + C_bias
    if b_rms is not None:
        B, C, delta = rms(B, b_rms), rms(C, c_rms), rms(delta, dt_rms)
    y = selective_scan_fn(x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z, delta_bias,
                          True, backend="reference")
    return y.transpose(1, 2) @ out_w.T + (out_b if out_b is not None else 0)


@pytest.mark.parametrize("layout", ["channel", "time"])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1])
@pytest.mark.parametrize("extras", [False, True])
def test_mamba_inner_fn_outputs_and_every_gradient(extras, checkpoint_lvl, layout):
    b, d, l, n, r, w, out_dim = 2, 6, 13, 4, 3, 4, 5
    named = {
        "xz": torch.randn(b, 2 * d, l),
        "conv1d_weight": torch.randn(d, 1, w) * 0.5,
        "conv1d_bias": torch.randn(d) * 0.1,
        "x_proj_weight": torch.randn(r + 2 * n, d) * 0.4,
        "delta_proj_weight": torch.randn(d, r) * 0.4,
        "out_proj_weight": torch.randn(out_dim, d) * 0.4,
        "out_proj_bias": torch.randn(out_dim) if extras else None,
        "A": -torch.rand(d, n) - 0.2,
        "D": torch.randn(d),
        "delta_bias": torch.randn(d) - 1,
        "B_proj_bias": torch.randn(n) if extras else None,
        "C_proj_bias": torch.randn(n) if extras else None,
        "b_rms_weight": 1 + 0.1 * torch.randn(n) if extras else None,
        "c_rms_weight": 1 + 0.1 * torch.randn(n) if extras else None,
        "dt_rms_weight": 1 + 0.1 * torch.randn(d) if extras else None,
    }
    named = {k: None if t is None else t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    kw = {k: named[k] for k in ("D", "delta_bias", "B_proj_bias", "C_proj_bias", "b_rms_weight", "c_rms_weight",
                                "dt_rms_weight")}
    out = mamba_inner_fn(named["xz"], named["conv1d_weight"], named["conv1d_bias"], named["x_proj_weight"],
                         named["delta_proj_weight"], named["out_proj_weight"], named["out_proj_bias"], named["A"],
                         **kw, checkpoint_lvl=checkpoint_lvl, b_c_dt_rms_eps=1e-5, layout=layout, backend="chunked")
    exp = _inner_composed(*(named64[k] for k in ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight",
                                                 "delta_proj_weight", "out_proj_weight", "out_proj_bias", "A", "D",
                                                 "delta_bias", "B_proj_bias", "C_proj_bias", "b_rms_weight",
                                                 "c_rms_weight", "dt_rms_weight")), 1e-5)
    assert_outputs_and_grads_close([out], [exp], named, named64, torch.float32)


def test_mamba_inner_fn_refuses_what_it_does_not_do():
    d, n = 4, 3
    args = (torch.randn(1, 2 * d, 5), torch.randn(d, 1, 4), None, torch.randn(2 + 2 * n, d), torch.randn(d, 2),
            torch.randn(3, d), None)
    with pytest.raises(TypeError, match="complex"):
        mamba_inner_fn(*args, torch.randn(d, n, dtype=torch.complex64))
    with pytest.raises(ValueError, match="time-invariant"):
        mamba_inner_fn(*args, -torch.rand(d, n), B=torch.randn(d, n))
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        mamba_inner_fn(*args, -torch.rand(d, n), checkpoint_lvl=2)
    with pytest.raises(ValueError, match="layout"):
        mamba_inner_fn(*args, -torch.rand(d, n), layout="b l d")


def test_a_retained_graph_backs_through_the_fused_function_again():
    """retain_graph=True (gradcheck, penalties on gradients): a second backward recomputes and gives the same
    gradients; without it, torch's own error about the freed graph."""
    d, n, l = 4, 3, 9
    xz = torch.randn(2, 2 * d, l, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(d, 1, 4, dtype=torch.float64), torch.randn(d, dtype=torch.float64),
               torch.randn(2 + 2 * n, d, dtype=torch.float64), torch.randn(d, 2, dtype=torch.float64),
               torch.randn(3, d, dtype=torch.float64), None, -torch.rand(d, n, dtype=torch.float64) - 0.2]
    weights = [None if w is None else (w * 0.5).requires_grad_() for w in weights]

    def loss():
        return mamba_inner_fn(xz, *weights, D=torch.ones(d, dtype=torch.float64), backend="chunked").square().sum()

    value = loss()
    first = torch.autograd.grad(value, [xz, weights[0], weights[6]], retain_graph=True)
    second = torch.autograd.grad(value, [xz, weights[0], weights[6]])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    value = loss()
    value.backward()
    with pytest.raises(RuntimeError, match="second time"):
        value.backward()


def _alive_intermediate_bytes(fn, keep) -> int:
    """Bytes of the storages made by ops inside ``fn()`` that are still alive after it returns, other than
    those of its outputs and of ``keep()`` (inputs, the hook's own copies)."""
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    made: list[weakref.ref] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    made.append(weakref.ref(t))
            return out

    with Record():
        result = fn()
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in (*keep(), *result)}
    alive = {}
    for ref in made:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(alive.values())


@pytest.mark.parametrize("fn", ["mamba_inner_fn", "mamba_split_conv1d_scan_combined"])
def test_under_offloading_hooks_the_fused_functions_keep_no_activation_of_their_own(fn):
    """Under saved-tensors hooks that take what they are given elsewhere (save_on_cpu, activation
    checkpointing's placeholders), every intermediate must reach the hooks: none may stay alive in the
    function's context (checkpointing or offloading would then save nothing on these layers)."""
    torch.manual_seed(0)
    d, n, r, l, h, p = 4, 3, 2, 9, 2, 2
    if fn == "mamba_inner_fn":
        leaves = [torch.randn(2, 2 * d, l), torch.randn(d, 1, 4), torch.randn(d), torch.randn(r + 2 * n, d),
                  torch.randn(d, r), torch.randn(3, d), -torch.rand(d, n) - 0.2, torch.ones(d)]
        leaves = [t.requires_grad_() for t in leaves]

        def call():
            return (mamba_inner_fn(*leaves[:6], None, leaves[6], D=leaves[7], backend="chunked"),)
    else:
        dim = h * p
        leaves = [torch.randn(2, l, 2 * dim + 2 * n + h), torch.randn(dim + 2 * n, 4), torch.zeros(h),
                  -torch.rand(h) - 0.2, torch.ones(h), torch.ones(dim), torch.randn(5, dim)]
        leaves = [t.requires_grad_() for t in leaves]

        def call():
            return mamba_split_conv1d_scan_combined(
                *leaves[:2], None, *leaves[2:5], 4, return_final_states=True, rmsnorm_weight=leaves[5],
                outproj_weight=leaves[6], headdim=p, backend="chunked")

    copies: list[torch.Tensor] = []

    def offload(t):
        copies.append(t.detach().clone())
        return len(copies) - 1

    with torch.autograd.graph.saved_tensors_hooks(offload, copies.__getitem__):
        held = _alive_intermediate_bytes(call, lambda: [*leaves, *copies])
    assert held == 0, f"{held} bytes of intermediates kept outside the saved-tensors hooks"


@pytest.mark.parametrize("layout", ["channel", "time"])
def test_mamba_inner_fn_normalises_a_given_B_and_C_too(layout):
    """mamba_ssm applies b_rms_weight / c_rms_weight to B and C whether they come from x_proj or are given;
    a given B or C with a norm weight must not be used un-normalised."""
    torch.manual_seed(0)
    b, d, l, n, r = 2, 4, 7, 3, 2
    xz, conv_w, x_proj, dt_proj, out_w = (torch.randn(b, 2 * d, l), torch.randn(d, 1, 4) * 0.5,
                                          torch.randn(r + 2 * n, d) * 0.4, torch.randn(d, r) * 0.4,
                                          torch.randn(5, d) * 0.4)
    A, B, C = -torch.rand(d, n) - 0.2, torch.randn(b, n, l), torch.randn(b, 1, n, l)
    b_rms, c_rms = 1 + 0.3 * torch.randn(n), 1 + 0.3 * torch.randn(n)
    leaves = [t.double().requires_grad_() for t in (xz, B, C, b_rms, c_rms)]
    xz64, B64, C64, b64, c64 = leaves

    def rms(t, w):  # over N (dim -2)
        return t * torch.rsqrt(t.pow(2).mean(-2, keepdim=True) + 1e-5) * w[:, None]

    x = _conv(xz64[:, :d], conv_w[:, 0].double(), None, True)
    delta = (x.transpose(1, 2) @ x_proj.double()[:r].T) @ dt_proj.double().T
    y = selective_scan_fn(x, delta.transpose(1, 2), A.double(), rms(B64, b64), rms(C64, c64), None,
                          xz64[:, d:], None, True, backend="reference")
    exp = y.transpose(1, 2) @ out_w.double().T
    out = mamba_inner_fn(xz64, conv_w.double(), None, x_proj.double(), dt_proj.double(), out_w.double(), None,
                         A.double(), B=B64, C=C64, b_rms_weight=b64, c_rms_weight=c64, b_c_dt_rms_eps=1e-5,
                         layout=layout, backend="chunked")
    torch.testing.assert_close(out, exp)
    cot = torch.randn_like(exp)
    got = torch.autograd.grad((out * cot).sum(), leaves)
    want = torch.autograd.grad((exp * cot).sum(), leaves)
    for name, g, w in zip(("xz", "B", "C", "b_rms_weight", "c_rms_weight"), got, want):
        torch.testing.assert_close(g, w, msg=name)
