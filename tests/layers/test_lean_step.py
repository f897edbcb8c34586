"""The lean decode steps of Mamba / Mamba-2 blocks equal the blocks' own step (layers/lean_step.py)."""

import copy

import pytest
import torch
from torch import nn

from ssmkit.layers import Block, Mamba, Mamba2
from ssmkit.layers.lean_step import Mamba2Step, MambaStep, lean_block_step, state_fits
from ssmkit.layers.quantized import quantize_int8_
from ssmkit.ops.state_update.native import native_ssd_step

MAMBA2_VARIANTS = {
    "default": {},
    "groups": {"ngroups": 2},
    "D per channel": {"D_has_hdim": True},
    "no gated norm": {"rmsnorm": False},
    "dt limit": {"dt_limit": (0.01, 0.05)},
    "biases": {"bias": True, "conv_bias": False},
    # Falcon-H1's options: a width apart from expand, in_proj scales per part, out_proj's own bias setting.
    "falcon-h1 options": {"d_inner": 48, "in_proj_multipliers": (0.5, 2.0, 0.25, 1.5, 3.0), "out_proj_bias": True},
}
# (tolerance on the output, on the states) per weight dtype: bf16 rounds activations where the layer does,
# but a different summation order can move a bf16 rounding by one step.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (6e-2, 2e-2)}


def _block(mixer: nn.Module, dtype: torch.dtype, residual_in_fp32: bool = True, d_model: int = 32) -> Block:
    torch.manual_seed(1)
    block = Block(d_model, mixer, residual_in_fp32=residual_in_fp32)
    with torch.no_grad():
        for p in block.parameters():  # non-trivial norms, biases and D
            p.add_(0.1 * torch.randn_like(p))
    return block.to(dtype).eval()


