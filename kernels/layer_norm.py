"""LayerNorm over the last dim, alone or fused with the residual add that precedes it.

Algorithm: the input is flattened to rows [M, N]. A program owns BLOCK_ROWS whole rows held in
registers (BLOCK_N = next power of two >= N, masked): it loads them once, casts to fp32, computes
the mean, then the variance of the centred values (two-pass over registers, so no E[x^2] - E[x]^2
cancellation), and writes ``(x - mean) * rstd * weight + bias`` cast back to the input dtype.

``add_layer_norm`` first forms ``s = x + residual``: s is rounded to the input dtype and written once
(the next residual stream), and the rounded s is normalised, exactly like the reference
``F.layer_norm(x + residual)``. BERT (post-LN) uses the normed output; GPT-2 (pre-LN) uses both.

Reference: ``encdec_fast.ops.layer_norm`` / ``encdec_fast.ops.add_layer_norm`` (F.layer_norm).
Block size and warps are chosen in one helper (``_row_config``), in the manner of Liger-Kernel.

Limits: hidden size 1..32768 (a whole row must fit in registers); x, residual, weight and bias share
one floating dtype (fp16, bf16, fp32) and device; weight/bias may be None (no affine part).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_HIDDEN = 32768
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # [M, N] input rows (row stride stride_x, unit column stride)
    res_ptr,  # [M, N] residual rows (HAS_RESIDUAL)
    sum_ptr,  # [M, N] out: x + residual in x's dtype (HAS_RESIDUAL)
    y_ptr,  # [M, N] out: normalised rows
    w_ptr, b_ptr,  # [N] affine weight and bias (HAS_WEIGHT / HAS_BIAS)
    stride_x, stride_r, stride_s, stride_y,
    M, N, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # M * stride can exceed 2**31

    # -- load (and add the residual), all in fp32
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows64[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s
    x = x.to(tl.float32)

    # -- statistics: mean, then variance of the centred row (padding lanes forced to 0)
    # div_rn: correctly rounded (plain fp32 `/` on the GPU is approximate, which leaves a constant
    # row with a residual that 1/sqrt(eps=1e-12) blows up)
    n = N.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x, axis=1), n)  # [BLOCK_ROWS]
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.math.div_rn(tl.sum(xc * xc, axis=1), n)
    rstd = 1.0 / tl.sqrt(var + eps)

    # -- affine and store in the input dtype
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _row_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_ROWS, num_warps): whole rows padded to a power of two; small rows are packed
    several per program so each program moves ~4K elements; ~16 elements (two 16-byte vectors of
    fp16) per thread, up to 32 warps for the widest rows."""
    BLOCK_N = triton.next_power_of_2(n_cols)
    BLOCK_ROWS = max(1, min(64, 4096 // BLOCK_N))
    num_warps = max(1, min(32, BLOCK_ROWS * BLOCK_N // 512))
    return BLOCK_N, BLOCK_ROWS, num_warps


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View t as [M, n] rows with unit column stride (copies only if it has to)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _check(name: str, x, weight, bias, residual=None) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name}: x must be a tensor with at least one dim")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: x has dtype {x.dtype}; use float16, bfloat16 or float32")
    N = x.shape[-1]
    if not 1 <= N <= _MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {N} unsupported; the kernel handles 1..{_MAX_HIDDEN}")
    named = [("weight", weight), ("bias", bias)]
    for nm, t in named:
        if t is None:
            continue
        if tuple(t.shape) != (N,):
            raise ValueError(f"{name}: {nm} must have shape ({N},) to match x's last dim, got {tuple(t.shape)}")
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{name}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        named.append(("residual", residual))
    for nm, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: {nm} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"{name}: {nm} is on {t.device} but x is on {x.device}")
    return N


def _launch(x, residual, weight, bias, eps: float):
    N = x.shape[-1]
    x2 = _rows(x, N)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, N)
    if residual is not None:
        r2 = _rows(residual, N)
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = s.view(-1, N)
    else:
        r2, s, s2 = x2, None, y2  # dummies, never touched
    if M == 0:
        return y, s
    BLOCK_N, BLOCK_ROWS, num_warps = _row_config(N)
    _layer_norm_kernel[(triton.cdiv(M, BLOCK_ROWS),)](
        x2, r2, s2, y2,
        weight if weight is not None else x2, bias if bias is not None else x2,
        x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0),
        M, N, float(eps),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_N=BLOCK_N,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return y, s


def layer_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of x (any leading shape). Returns a new tensor in x's dtype."""
    _check("layer_norm", x, weight, bias)
    return _launch(x, None, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight, bias, eps: float):
    """s = x + residual (in x's dtype, written once); returns (layer_norm(s), s)."""
    if not isinstance(residual, torch.Tensor):
        raise ValueError("add_layer_norm: residual must be a tensor")
    _check("add_layer_norm", x, weight, bias, residual)
    return _launch(x, residual, weight, bias, eps)
