"""Mamba-3's fused scalar kernels (``ssmkit/ops/mamba3/triton_step_sizes.py``) and the SSD route without a final
state, compiled on a CUDA GPU: the interpreter cases of tests/ops/test_mamba3_step_sizes.py with every tensor on
the device (the float64 PyTorch forms computed there too).

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_mamba3_step_sizes.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.test_mamba3_step_sizes import (
    DT_DECAY_CASES,
    STEP_WEIGHT_CASES,
    check_dt_decay,
    check_step_weights,
    check_without_final_state,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("case", DT_DECAY_CASES.values(), ids=list(DT_DECAY_CASES))
def test_dt_decay_kernel_on_gpu(case):
    with torch.device("cuda"):
        check_dt_decay(*case)


@pytest.mark.parametrize("case", STEP_WEIGHT_CASES.values(), ids=list(STEP_WEIGHT_CASES))
def test_step_weights_kernel_on_gpu(case):
    with torch.device("cuda"):
        check_step_weights(*case)


@pytest.mark.parametrize("dtype,packed", [("float32", True), ("bfloat16", False)])
def test_route_without_final_state_on_gpu(dtype, packed):
    with torch.device("cuda"):
        check_without_final_state(dtype, packed)
