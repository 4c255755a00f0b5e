"""The compiled row exponentials of GEM's attention against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from workers.models.gem import rowexp

pytestmark = pytest.mark.skipif(not rowexp.AVAILABLE, reason="numba is not installed")


def ref_exp(s: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """exp of the float32 difference (the kernel's argument), in float64."""
    return np.exp((s - shift[:, None]).astype(np.float64))


@pytest.mark.parametrize("cols", [1, 7, 16, 17, 63, 785])  # vector tails and the tower's 28×28+1 tokens
def test_exp_rows_matches_float64_exp_and_sums(cols):
    rng = np.random.default_rng(cols)
    s = rng.uniform(-80.0, 1e-3, size=(5, cols)).astype(np.float32)  # at most slightly above the shift
    shift = rng.uniform(-2.0, 2.0, size=5).astype(np.float32)
    s += shift[:, None]
    want = ref_exp(s, shift)
    sums = np.full(5, np.nan, np.float32)
    rowexp.exp_rows(s, shift, sums)
    assert np.abs(s / want - 1).max() < 2e-7  # a unit or two in the last place, as torch.softmax's exp
    np.testing.assert_allclose(sums, want.sum(axis=1), rtol=2e-6)


def test_exp_rows_edge_values():
    s = np.array([[0.0, -87.0, -87.3, -500.0, -np.inf, np.nan, 1e-6, 88.0]], np.float32)
    sums = np.empty(1, np.float32)
    rowexp.exp_rows(s, np.zeros(1, np.float32), sums)
    e = s[0]
    assert e[0] == 1.0
    assert abs(e[1] / np.exp(-87.0) - 1) < 1e-5
    floor = np.float32(np.exp(np.float64(-87.3)))
    assert abs(e[2] / floor - 1) < 1e-5 and abs(e[3] / floor - 1) < 1e-5 and abs(e[4] / floor - 1) < 1e-5
    assert np.isnan(e[5]) and np.isnan(sums[0])  # a NaN is not hidden
    assert abs(e[6] - np.exp(1e-6)) < 1e-7
    assert abs(e[7] / np.exp(np.float64(88.0)) - 1) < 1e-5


def test_exp_rows_add_accumulates_softmax_at_the_first_blocks_scale():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 33)).astype(np.float32)
    b = rng.normal(size=(6, 33)).astype(np.float32) * 4
    a_shift, b_shift = a.max(axis=1), b.max(axis=1)
    softmax_a = ref_exp(a, a_shift) / ref_exp(a, a_shift).sum(axis=1, keepdims=True)
    softmax_b = ref_exp(b, b_shift) / ref_exp(b, b_shift).sum(axis=1, keepdims=True)
    sums = np.empty(6, np.float32)
    rowexp.exp_rows(a, a_shift, sums)
    rowexp.exp_rows_add(b, b_shift, a, sums)
    np.testing.assert_allclose(a / sums[:, None], softmax_a + softmax_b, rtol=3e-6)
