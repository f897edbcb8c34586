"""``mamba3_scan_from_projection``'s fused route (Δ/A and the B/C norms in the SSD route's kernels) on a CUDA GPU
against its definition in float64 on the CPU: outputs, the final state and every gradient, over several chunks, with
documents and initial states, the norm's backward in the rotation kernel's epilogue and in its own kernel.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_mamba3_projected.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.test_mamba3_projected import check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPE = (2, 203, 8, 16, 32, 8)  # b, l (odd, 13 chunks of 16), h, p, n, a
# bf16: the gradients through the angles sum the rotation terms of every later position, each with its own rounded
# B̃, C̃. In Triton's interpreter at SHAPE the unfolded route (the norm, then mamba3_scan) missed dt_bias's by 1.4e-2,
# the initial angles' by 4.5e-2 of their largest entry; the fused route by 2.6e-2 and 4.4e-2.
ANGLE_RTOL = {"float32": None, "bfloat16": 6e-2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("unsplit", [False, True])
def test_fused_route_matches_the_definition(dtype, unsplit):
    check("triton", dtype, packed=True, initial=True, unsplit=unsplit, device="cuda", shape=SHAPE,
          angle_rtol=ANGLE_RTOL[dtype])


def test_fused_route_softplus_halves_bf16_parameters():
    check("triton", "bfloat16", activation="softplus", interleaved=False, params_dtype="bfloat16", bias_2d=True, g=1,
          device="cuda", shape=SHAPE, angle_rtol=ANGLE_RTOL["bfloat16"])
