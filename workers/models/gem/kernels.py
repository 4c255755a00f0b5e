"""The tower's inner products on the CPU: oneDNN linear layers and row-chunked attention built on them.

PyTorch's fp32 ``F.linear`` and matrix products on the CPU go to MKL's sgemm, and its fused
``scaled_dot_product_attention`` kernel to the same sgemm on small tiles. On CPUs where MKL does not pick
its widest kernels (AMD's AVX-512 parts among them) oneDNN's own just-in-time kernels, which dispatch on the
CPU's features, run the same fp32 products about twice as fast. So, for fp32 tensors on the CPU with no
gradient to record:

- :func:`linear` calls ``torch.ops.mkldnn._linear_pointwise`` (optionally with GELU or a residual add
  fused into the product). A weight that is a tensor of its own (a module's parameter, not a view) is
  reordered once into oneDNN's blocked layout and the packed copy kept for later calls while the weight is
  unchanged (same storage, same in-place version); without it oneDNN reorders the weight on every call.
  The packed copies take as much memory as the weights they stand for (about 340 MB for ViT-B/16's
  tower); :func:`set_weight_packing` turns this off (and frees them);
- :func:`attention` computes ``softmax(q kᵀ · scale) v`` per (image, head) on blocks of query rows: the
  ``rows × N`` score block stays in cache, and both products run on oneDNN;
- :func:`self_self_attention_rows` is GEM's self-self attention on the same scheme, with the three
  branches' final softmax matrices summed before their one product with v.

Between the two products, the softmax is one compiled pass (:mod:`.rowexp`, with numba) instead of
``torch.softmax``'s three: ``exp(s - row max)`` in place with the row sums, the division by the sums applied
to the product's ``rows × d`` numbers; GEM's self-self scores ``t · ẑ ẑᵀ`` of unit rows need no maximum
pass (it is ``t``, on the diagonal), and the three branches' softmax matrices are summed row by row into the
first one's memory. Without numba it is ``torch.softmax``.

Every function is exact fp32 arithmetic, the same as the plain PyTorch path up to the order of the
additions and the exponential's last bit (relative differences of order 1e-7). Anywhere else (CUDA, half
precision, autograd, a build without oneDNN) they fall back to ``F.linear`` and
``F.scaled_dot_product_attention``.

Which of these paths a CPU forward takes is one of :data:`PATHS`, set for a block of code with
:func:`using` (the tower does it with its ``cpu_kernels``; :mod:`.kernel_choice` times them on a machine):
``packed`` (oneDNN with packed weights, the default), ``onednn`` (oneDNN, the weights reordered on every
call) or ``torch`` (plain PyTorch: ``F.linear``, ``scaled_dot_product_attention``, ``torch.softmax``).

``using(path, "bf16")`` computes the products in bf16 (on CPUs that multiply bf16 natively, AVX512-BF16 or
AMX). On the oneDNN paths the tensors between the products stay fp32 (the residual streams, LayerNorms,
normalisations and softmax), and only the operands of each product are rounded to bf16, oneDNN
accumulating in fp32: the linear weights are kept as packed bf16 copies (``packed``; ``onednn`` rounds
them on every call), the attention's queries, keys and values are rounded once per head, each score
block comes back to fp32 for the softmax and its probabilities go to bf16 for the product with v. On the
``torch`` path ``bf16`` is CPU autocast, as anywhere else in the project.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from . import rowexp

__all__ = [
    "PATHS",
    "ONEDNN_BF16",
    "PRECISIONS",
    "attention",
    "available_paths",
    "current_path",
    "current_precision",
    "linear",
    "onednn_usable",
    "release_packed_weights",
    "self_self_attention_rows",
    "set_weight_packing",
    "using",
    "weight_packing",
]


def _find_linear_op():
    try:
        op = torch.ops.mkldnn._linear_pointwise
        op.default, op.binary  # noqa: B018 (resolve both overloads now, not in the forward)
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


_LINEAR = _find_linear_op()
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _LINEAR is not None else None


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Whether oneDNN multiplies bf16 on this CPU (AVX-512 or newer; without it bf16 takes plain PyTorch).
ONEDNN_BF16 = _LINEAR is not None and _onednn_bf16()
_SCORE_BLOCK = 1 << 20  # score-block elements per (image, head) step: 4 MiB of fp32
_PACK_ROWS = 1024  # the row count oneDNN's weight layout is chosen for (any count computes exactly)
_packing = True
#: (id(weight), dtype) -> (weight, key, packed copy in that dtype)
_packed: dict[tuple[int, torch.dtype], tuple[weakref.ref, tuple, torch.Tensor]] = {}

#: The CPU paths, from the most specialised to plain PyTorch.
PATHS = ("packed", "onednn", "torch")
_path: ContextVar[str] = ContextVar("gem_cpu_path", default="packed")
#: The CPU arithmetic of the products: ``fp32`` or ``bf16`` (:func:`using`).
PRECISIONS = ("fp32", "bf16")
_bf16: ContextVar[bool] = ContextVar("gem_cpu_bf16", default=False)


def set_weight_packing(enabled: bool) -> None:
    """Keep oneDNN-packed copies of the linear weights (the default) or not; ``False`` frees them."""
    global _packing
    _packing = bool(enabled)
    if not _packing:
        _packed.clear()


def release_packed_weights() -> None:
    """Frees the packed copies kept so far (packing stays as set; a later ``packed`` forward repacks)."""
    _packed.clear()


def weight_packing() -> bool:
    """Whether packed copies of the weights may be kept (:func:`set_weight_packing`)."""
    return _packing


def available_paths(precision: str = "fp32") -> tuple[str, ...]:
    """The :data:`PATHS` this build, this CPU (for ``bf16`` products) and :func:`set_weight_packing` allow,
    plain PyTorch always."""
    if _LINEAR is None or (precision == "bf16" and not ONEDNN_BF16):
        return ("torch",)
    return PATHS if _packing and _REORDER is not None else ("onednn", "torch")


def current_path() -> str:
    """The path CPU forwards take here (:func:`using`; ``packed`` by default)."""
    return _path.get()


def current_precision() -> str:
    """The arithmetic of the oneDNN products here (:func:`using`; ``fp32`` by default)."""
    return "bf16" if _bf16.get() else "fp32"


@contextlib.contextmanager
def using(path: str | None, precision: str | None = None) -> Iterator[None]:
    """CPU forwards inside the block take ``path`` (one of :data:`PATHS`) with their products in
    ``precision`` (one of :data:`PRECISIONS`; ``bf16`` on the ``torch`` path is CPU autocast, and so on
    every path where oneDNN has no bf16 products, :data:`ONEDNN_BF16`); ``None`` keeps the current one.
    Per thread and task, like any context variable."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown CPU kernel path {path!r}; expected one of {PATHS}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown CPU precision {precision!r}; expected one of {PRECISIONS}")
    with contextlib.ExitStack() as stack:
        if path is not None:
            token = _path.set(path)
            stack.callback(_path.reset, token)
        if precision is not None:
            if precision == "bf16" and not ONEDNN_BF16 and _path.get() != "torch":
                token = _path.set("torch")
                stack.callback(_path.reset, token)
            flag = _bf16.set(precision == "bf16")
            stack.callback(_bf16.reset, flag)
            if precision == "bf16" and _path.get() == "torch":
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        yield


