"""Softmax attention over whole sequences: one flash-attention forward body, launched over a padded
batch (``attention``) or over packed variable-length sequences (``varlen_attention``); decode over a
KV cache is decode_attention.py.

Algorithm (FlashAttention-2, Dao 2023; Triton's fused-attention tutorial): a program owns a block of
BLOCK_M query rows of one (sequence, head) and streams the keys in blocks of BLOCK_N. For each key
block it computes S = Q K^T (fp32), masks it, and updates the running row max ``m_i``, the running
row sum ``l_i`` and the unnormalised output ``acc`` (online softmax, base-2 exponentials with
``qk_scale = scale * log2(e)``). The score matrix is never written to memory. The output is
``acc / l_i``; a row that saw no visible key has ``l_i == 0`` and writes zeros (like the reference).

``attention`` serves encoder self-attention over a padded batch (bidirectional + key padding mask),
causal decoder prefill (bottom-right aligned: query i sees keys j <= i + Lk - Lq) and
cross-attention (Lq != Lk). ``varlen_attention`` serves the packed encoder: q/k/v hold T tokens of B
sequences back to back, sequence b owning rows [cu_seqlens[b], cu_seqlens[b+1]) (FlashAttention's
``flash_attn_varlen_func`` layout); no padding is stored or computed, and a program whose query
block starts past its sequence's end returns at once. Both launch the same body
(``_attn_fwd_block``), whose key loop runs in two phases: blocks that need no masking (fully
visible under the causal rule and fully inside Lk), then the tail blocks that need the causal
and/or bounds mask.

Reference: ``encdec_fast.ops.attention`` and ``encdec_fast.ops.varlen_attention`` (plain PyTorch).

Limits: head dim 1..256 (padded to a power of two >= 16 and masked); q/k/v share one dtype (fp16,
bf16 or fp32) and have unit stride on the head dim; offsets inside one (sequence, head) slab are
32-bit (L * stride_L < 2**31 elements), batch/sequence/head/block bases are 64-bit. cu_seqlens is
not read on the host (no sync): it must be non-decreasing, start at 0 and end at T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, check_mask, check_qkv


# --------------------------------------------------------------------------------------------
# prefill / encoder / cross attention
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # acc [BLOCK_M, BLOCK_D] fp32, l_i/m_i [BLOCK_M] fp32, q [BLOCK_M, BLOCK_D]
    k_base, v_base, mask_base,  # pointers to key 0 of this (batch, head); mask row of this batch
    stride_kl, stride_vl, stride_ml,
    offs_m, offs_n, offs_d, Lk, D, causal_shift, qk_scale,
    start_n, end_n,
    BLOCK_N: tl.constexpr,
    APPLY_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start in range(start_n, end_n, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n  # [BLOCK_N] key positions
        start64 = start.to(tl.int64)
        # one 64-bit scalar base + 32-bit tile offsets (cheaper in registers than 64-bit tiles)
        k_ptrs = (k_base + start64 * stride_kl) + (offs_n[:, None] * stride_kl + offs_d[None, :])
        v_ptrs = (v_base + start64 * stride_vl) + (offs_n[:, None] * stride_vl + offs_d[None, :])
        # -- load the K tile and compute S = Q K^T in fp32
        if CHECK_BOUNDS:
            kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        # -- mask: out of bounds, key padding, causal
        if CHECK_BOUNDS:
            qk = tl.where(cols[None, :] < Lk, qk, float("-inf"))
        if HAS_MASK:
            if CHECK_BOUNDS:
                km = tl.load(mask_base + cols * stride_ml, mask=cols < Lk, other=0)
            else:
                km = tl.load(mask_base + cols * stride_ml)
            qk = tl.where(km[None, :] != 0, qk, float("-inf"))
        if APPLY_CAUSAL:
            qk = tl.where(cols[None, :] <= offs_m[:, None] + causal_shift, qk, float("-inf"))
        # -- online softmax update; m_safe keeps fully-masked rows free of (-inf) - (-inf) = NaN
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # -- acc += P V, P cast to V's dtype so both dot operands share one dtype
        if CHECK_BOUNDS:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_block(
    q_base, k_base, v_base, o_base, mask_base,  # pointers to this block's first query / output row,
                                                # key 0 of this (sequence, head), its mask row
    stride_ql, stride_kl, stride_vl, stride_ol, stride_ml,
    start_m, Lq, Lk, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One block of BLOCK_M query rows of one (sequence, head): load Q, stream the keys, store O."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)

    # -- load the Q tile once
    q_ptrs = q_base + (rows[:, None] * stride_ql + offs_d[None, :])
    if EVEN_M & EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- key range: [0, full_end) needs no mask but key padding; [full_end, end_n) needs the rest
    causal_shift = Lk - Lq
    if IS_CAUSAL:
        end_n = tl.maximum(tl.minimum(Lk, start_m + BLOCK_M + causal_shift), 0)
        full_end = tl.minimum(tl.maximum(start_m + causal_shift + 1, 0), end_n)
    else:
        end_n = Lk
        full_end = Lk
    full_end = (full_end // BLOCK_N) * BLOCK_N

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kl, stride_vl, stride_ml,
        offs_m, offs_n, offs_d, Lk, D, causal_shift, qk_scale, 0, full_end,
        BLOCK_N=BLOCK_N, APPLY_CAUSAL=False, CHECK_BOUNDS=False, HAS_MASK=HAS_MASK,
        EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kl, stride_vl, stride_ml,
        offs_m, offs_n, offs_d, Lk, D, causal_shift, qk_scale, full_end, end_n,
        BLOCK_N=BLOCK_N, APPLY_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, HAS_MASK=HAS_MASK,
        EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
    )

    # -- normalise; rows with no visible key have l_i == 0 and acc == 0 -> zeros
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(o_base.dtype.element_ty)
    o_ptrs = o_base + (rows[:, None] * stride_ol + offs_d[None, :])
    if EVEN_M & EVEN_D:
        tl.store(o_ptrs, out)
    else:
        tl.store(o_ptrs, out, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # q [B, Lq, H, D], k/v [B, Lk, H, D], o [B, Lq, H, D]
    mask_ptr,  # uint8 [B, Lk] (1 = attend), unused unless HAS_MASK
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_mb, stride_ml,
    H, Lq, Lk, D,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # -- which (query block, batch, head): 1-D grid, query blocks fastest so programs that share
    #    K/V run together; causal runs the heaviest (last) query blocks first
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    pid_bh = pid // num_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    # -- 64-bit bases for this (batch, head, query block)
    _attn_fwd_block(
        q_ptr + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_ql,
        k_ptr + b * stride_kb + h * stride_kh,
        v_ptr + b * stride_vb + h * stride_vh,
        o_ptr + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_ol,
        mask_ptr + b * stride_mb,
        stride_ql, stride_kl, stride_vl, stride_ol, stride_ml,
        start_m, Lq, Lk, D, qk_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IS_CAUSAL=IS_CAUSAL, HAS_MASK=HAS_MASK,
        EVEN_M=EVEN_M, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
    )


@triton.jit
def _varlen_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # q/k/v/o [T, H, D]: the tokens of B sequences back to back
    cu_seqlens_ptr,  # int32 [B + 1]: sequence b owns rows [cu[b], cu[b + 1])
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    H, D, num_m,  # num_m: query blocks of the longest sequence
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # -- which (query block, sequence, head), ordered as in _attn_fwd_kernel
    pid = tl.program_id(0)
    pid_m = pid % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    pid_bh = pid // num_m
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    seq_start = tl.load(cu_seqlens_ptr + b)
    L = tl.load(cu_seqlens_ptr + b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= L:  # this sequence is shorter than the longest: nothing to do here
        return
    first = seq_start.to(tl.int64)
    row = first + start_m

    # -- a sequence attends to itself only: Lq == Lk == L, no key mask
    _attn_fwd_block(
        q_ptr + row * stride_qt + h * stride_qh,
        k_ptr + first * stride_kt + h * stride_kh,
        v_ptr + first * stride_vt + h * stride_vh,
        o_ptr + row * stride_ot + h * stride_oh,
        q_ptr,  # no key mask: never read
        stride_qt, stride_kt, stride_vt, stride_ot, 0,
        start_m, L, L, D, qk_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IS_CAUSAL=IS_CAUSAL, HAS_MASK=False,
        EVEN_M=False, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
    )


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# fp16/bf16 tiles per padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M and BLOCK_N
# follow FlashAttention-2's forward choices for A100/H100 without dropout
# (csrc/flash_attn/src/flash_fwd_launch_template.h: head dim <= 64 -> 128 x 128; 96 and 128 -> 128 x 64;
# 256 -> 64 x 64); head dim 80 runs as BLOCK_D 128 here (FA2 rounds it to 96: the same tile). The warps
# are 8, not FA2's 4: compiled by Triton for sm_90a (tests/test_kernels_compile.py reads ptxas's report),
# every 4-warp tile but head dim 16's spills registers to local memory (36-404 bytes a thread at head
# dims 32-256), and 8 warps spill nothing (163-204 registers). Stages: 3, or 2 at head dim 256 (shared
# memory). Not yet timed on a GPU: `python benchmarks/bench_kernels.py --tiles` times them against
# the 4-warp tiles and a few neighbours.
HALF_TILES = {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3), 128: (128, 64, 8, 3),
              256: (64, 64, 8, 2)}


def _attention_config(Lq: int, D: int, dtype: torch.dtype, tiles=None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the prefill / encoder kernels: HALF_TILES
    for fp16/bf16 (or ``tiles``, a (BLOCK_M, BLOCK_N, num_warps, num_stages) override for benchmarks);
    fp32 ("ieee" dots run on FMA units) uses smaller tiles. Short queries shrink BLOCK_M (tl.dot
    needs >= 16)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if tiles is not None:
        BLOCK_M, BLOCK_N, num_warps, num_stages = tiles
    elif dtype == torch.float32:
        BLOCK_M, BLOCK_N, num_warps, num_stages = (64 if BLOCK_D <= 64 else 32), 32, 8, 2
    else:
        BLOCK_M, BLOCK_N, num_warps, num_stages = HALF_TILES[BLOCK_D]
    BLOCK_M = min(BLOCK_M, max(16, triton.next_power_of_2(Lq)))
    return BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages


def attention(q, k, v, *, scale: float, causal: bool = False, key_mask=None, tiles=None) -> torch.Tensor:
    """Softmax attention (see module docstring). q [B, Lq, H, D]; k, v [B, Lk, H, D] with any strides
    and unit stride on D; key_mask bool [B, Lk] (True = attend) or None. Returns [B, Lq, H, D].
    tiles: see _attention_config (benchmarks only)."""
    check_qkv(q, k, v, 4, "attention")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if k.shape[0] != B:
        raise ValueError(f"attention: q has batch {B} but k/v have batch {k.shape[0]}")
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()
    if key_mask is not None:
        mask = check_mask(key_mask, (B, Lk), q.device, "attention")
        stride_mb, stride_ml = mask.stride()
    else:
        mask, stride_mb, stride_ml = q, 0, 0  # dummy pointer, never read
    BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _attention_config(Lq, D, q.dtype, tiles)
    grid = (triton.cdiv(Lq, BLOCK_M) * B * H,)
    _attn_fwd_kernel[grid](
        q, k, v, out, mask,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_mb, stride_ml,
        H, Lq, Lk, D,
        float(scale) * LOG2E,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        IS_CAUSAL=bool(causal), HAS_MASK=key_mask is not None,
        EVEN_M=Lq % BLOCK_M == 0, EVEN_D=D == BLOCK_D,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def varlen_attention(q, k, v, *, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, causal: bool = False,
                     tiles=None) -> torch.Tensor:
    """Self-attention within each of B packed sequences (see module docstring). q, k, v [T, H, D] with
    any strides and unit stride on D (e.g. views of one fused [T, 3, H, D] projection); cu_seqlens
    int32 [B + 1] on q's device, sequence b = rows cu_seqlens[b]:cu_seqlens[b+1]; max_seqlen >= the
    longest sequence (it sizes the grid). causal: token i of a sequence sees its tokens j <= i.
    Returns [T, H, D]. tiles: see _attention_config (benchmarks only)."""
    check_qkv(q, k, v, 3, "varlen_attention", kv_dims=3)
    T, H, D = q.shape
    if k.shape[0] != T:
        raise ValueError(f"varlen_attention: q has {T} tokens but k/v have {k.shape[0]}; self-attention only")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device):
        raise ValueError("varlen_attention: cu_seqlens must be a 1-D int32 tensor of B + 1 >= 2 offsets on q's device, "
                         f"got {cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))} on {getattr(cu_seqlens, 'device', '?')}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"varlen_attention: max_seqlen must be an int >= 0, got {max_seqlen!r}")
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0 or H == 0 or max_seqlen == 0:
        return out
    B = cu_seqlens.numel() - 1
    BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _attention_config(max_seqlen, D, q.dtype, tiles)
    num_m = triton.cdiv(max_seqlen, BLOCK_M)
    _varlen_attn_fwd_kernel[(num_m * B * H,)](
        q, k, v, out, cu_seqlens.contiguous(),
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        H, D, num_m,
        float(scale) * LOG2E,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        IS_CAUSAL=bool(causal), EVEN_D=D == BLOCK_D, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"
