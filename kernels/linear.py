"""Fused small-row linear for the decode step: LayerNorm prologue, bias, GELU, residual epilogue.

    y = gelu?( LN_x?(x) @ weight.T + bias ) + LN_r?(residual)        x [M, K], weight [N, K] -> y [M, N]

With it a decoder layer is 8 launches: GPT-2 (pre-LN) LN1+QKV, self-attention (cache write fused),
O+residual, LN+cross-Q, cross-attention, O+residual, LN2+fc1+gelu, fc2+residual; BERT (post-LN) the
same count, the LayerNorm of the previous sum moving into the next GEMV's prologue (x_ln) and into
the residual epilogue (residual_ln: the residual of a post-LN sublayer is LN(previous sum)).

Algorithm (GEMV-like, for M = 1..64 rows): a program owns BLOCK_N output columns of BLOCK_M rows and
runs the whole K loop, so each weight element is read once per launch (the step is bound by weight
bytes, not FLOPs); tiles [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] go through tl.dot (M padded to 16)
with fp32 accumulation; BLOCK_N is the widest of 64/32/16 that still gives a program per SM.
  x_ln:        each program computes its rows' mean/variance over K itself (one pass, per-tile
               two-pass statistics merged with Chan's formula: no E[x^2] - E[x]^2 cancellation;
               x is M x K, a few KB, read from L2), then normalises each x tile before the dot, rounded
               to the weight dtype like the reference's F.layer_norm output.
  epilogue:    + bias, GELU (erf or tanh form, kernels/activation.py), + residual (LayerNorm-ed over
               all N columns when residual_ln: each program computes the row statistics over N),
               all in fp32, one rounding to the output dtype at the end.

Int8 weights (w8a16, ``load(quantize="int8")`` on CUDA): weight int8 [N, K] with one fp16 scale per
output channel and group of INT8_GROUP = 32 inputs (w_scale [N, ceil(K / 32)]: w = scale[n, k // 32] *
q[n, k], the CPU's format); a K tile is one group (BLOCK_K = 32): the tile is converted to x's dtype
(exact: |q| <= 127), and its fp32 dot is scaled per column into the accumulator. Half the weight bytes
of fp16/bf16 (plus 1/16 for the scales), for the step whose time is its weight reads.

Reference: ``encdec_fast.ops.fused_linear`` (F.layer_norm, F.linear, F.gelu, +); with int8 weights,
the same on the dequantised weight (scale[n, k // 32] * q[n, k]).

Limits: x, weight (but for int8 weights), bias, LayerNorm parameters and residual share one dtype
(fp16, bf16, fp32) and device; LayerNorm weight and bias are both given. Any M works (a second grid axis), but the op table
uses this kernel for M <= MAX_ROWS only and cuBLAS beyond.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import gelu_fp32
from .common import sm_count

MAX_ROWS = 64  # the op table's cut-over to cuBLAS
INT8_GROUP = 32  # inputs an int8 weight's scale covers: one K tile (encdec_fast/cpu/weights.py's GROUP)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GELU = {None: 0, "none": 1, "tanh": 2}


@triton.jit
def _row_stats(rows_ptr, row_ok, n, eps, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """(mean, rstd) [BLOCK_M] of rows [BLOCK_M, n] (row pointers rows_ptr [BLOCK_M, 1], unit column
    stride): per tile of BLOCK columns a centred two-pass, tiles merged with Chan et al.'s update."""
    offs = tl.arange(0, BLOCK)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of squared deviations from mean
    seen = tl.zeros([BLOCK_M], dtype=tl.float32)  # columns merged so far
    for c0 in range(0, n, BLOCK):
        cols = c0 + offs
        ok = cols < n
        x = tl.load(rows_ptr + cols[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
        cnt = tl.sum(ok.to(tl.float32), 0)  # columns in this tile
        t_mean = tl.math.div_rn(tl.sum(x, 1), cnt)
        xc = tl.where(ok[None, :], x - t_mean[:, None], 0.0)
        tot = seen + cnt
        delta = t_mean - mean
        mean = mean + delta * tl.math.div_rn(cnt, tot)
        m2 = m2 + tl.sum(xc * xc, 1) + delta * delta * tl.math.div_rn(seen * cnt, tot)
        seen = tot
    var = tl.math.div_rn(m2, seen)
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _fused_linear_kernel(
    x_ptr,  # [M, K] (row stride stride_xm, unit column stride)
    w_ptr,  # [N, K] weight, nn.Linear layout (row stride stride_wn); int8 when W_INT8
    ws_ptr,  # [N, ceil(K / BLOCK_K)] fp16 group scales of an int8 weight (W_INT8; row stride stride_sn)
    b_ptr,  # [N] bias (HAS_BIAS)
    xw_ptr, xb_ptr,  # [K] LayerNorm of x (X_LN)
    r_ptr,  # [M, N] residual (HAS_RESIDUAL; row stride stride_rm)
    rw_ptr, rb_ptr,  # [N] LayerNorm of the residual (RES_LN)
    y_ptr,  # [M, N] out (row stride stride_ym)
    stride_xm, stride_wn, stride_sn, stride_rm, stride_ym,
    M, N, K, x_eps, r_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_BLOCK: tl.constexpr,
    X_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RES_LN: tl.constexpr, DOT_IEEE: tl.constexpr, W_INT8: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]

    # -- prologue: LayerNorm statistics of x's rows
    if X_LN:
        mean, rstd = _row_stats(x_rows, row_ok, K, x_eps, BLOCK_M, STATS_BLOCK)

    # -- the K loop: acc [BLOCK_M, BLOCK_N] += x tile @ weight tile^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if X_LN:
            g = tl.load(xw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(xb_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
            x = xn.to(x_ptr.dtype.element_ty)  # padding columns: g = b = 0 -> 0
        w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K]
        if W_INT8:  # one group of BLOCK_K inputs: its dot scaled per column
            w = w.to(x_ptr.dtype.element_ty)  # exact: |q| <= 127
            s = tl.load(ws_ptr + cols.to(tl.int64) * stride_sn + k0 // BLOCK_K, mask=col_ok, other=0.0)
            if DOT_IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee") * s.to(tl.float32)[None, :]
            else:
                acc += tl.dot(x, tl.trans(w)) * s.to(tl.float32)[None, :]
        elif DOT_IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    # -- epilogue: bias, GELU, residual (LayerNorm-ed over all N columns when RES_LN)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU != 0:
        acc = gelu_fp32(acc, GELU == 2)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        r_rows = r_ptr + rows.to(tl.int64)[:, None] * stride_rm
        r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RES_LN:
            r_mean, r_rstd = _row_stats(r_rows, row_ok, N, r_eps, BLOCK_M, STATS_BLOCK)
            g = tl.load(rw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(rb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            r = (r - r_mean[:, None]) * r_rstd[:, None] * g[None, :] + b[None, :]
        acc += r
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def _config(M: int, N: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, STATS_BLOCK): M padded to tl.dot's 16 (at most 64 per program);
    BLOCK_N the widest of 64/32/16 that still gives every SM a program (else 16: most programs);
    BLOCK_K = 64 (128-byte rows of fp16 weight); statistics tiles of at most 4K elements."""
    BLOCK_M = max(16, min(64, triton.next_power_of_2(M)))
    m_blocks = triton.cdiv(M, BLOCK_M)
    BLOCK_N = 16
    for bn in (64, 32):
        if triton.cdiv(N, bn) * m_blocks >= sm_count(device):
            BLOCK_N = bn
            break
    return BLOCK_M, BLOCK_N, 64, 4096 // BLOCK_M


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check(x, weight, bias, x_ln, gelu, residual, residual_ln, w_scale=None) -> None:
    def fail(msg):
        raise ValueError(f"fused_linear: {msg}")

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        fail(f"x must be a 2-D tensor [M, K], got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if x.dtype not in _DTYPES:
        fail(f"x has dtype {x.dtype}; use float16, bfloat16 or float32")
    M, K = x.shape
    if K < 1:
        fail("x has no columns (K = 0)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        fail(f"weight must be [N, {K}] (nn.Linear layout), got {tuple(getattr(weight, 'shape', ()))}")
    N = weight.shape[0]
    if gelu not in _GELU:
        fail(f"gelu must be None, 'none' (erf form) or 'tanh', got {gelu!r}")
    if residual_ln is not None and residual is None:
        fail("residual_ln needs a residual")
    if (weight.dtype == torch.int8) != (w_scale is not None):
        fail(f"an int8 weight needs w_scale (fp16 [N, ceil(K / {INT8_GROUP})], one scale per output and group of "
             f"{INT8_GROUP} inputs), and only an int8 weight takes one")
    groups = triton.cdiv(K, INT8_GROUP)
    if w_scale is not None and (not isinstance(w_scale, torch.Tensor) or tuple(w_scale.shape) != (N, groups)
                                or w_scale.dtype != torch.float16 or w_scale.device != x.device
                                or w_scale.stride(1) != 1):
        fail(f"w_scale must be a float16 tensor of shape ({N}, {groups}) (unit column stride) on {x.device}")
    named = [("weight", weight), ("bias", bias), ("residual", residual)]
    shapes = {"bias": (N,), "residual": (M, N)}
    for ln, nm, n in ((x_ln, "x_ln", K), (residual_ln, "residual_ln", N)):
        if ln is None:
            continue
        if not (isinstance(ln, (tuple, list)) and len(ln) == 3):
            fail(f"{nm} must be (weight [{n}], bias [{n}], eps)")
        named += [(f"{nm} weight", ln[0]), (f"{nm} bias", ln[1])]
        shapes[f"{nm} weight"] = shapes[f"{nm} bias"] = (n,)
    for nm, t in named:
        if t is None:
            if nm != "bias" and nm != "residual":
                fail(f"{nm} must be a tensor")
            continue
        if not isinstance(t, torch.Tensor):
            fail(f"{nm} must be a tensor, got {type(t).__name__}")
        if nm in shapes and tuple(t.shape) != shapes[nm]:
            fail(f"{nm} must have shape {shapes[nm]}, got {tuple(t.shape)}")
        if (t.dtype != x.dtype and not (nm == "weight" and t.dtype == torch.int8)) or t.device != x.device:
            fail(f"{nm} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; use one dtype and device")


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, x_ln=None,
                 gelu: str | None = None, residual: torch.Tensor | None = None, residual_ln=None,
                 w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gelu?(LN_x?(x) @ weight.T + bias) + LN_r?(residual) (see the module docstring).

    x [M, K]; weight [N, K] (x's dtype, or int8 with w_scale fp16 [N, ceil(K / 32)]: w = w_scale[n, k // 32] *
    weight[n, k]);
    bias [N] or None; x_ln / residual_ln: (weight, bias, eps) of a LayerNorm over K / over N, or None;
    gelu: None, "none" (erf form) or "tanh"; residual [M, N] or None.
    Returns a new contiguous [M, N] tensor in x's dtype."""
    _check(x, weight, bias, x_ln, gelu, residual, residual_ln, w_scale)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x, weight = _rows(x), _rows(weight)
    r = _rows(residual) if residual is not None else y
    xw, xb, x_eps = x_ln if x_ln is not None else (x, x, 0.0)
    rw, rb, r_eps = residual_ln if residual_ln is not None else (x, x, 0.0)
    BLOCK_M, BLOCK_N, BLOCK_K, STATS_BLOCK = _config(M, N, x.device)
    if w_scale is not None:
        BLOCK_K = INT8_GROUP  # a K tile is one group of the scales
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _fused_linear_kernel[grid](
        x, weight, w_scale if w_scale is not None else x, bias if bias is not None else x, xw, xb, r, rw, rb, y,
        x.stride(0), weight.stride(0), w_scale.stride(0) if w_scale is not None else 0, r.stride(0), y.stride(0),
        M, N, K, float(x_eps), float(r_eps),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, STATS_BLOCK=STATS_BLOCK,
        X_LN=x_ln is not None, HAS_BIAS=bias is not None, GELU=_GELU[gelu],
        HAS_RESIDUAL=residual is not None, RES_LN=residual_ln is not None,
        DOT_IEEE=x.dtype == torch.float32, W_INT8=w_scale is not None,
        num_warps=4, num_stages=3,
    )
    return y