def _packed_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` in ``dtype`` and oneDNN's layout, packed on first use and kept while the weight is
    unchanged; when packing is off or does not apply (a view, a strided tensor, an inference tensor)
    ``weight`` itself, rounded to ``dtype`` on this call."""
    if (
        not _packing
        or _REORDER is None
        or weight._base is not None
        or not weight.is_contiguous()
        or _path.get() != "packed"
        or weight.is_inference()
    ):
        return weight if weight.dtype == dtype else weight.to(dtype)
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    slot = (id(weight), dtype)
    entry = _packed.get(slot)
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    with torch.inference_mode(False), torch.no_grad():
        packed = _REORDER(weight.detach().to(dtype), _PACK_ROWS)
    if entry is None or entry[0]() is not weight:
        weakref.finalize(weight, _packed.pop, slot, None)
    _packed[slot] = (weakref.ref(weight), key, packed)
    return packed


def onednn_usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the oneDNN kernels apply: fp32 CPU tensors, no gradient to record, no CPU autocast (bf16
    products belong to autocast's own kernels) and a oneDNN path (not ``torch``) in effect."""
    if _LINEAR is None or _path.get() == "torch" or torch.is_autocast_enabled("cpu"):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
    return True


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b``, then the exact (erf) GELU when ``gelu``, plus ``residual`` when given (never both)."""
    if gelu and residual is not None:
        raise ValueError("linear fuses either gelu or a residual, not both")
    if onednn_usable(x, weight, bias, residual):
        if _bf16.get():
            w = _packed_weight(weight.contiguous(), torch.bfloat16)
            y = _LINEAR(x.to(torch.bfloat16), w, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
            return y.float() if residual is None else residual + y
        w = _packed_weight(weight.contiguous())  # a strided weight takes oneDNN's slow reference reorder
        if residual is not None and residual.shape == (*x.shape[:-1], weight.shape[0]):
            return _LINEAR.binary(x, residual.contiguous(), w, bias, "add")
        if residual is None:
            return _LINEAR(x, w, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


def _rows(n: int) -> int:
    """Query rows per step for ``n`` keys: a score block of about ``_SCORE_BLOCK`` elements."""
    return max(16, min(n, _SCORE_BLOCK // max(n, 1)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for per-head tensors ``[B, H, N, d]`` (scale default ``d ** -0.5``).

    The result is a ``[B, H, N, d]`` view of a ``[B, N, H, d]`` buffer, so merging the heads back to
    ``[B, N, H·d]`` costs no copy."""
    if not onednn_usable(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    out = q.new_empty(b, n, h, v.shape[-1])
    rows = _rows(k.shape[-2])
    for i in range(b):
        for j in range(h):
            qh = _operand(q[i, j] * scale)
            kh = _weight(_operand(k[i, j].contiguous()), rows, n)  # oneDNN weights: contiguous (or packed)
            vt = _weight(_operand(v[i, j].t().contiguous()), rows, n)
            for r in range(0, n, rows):
                s = _scores(qh[r : r + rows], kh)
                _times_values(*_softmax_rows(s), vt, out[i, r : r + rows, j])
    return out.transpose(1, 2)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an operand of the products here: rounded to bf16 under ``using(..., "bf16")``."""
    return t.to(torch.bfloat16) if _bf16.get() else t


def _scores(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``rows @ keysᵀ`` for the oneDNN weight ``keys``, in fp32 whatever the operands' precision."""
    s = _LINEAR(rows, keys, None, "none", [], "")
    return s if s.dtype == torch.float32 else s.float()


def _softmax_rows(s: torch.Tensor, row_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(s)`` along rows as ``(p, sums)`` with ``softmax(s) = p / sums`` (``sums`` ``None`` when ``p``
    is already normalised). With numba ``p`` is ``s`` itself, overwritten with ``exp(s - max)`` in one pass;
    ``row_max`` is the rows' maximum when the caller knows it (GEM's unit-row self-self scores: the
    temperature, on the diagonal)."""
    if not rowexp.AVAILABLE:
        return torch.softmax(s, dim=-1), None
    rows = s.shape[0]
    sums = s.new_empty(rows, 1)
    rowexp.exp_rows(s.numpy(), _shift(s, row_max).numpy(), sums.numpy().reshape(rows))
    return s, sums


def _times_values(
    p: torch.Tensor, sums: torch.Tensor | None, values_t: torch.Tensor, out: torch.Tensor
) -> None:
    """``out = (p / sums) @ values`` for the oneDNN weight ``values_t`` (values transposed or packed), the
    division done on the product's ``rows × d`` numbers rather than on ``p``."""
    product = _LINEAR(_operand(p), values_t, None, "none", [], "")
    if sums is None:
        out.copy_(product)
    else:
        torch.div(product, sums, out=out)


def _weight(w: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """``w`` as a oneDNN weight for ``n`` rows in blocks of ``rows`` (packed once for several blocks)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows) if n > rows and _REORDER is not None else w


def self_self_attention_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: torch.Tensor | float, iters: int
) -> torch.Tensor:
    """GEM's self-self attention (see :func:`workers.models.gem.modules.self_self_attention`) on the oneDNN
    kernels; the caller checks :func:`onednn_usable`. Returns ``[B, H, N, d]`` (a view, as
    :func:`attention`). Per (image, head) and block of query rows; the final step sums the three branches'
    softmax matrices and multiplies the sum with v once."""
    b, h, n, d = q.shape
    if isinstance(inv_temp, torch.Tensor):
        temps = [float(t) for t in inv_temp.reshape(-1)]
    else:
        temps = [float(inv_temp)] * b
    out = q.new_empty(b, n, h, d)
    rows = _rows(n)
    for i in range(b):
        t = temps[i]
        for j in range(h):
            branches = [v[i, j].contiguous(), k[i, j].contiguous(), q[i, j].contiguous()]
            for _ in range(iters):
                branches = [attention_step(F.normalize(z, dim=-1), t, rows) for z in branches]
            unit = [F.normalize(z, dim=-1) for z in branches]
            scaled = [_operand(z * t) for z in unit]
            keys = [_weight(_operand(z), rows, n) for z in unit]
            vt = _weight(_operand(v[i, j].t().contiguous()), rows, n)
            for r in range(0, n, rows):
                scores = (_scores(zq[r : r + rows], zk) for zq, zk in zip(scaled, keys, strict=True))
                _times_values(*_mean_softmax(scores, t), vt, out[i, r : r + rows, j])
    return out.transpose(1, 2)


def _mean_softmax(scores: Iterator[torch.Tensor], row_max: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mean of the softmax matrices of GEM's branch scores (each of known row maximum ``row_max``) as
    ``(p, sums)`` like :func:`_softmax_rows`, accumulated in the first score block's memory while the next
    blocks are computed one at a time (no third ``N × N`` block alive)."""
    acc, sums = _softmax_rows(next(scores), row_max)
    count = 1
    for s in scores:
        count += 1
        if sums is None:  # torch.softmax: already normalised
            acc.add_(torch.softmax(s, dim=-1))
        else:
            rowexp.exp_rows_add(s.numpy(), _shift(s, row_max).numpy(), acc.numpy(), sums.numpy().reshape(-1))
        del s  # freed before the next block is computed
    if sums is None:
        return acc.div_(count), None
    return acc, sums.mul_(count)


def _shift(s: torch.Tensor, row_max: float | None) -> torch.Tensor:
    """The rows' maxima of ``s``: ``row_max`` when the caller knows it (a positive self-self temperature)."""
    if row_max is None or not row_max > 0:
        return s.amax(dim=-1)
    return s.new_full((s.shape[0],), row_max)


def attention_step(z: torch.Tensor, inv_temp: float, rows: int) -> torch.Tensor:
    """One self-self step on one head's unit rows ``z [N, d]``: ``softmax(z zᵀ · inv_temp) z``."""
    n = z.shape[0]
    zq = _operand(z * inv_temp)
    zt, key = _weight(_operand(z.t().contiguous()), rows, n), _weight(_operand(z), rows, n)
    out = torch.empty_like(z)
    for r in range(0, n, rows):
        s = _scores(zq[r : r + rows], key)
        _times_values(*_softmax_rows(s, inv_temp), zt, out[r : r + rows])
    return out
