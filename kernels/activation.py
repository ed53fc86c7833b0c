"""Fused bias add + GELU: ``gelu(x + bias)`` in one pass over memory (the MLP's first projection is a
cuBLAS matmul without bias; this kernel adds the bias and applies the activation).

Algorithm: x is viewed as rows [M, N] (N = x.shape[-1], the bias length). A program owns a tile of
BLOCK_ROWS x BLOCK_N elements; the bias slice is loaded once per tile. Math is in fp32:
  approximate="none" (BERT):   gelu(s) = 0.5 * s * (1 + erf(s / sqrt(2)))
  approximate="tanh" (GPT-2's gelu_new): 0.5 * s * (1 + tanh(sqrt(2/pi) * (s + 0.044715 s^3))),
      computed as s * sigmoid(2u) (the same function: 0.5 * (1 + tanh(u)) == sigmoid(2u)), which
      needs no tanh intrinsic and is exact at both tails.
Like the reference, ``s = x + bias`` is rounded to x's dtype before the activation.

Reference: ``encdec_fast.ops.bias_gelu`` (x + bias, then F.gelu(approximate=...)).

Limits: x is fp16, bf16 or fp32 with at least one dim; bias has shape [x.shape[-1]] and x's dtype,
or is None. The output is a new contiguous tensor in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_APPROXIMATE = ("none", "tanh")


@triton.jit
def gelu_fp32(s, APPROX_TANH: tl.constexpr):
    """GELU of an fp32 tensor: erf form, or (APPROX_TANH) the tanh form; shared with linear.py."""
    if APPROX_TANH:
        # 0.5 * s * (1 + tanh(u)) == s * sigmoid(2u),  u = sqrt(2/pi) * (s + 0.044715 s^3)
        u2 = 1.5957691216057308 * (s + 0.044715 * s * s * s)  # 2u
        # exp argument clamped: beyond 80 the result is s * ~1e-35 either way, and exp stays finite
        y = s / (1.0 + tl.exp(tl.minimum(-u2, 80.0)))
    else:
        y = 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    return y


@triton.jit
def _bias_gelu_kernel(
    x_ptr,  # [M, N] rows (row stride stride_x, unit column stride)
    b_ptr,  # [N] bias (HAS_BIAS)
    y_ptr,  # [M, N] out, contiguous
    stride_x, stride_y,
    M, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # M * N can exceed 2**31

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
        # rounded to x's dtype like the reference's `x + bias`
        x = (x.to(tl.float32) + b.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
    y = gelu_fp32(x.to(tl.float32), APPROX_TANH)
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _tile_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_ROWS, num_warps): tiles of ~4K elements, at most 1024 columns wide, so a
    thread handles ~32 elements (four 16-byte vectors of fp16) with 4 warps."""
    BLOCK_N = min(1024, triton.next_power_of_2(n_cols))
    BLOCK_ROWS = max(1, 4096 // BLOCK_N)
    return BLOCK_N, BLOCK_ROWS, 4


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """gelu(x + bias) with approximate "none" (erf form) or "tanh" (GPT-2's gelu_new); bias [N] or None."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("bias_gelu: x must be a tensor with at least one dim")
    if x.dtype not in _DTYPES:
        raise ValueError(f"bias_gelu: x has dtype {x.dtype}; use float16, bfloat16 or float32")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"bias_gelu: approximate must be one of {_APPROXIMATE}, got {approximate!r}")
    N = x.shape[-1]
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias_gelu: bias must have shape ({N},) to match x's last dim, "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias_gelu: bias has dtype {bias.dtype} but x has {x.dtype}; cast to one dtype")
        if bias.device != x.device:
            raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1 and N > 1:
        x2 = x2.contiguous()
    y2 = y.view(-1, N)
    M = x2.shape[0]
    BLOCK_N, BLOCK_ROWS, num_warps = _tile_config(N)
    grid = (triton.cdiv(M, BLOCK_ROWS), triton.cdiv(N, BLOCK_N))
    _bias_gelu_kernel[grid](
        x2, bias if bias is not None else x2, y2,
        x2.stride(0), y2.stride(0), M, N,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_N=BLOCK_N,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
        num_warps=num_warps,
    )
    return y