def _compare(block: Block, dtype: torch.dtype, batch: int = 2, steps: int = 4, fused: bool | str = True) -> None:
    """The lean step and the block's step from the same prompt state: outputs and states after each token
    (``fused=False``: the convolution and state updates by torch's ops, as where the native kernels are not
    built; Mamba-2's native steps: ``True`` the whole block in one call, ``"conv"`` the convolution and state
    step in one call between torch's norm and matmuls, ``"separate"`` those two as two calls, as with in_proj
    multipliers)."""
    torch.manual_seed(2)
    lean = lean_block_step(block)
    assert lean is not None
    if not fused:  # torch's ops where the native kernels would run
        lean.fused_step = lean.selective_step = lean.mamba2_step = lean.conv.native = None
        lean.mamba2_conv_step = None
    else:
        assert lean.conv.native is not None and getattr(lean, "mamba2_step", True) is not None
        assert lean.layer_step is not None or (isinstance(lean, Mamba2Step) and lean.in_scale is not None)
    if fused in ("separate", "conv") or not fused:
        lean.layer_step = None
    if fused == "separate":
        lean.mamba2_conv_step = None
    elif fused and isinstance(lean, Mamba2Step) and lean.in_scale is None:
        assert lean.mamba2_conv_step is not None and (fused == "conv" or lean.layer_step is not None)
    theirs = block.allocate_state(batch)
    with torch.no_grad():
        block(torch.randn(batch, 6, 32, dtype=dtype), cache=theirs)  # a prefilled state
        ours = theirs.clone()
        assert state_fits(lean, ours, batch)
        out_tol, state_tol = TOLERANCE[dtype]
        for _ in range(steps):
            r = torch.randn(batch, 1, 32, dtype=dtype)
            expected = block(r, cache=theirs)[:, 0]
            r_in = r[:, 0].to(torch.float32) if block.residual_in_fp32 else r[:, 0]
            got = lean(r_in, ours)
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, rtol=out_tol, atol=out_tol)
            for name, t in theirs.tensors().items():
                torch.testing.assert_close(getattr(ours, name).float(), t.float(), rtol=state_tol, atol=state_tol,
                                           msg=lambda m, name=name: f"state.{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("fused", [True, False], ids=["native steps", "torch steps"])
@pytest.mark.parametrize("d_state", [8, 16, 35])  # the vector loop, and its remainder
def test_mamba_step_equals_the_block_step(dtype, residual_in_fp32, fused, d_state):
    if fused and native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    block = _block(Mamba(32, d_state=d_state, bias=True), dtype, residual_in_fp32)
    assert isinstance(lean_block_step(block), MambaStep)
    _compare(block, dtype, fused=fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", MAMBA2_VARIANTS)
@pytest.mark.parametrize("fused", [True, "conv", "separate", False],
                         ids=["block in one call", "conv and state step in one", "native conv, native state step",
                              "torch steps"])
def test_mamba2_step_equals_the_block_step(dtype, variant, fused):
    if fused and native_ssd_step() is None:
        pytest.skip("no C compiler here: the fused state step is not built")
    block = _block(Mamba2(32, d_state=8, headdim=8, **MAMBA2_VARIANTS[variant]), dtype)
    assert isinstance(lean_block_step(block), Mamba2Step)
    _compare(block, dtype, batch=1 if variant == "default" else 3, fused=fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["default", "groups", "D per channel", "no gated norm", "dt limit", "biases"])
def test_mamba2_conv_step_equals_the_separate_native_steps(dtype, variant):
    """The one-call convolution + state step rounds where the two calls and the casts between them round:
    the same outputs and states, bit for bit, token after token (so the block-step tolerances above are not
    what hides a missed rounding in bfloat16)."""
    if native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    block = _block(Mamba2(32, d_state=16, headdim=8, **MAMBA2_VARIANTS[variant]), dtype)
    one, two = lean_block_step(block), lean_block_step(block)
    one.layer_step = two.layer_step = two.mamba2_conv_step = None
    assert one.mamba2_conv_step is not None
    torch.manual_seed(3)
    ours = block.allocate_state(3)
    with torch.no_grad():
        block(torch.randn(3, 5, 32, dtype=dtype), cache=ours)
        theirs = ours.clone()
        for _ in range(5):
            r = torch.randn(3, 32)
            torch.testing.assert_close(one(r, ours), two(r, theirs), rtol=0, atol=0)
            for name, t in theirs.tensors().items():
                torch.testing.assert_close(getattr(ours, name), t, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["default", "groups", "D per channel", "no gated norm", "biases"])
@pytest.mark.parametrize("batch", [1, 3])
def test_mamba2_layer_step_equals_the_torch_norm_and_matmuls_around_it(dtype, variant, batch):
    """The whole block in one native call against the same step with torch's RMSNorm, matmuls and residual
    add around the native convolution + state step: float32 to its rounding; bfloat16 to a bfloat16 step
    where a normed value lands on the other side of a rounding boundary (the norm's sums differ in order)."""
    if native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    block = _block(Mamba2(32, d_state=16, headdim=8, **MAMBA2_VARIANTS[variant]), dtype)
    one, two = lean_block_step(block), lean_block_step(block)
    two.layer_step = None
    assert one.layer_step is not None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.manual_seed(4)
    ours = block.allocate_state(batch)
    with torch.no_grad():
        block(torch.randn(batch, 5, 32, dtype=dtype), cache=ours)
        theirs = ours.clone()
        for _ in range(5):
            r = torch.randn(batch, 32)
            torch.testing.assert_close(one(r, ours), two(r, theirs), rtol=tol, atol=tol)
            for name, t in theirs.tensors().items():
                torch.testing.assert_close(getattr(ours, name).float(), t.float(), rtol=tol, atol=tol)
        # More rows than the native GEMVs take: the step falls back to torch's matmuls.
        wide = block.allocate_state(9)
        expected = two(torch.ones(9, 32), wide.clone())
        torch.testing.assert_close(one(torch.ones(9, 32), wide), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"], ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("d_state,d_model,biases", [(16, 32, True), (35, 24, False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_mamba_layer_step_equals_the_torch_norm_and_matmuls_around_it(dtype, d_state, d_model, biases, batch):
    """The whole Mamba-1 block in one native call against the same step with torch's RMSNorm, matmuls, dt_proj,
    casts and residual add around the native convolution and selective steps (d_inner 48 and 64: channel blocks
    of 16 with and without a remainder; state sizes on and off the vector width): float32 and int8 (float32
    activations) to their rounding; bfloat16 to a bfloat16 step where a value lands on the other side of a
    rounding boundary (sums in another order)."""
    if native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    layer_dtype = torch.float32 if dtype == "int8" else dtype
    block = _block(Mamba(d_model, d_state=d_state, bias=biases, conv_bias=biases), layer_dtype, d_model=d_model)
    if dtype == "int8":
        model = nn.Module()
        model.layers = nn.ModuleList([block])
        quantize_int8_(model)
    one, two = lean_block_step(block), lean_block_step(block)
    two.layer_step = None
    assert one.layer_step is not None
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.manual_seed(4)
    ours = block.allocate_state(batch)
    with torch.no_grad():
        block(torch.randn(batch, 5, d_model, dtype=layer_dtype), cache=ours)
        theirs = ours.clone()
        for _ in range(5):
            r = torch.randn(batch, d_model)
            got, expected = one(r, ours), two(r, theirs)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
            for name, t in theirs.tensors().items():
                torch.testing.assert_close(getattr(ours, name).float(), t.float(), rtol=tol, atol=tol)
            if dtype == torch.bfloat16:
                # The same GEMV kernels and rounding points: (nearly) bit for bit. A rounding point missed moves
                # most of the state and a third or more of the outputs; a sum in another order, a few elements.
                assert (got == expected).float().mean() > 0.95 and (ours.ssm == theirs.ssm).float().mean() > 0.95
        # More rows than the native GEMVs take, or a residual in the layer's dtype: torch's matmuls around the
        # native steps, as without the one-call step.
        wide = block.allocate_state(9)
        expected = two(torch.ones(9, d_model), wide.clone())
        torch.testing.assert_close(one(torch.ones(9, d_model), wide), expected, rtol=0, atol=0)
        if layer_dtype == torch.bfloat16:
            theirs, r = ours.clone(), torch.randn(batch, d_model, dtype=layer_dtype)
            torch.testing.assert_close(one(r, ours), two(r, theirs), rtol=0, atol=0)


def test_mamba_layer_step_equals_the_float64_parallel_forward():
    """Token by token through the one-call step, from an empty state, against the float64 block's forward over
    the whole sequence (the parallel scan): the same function."""
    if native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    block = _block(Mamba(32, d_state=16, bias=True), torch.float32)
    lean = lean_block_step(block)
    assert lean.layer_step is not None
    torch.manual_seed(5)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())  # (2, 11, 32)
        state = block.allocate_state(2)
        got = torch.stack([lean(x[:, t], state) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_mamba_native_steps_carry_a_nan_step_size_as_the_block_does():
    """A NaN in Δ (here dt_proj's bias, one channel) reaches the output and the state through the one-call
    block step and through the native selective step, as through the block's own forward: the vectorised
    exp clamps its argument, and a clamp that dropped NaN once made softplus(NaN) a finite 88.5."""
    if native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    block = _block(Mamba(32, d_state=16), torch.float32)
    with torch.no_grad():
        block.mixer.dt_proj.bias[3] = float("nan")
    one_call, selective_only = lean_block_step(block), lean_block_step(block)
    selective_only.layer_step = None
    assert one_call.layer_step is not None and selective_only.selective_step is not None
    r = torch.randn(1, 32)
    with torch.no_grad():
        assert block(r[:, None], cache=block.allocate_state(1)).isnan().any()
        for step in (one_call, selective_only):
            state = block.allocate_state(1)
            assert step(r, state).isnan().any() and state.ssm.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mamba2_step_with_a_residual_in_the_layer_dtype(dtype):
    """residual_in_fp32=False: a bfloat16 residual skips the one-call block (float32 residuals only) and takes
    the one-call convolution + state step; a float32 one takes the block."""
    if native_ssd_step() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    block = _block(Mamba2(32, d_state=8, headdim=8), dtype, residual_in_fp32=False)
    lean = lean_block_step(block)
    assert lean.layer_step is not None and lean.mamba2_conv_step is not None
    theirs = block.allocate_state(2)
    with torch.no_grad():
        block(torch.randn(2, 6, 32, dtype=dtype), cache=theirs)
        ours = theirs.clone()
        for _ in range(3):
            r = torch.randn(2, 1, 32, dtype=dtype)
            expected = block(r, cache=theirs)[:, 0]
            got = lean(r[:, 0], ours)
            assert got.dtype == dtype
            out_tol, state_tol = TOLERANCE[dtype]
            torch.testing.assert_close(got, expected, rtol=out_tol, atol=out_tol)
            torch.testing.assert_close(ours.ssm, theirs.ssm, rtol=state_tol, atol=state_tol)


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_int8_steps_equal_the_quantised_block_step(mixer):
    layer = Mamba(32, d_state=8) if mixer == "mamba" else Mamba2(32, d_state=8, headdim=8, ngroups=2)
    model = nn.Module()
    model.layers = nn.ModuleList([_block(layer, torch.float32)])
    quantize_int8_(model)
    # Both go through the int8 kernel with bfloat16 activations: bfloat16-level agreement.
    TOLERANCE[torch.float32], saved = (3e-2, 1e-2), TOLERANCE[torch.float32]
    try:
        _compare(model.layers[0], torch.float32, fused=native_ssd_step() is not None)
    finally:
        TOLERANCE[torch.float32] = saved


def test_blocks_without_a_lean_step():
    assert lean_block_step(_block(Mamba(32, d_state=8, inner_layernorms=True), torch.float32)) is None
    assert lean_block_step(_block(Mamba(32, d_state=8, mixer_rms_eps=1e-6), torch.float32)) is None
    assert lean_block_step(_block(Mamba2(32, headdim=8, norm_before_gate=True), torch.float32)) is None
    assert lean_block_step(_block(Mamba2(32, headdim=8), torch.float64)) is None
    with_ff = Block(32, Mamba(32), ff=nn.Linear(32, 32))
    assert lean_block_step(with_ff) is None


def test_state_fits_rejects_other_kinds_and_shapes():
    m1 = _block(Mamba(32, d_state=8), torch.float32)
    m2 = _block(Mamba2(32, d_state=8, headdim=8), torch.float32)
    step1, step2 = lean_block_step(m1), lean_block_step(m2)
    assert state_fits(step1, m1.allocate_state(2), 2) and not state_fits(step1, m1.allocate_state(2), 3)
    assert not state_fits(step1, m2.allocate_state(2), 2) and not state_fits(step2, m1.allocate_state(2), 2)
    assert not state_fits(step2, m2.allocate_state(2, dtype=torch.float64), 2)
    strided = m1.allocate_state(2)  # the native steps write the state as one contiguous block
    strided.ssm = torch.zeros(2, 8, 32).transpose(1, 2)
    assert not state_fits(step1, strided, 2)
