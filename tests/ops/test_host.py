"""``ssmkit.ops._host``: the plain-Python launch arithmetic gives Triton's integers."""

from __future__ import annotations

import pytest

from ssmkit.ops._host import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    triton = pytest.importorskip("triton", reason="triton is not installed (the test extra has it on Linux only)")
    for n in [*range(1100), 2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
