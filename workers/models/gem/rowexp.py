"""Row exponentials for attention on the CPU: one fused ``exp`` and row-sum pass, compiled with numba.

``torch.softmax`` over an ``N × N`` score block makes three passes (row maximum, exponentials and their sum,
scaling). The tower's attention needs fewer: the scaling of a row can wait until the row has been multiplied
with v (``N × d`` numbers instead of ``N × N``), and GEM's self-self scores ``t · ẑ ẑᵀ`` of unit rows ``ẑ``
have a known row maximum, the diagonal ``t``. So the kernels here make one pass:

- :func:`exp_rows` replaces each ``s[i, j]`` with ``exp(s[i, j] - shift[i])`` in place and writes each row's
  sum;
- :func:`exp_rows_add` adds another block's softmax to such a row-exponential block at its scale, row by
  row while the row is in L1 (GEM's sum of three softmax matrices, in the first one's memory: no third
  ``N × N`` block to allocate).

``exp`` is Cephes' single-precision ``expf`` (a degree-7 polynomial after the reduction by ``ln 2``; about one
unit in the last place, the same accuracy as ``torch.softmax``'s own), written out so that LLVM vectorises
the loop; arguments below -87.3 give ``exp(-87.3)`` (about 1e-38) instead of a subnormal. A NaN stays a NaN.
The machine code is cached on disk like :mod:`groundlabel.jit`'s. Without numba, :data:`AVAILABLE` is false
and the tower keeps ``torch.softmax``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AVAILABLE", "exp_rows", "exp_rows_add"]

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # numba comes with the worker extra; without it the tower keeps torch.softmax
    numba = None

AVAILABLE = numba is not None

if AVAILABLE:
    _FLAGS = {"reassoc", "contract"}  # reassociation lets LLVM vectorise the row sums; NaN and inf are kept

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        """The float32 whose bit pattern is the int32 ``bits`` (LLVM's bitcast)."""

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @numba.njit(cache=True, nogil=True, fastmath=_FLAGS, inline="always")
    def _exp(x):
        """Cephes expf for float32 ``x <= 88``; below -87.3 it returns exp(-87.3)."""
        lo = np.float32(-87.3)
        x = lo if x < lo else x
        n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
        r = x - n * np.float32(0.693359375)
        r = r - n * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * r * r + r + np.float32(1.0)
        return p * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))

    @numba.njit(cache=True, nogil=True, fastmath=_FLAGS, inline="always")
    def _exp_row(row, m):
        """In place ``row[j] = exp(row[j] - m)``; returns the row's sum."""
        total = np.float32(0.0)
        for j in range(row.shape[0]):
            e = _exp(row[j] - m)
            row[j] = e
            total += e
        return total

    @numba.njit(cache=True, nogil=True, fastmath=_FLAGS)
    def _exp_rows(s, shift, sums):
        for i in range(s.shape[0]):
            sums[i] = _exp_row(s[i], shift[i])

    @numba.njit(cache=True, nogil=True, fastmath=_FLAGS)
    def _exp_rows_add(s, shift, acc, acc_sums):
        for i in range(s.shape[0]):
            row, out = s[i], acc[i]
            w = acc_sums[i] / _exp_row(row, shift[i])
            for j in range(row.shape[0]):  # the row is still in L1
                out[j] += row[j] * w


def exp_rows(s: np.ndarray, shift: np.ndarray, sums: np.ndarray) -> None:
    """In place: ``s[i, j] = exp(s[i, j] - shift[i])``; ``sums[i]`` gets row i's sum (float32, C order)."""
    _exp_rows(s, shift, sums)


def exp_rows_add(s: np.ndarray, shift: np.ndarray, acc: np.ndarray, acc_sums: np.ndarray) -> None:
    """``acc[i] += softmax(s - shift)[i] · acc_sums[i]``: adds the softmax of ``s`` (whose rows' maxima are
    ``shift``) to ``acc``, an earlier row-exponential block whose row sums are ``acc_sums``, at ``acc``'s
    scale, so that ``acc / acc_sums`` is the sum of both softmax matrices. ``s`` is overwritten (scratch)."""
    _exp_rows_add(s, shift, acc, acc_sums)
