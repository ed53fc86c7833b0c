"""Softmax attention kernels: one flash-attention forward kernel and one flash-decoding kernel.

Algorithm (FlashAttention-2, Dao 2023; Triton's fused-attention tutorial): a program owns a block of
BLOCK_M query rows of one (batch, head) and streams the keys in blocks of BLOCK_N. For each key block
it computes S = Q K^T (fp32), masks it, and updates the running row max ``m_i``, the running row sum
``l_i`` and the unnormalised output ``acc`` (online softmax, base-2 exponentials with
``qk_scale = scale * log2(e)``). The score matrix is never written to memory. The output is
``acc / l_i``; a row that saw no visible key has ``l_i == 0`` and writes zeros (like the reference).

The same kernel serves encoder self-attention (bidirectional + key padding mask), causal decoder
prefill (bottom-right aligned: query i sees keys j <= i + Lk - Lq) and cross-attention (Lq != Lk).
The key loop runs in two phases: blocks that need no masking (fully visible under the causal rule
and fully inside Lk), then the tail blocks that need the causal and/or bounds mask.

Decode (flash-decoding, Dao et al. 2023): one query per row over a cache. A program owns one
(row, head) and a contiguous chunk of keys; when N*H programs cannot fill the GPU the key range is
split into num_splits chunks whose partial (m, l, acc) are merged by a second small kernel. Sequence
lengths and kv rows are read from device memory inside the kernel, and the number of splits depends
only on shapes (Lmax, N*H), so a decode step is CUDA-graph capturable.

Reference: ``encdec_fast.ops.attention`` / ``encdec_fast.ops.decode_attention`` (plain PyTorch).

Limits: head dim 1..256 (padded to a power of two >= 16 and masked); q/k/v share one dtype (fp16,
bf16 or fp32) and have unit stride on the head dim; offsets inside one (batch, head) slab are 32-bit
(L * stride_L < 2**31 elements), batch/head/block bases are 64-bit. kv_index values must be valid
rows of k/v (they are not checked, as that would need a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


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

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)

    # -- 64-bit bases for this (batch, head, query block)
    q_base = q_ptr + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_ql
    o_base = o_ptr + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_ol
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    mask_base = mask_ptr + b * stride_mb

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
    out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
    o_ptrs = o_base + (rows[:, None] * stride_ol + offs_d[None, :])
    if EVEN_M & EVEN_D:
        tl.store(o_ptrs, out)
    else:
        tl.store(o_ptrs, out, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------
# decode: one query per row over a cache (flash-decoding)
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(
    q_ptr,  # [N, H, D]
    k_ptr, v_ptr,  # [Bk, Lmax, H, D]
    o_ptr,  # [N, H, D], or fp32 partial acc [N, H, num_splits, D] when IS_SPLIT
    part_m_ptr, part_l_ptr,  # fp32 [N, H, num_splits] partial row max / row sum (IS_SPLIT)
    lens_ptr,  # int [N]: keys 0..len-1 visible
    kv_index_ptr,  # int [N]: k/v row serving query row n (HAS_KV_INDEX)
    mask_ptr,  # uint8 [Bk, Lmax] (HAS_MASK)
    stride_qn, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_on, stride_oh,
    stride_mb, stride_ml,
    H, Lmax, D, chunk, num_splits,  # chunk: keys per split, a multiple of BLOCK_N
    qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_SPLIT: tl.constexpr,
    HAS_KV_INDEX: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    n64 = n.to(tl.int64)
    h64 = h.to(tl.int64)
    if HAS_KV_INDEX:
        kv_row = tl.load(kv_index_ptr + n).to(tl.int64)
    else:
        kv_row = n64
    seq_len = tl.minimum(tl.load(lens_ptr + n).to(tl.int32), Lmax)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    # -- the query, pre-scaled in fp32 so scores come out in the log2 domain
    q_ptrs = q_ptr + n64 * stride_qn + h64 * stride_qh + offs_d
    if EVEN_D:
        q = tl.load(q_ptrs).to(tl.float32)
    else:
        q = tl.load(q_ptrs, mask=d_ok, other=0.0).to(tl.float32)
    q = q * qk_scale

    k_base = k_ptr + kv_row * stride_kb + h64 * stride_kh
    v_base = v_ptr + kv_row * stride_vb + h64 * stride_vh
    mask_base = mask_ptr + kv_row * stride_mb

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)  # fp32 scalar -inf
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    # -- 64-bit scalar pointers to key `lo` of this split (advanced by BLOCK_N keys per step)
    #    plus 32-bit tile offsets
    k_cur = k_base + lo.to(tl.int64) * stride_kl
    v_cur = v_base + lo.to(tl.int64) * stride_vl
    k_offs = offs_n[:, None] * stride_kl + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vl + offs_d[None, :]
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n  # [BLOCK_N]
        valid = cols < hi
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_cur + k_offs, mask=kv_mask, other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), 1)  # [BLOCK_N] scores, log2 domain
        if HAS_MASK:
            km = tl.load(mask_base + cols * stride_ml, mask=valid, other=0)
            valid = valid & (km != 0)
        s = tl.where(valid, s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(s - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(v_cur + v_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_ij
        k_cur += BLOCK_N * stride_kl
        v_cur += BLOCK_N * stride_vl

    if not IS_SPLIT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = (acc / l_safe).to(o_ptr.dtype.element_ty)
        o_ptrs = o_ptr + n64 * stride_on + h64 * stride_oh + offs_d
    else:
        out = acc  # unnormalised fp32, merged by _decode_reduce_kernel
        part = pid_nh.to(tl.int64) * num_splits + split
        o_ptrs = o_ptr + part * D + offs_d
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
    if EVEN_D:
        tl.store(o_ptrs, out)
    else:
        tl.store(o_ptrs, out, mask=d_ok)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,  # fp32 [N, H, num_splits, D] unnormalised partial outputs
    part_m_ptr, part_l_ptr,  # fp32 [N, H, num_splits]
    o_ptr,  # [N, H, D]
    stride_on, stride_oh,
    H, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_nh = tl.program_id(0).to(tl.int64)
    n = pid_nh // H
    h = pid_nh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    m = tl.load(part_m_ptr + pid_nh * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + pid_nh * num_splits + offs_s, mask=s_ok, other=0.0)
    # -- rescale each split to the global max; empty splits (m == -inf) get weight 0
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_safe)  # [BLOCK_S]
    l_sum = tl.sum(w * l, 0)
    part = tl.load(part_o_ptr + (pid_nh * num_splits + offs_s[:, None]) * D + offs_d[None, :],
                   mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    acc = tl.sum(w[:, None] * part, 0)  # [BLOCK_D]
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(o_ptr + n * stride_on + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < D)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (an H100's 132 off CUDA, so choices are reproducible)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check_qkv(q, k, v, q_dims: int, name: str) -> None:
    for t, nm, nd in ((q, "q", q_dims), (k, "k", 4), (v, "v", 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name}: {nm} must be a {nd}-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: {nm} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: {nm} needs unit stride on the head dim (got strides {t.stride()});"
                             " call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D or k.shape[-2] != q.shape[-2]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on heads/head dim")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} unsupported; the kernel handles 1..{_MAX_HEAD_DIM}")


def _check_mask(key_mask, shape: tuple, device, name: str) -> torch.Tensor:
    """key_mask as uint8 0/1 (a bool mask is viewed, not copied; other dtypes: nonzero = attend)."""
    if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) != shape:
        raise ValueError(f"{name}: key_mask must be a bool tensor of shape {shape} (True = attend), got "
                         f"{tuple(getattr(key_mask, 'shape', ())) or type(key_mask).__name__}")
    if key_mask.device != device:
        raise ValueError(f"{name}: key_mask is on {key_mask.device}, q on {device}")
    if key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    return key_mask.view(torch.uint8)


def _attention_config(Lq: int, D: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the prefill kernel, sized for an H100
    (ptxas for sm_90: fp16/bf16 up to D=128 spill at most a few bytes). fp32 ("ieee" dots run on
    FMA units) uses smaller tiles; short queries shrink BLOCK_M (tl.dot needs >= 16)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        BLOCK_M, BLOCK_N, num_stages = (64 if BLOCK_D <= 64 else 32), 32, 2
    else:
        BLOCK_M, BLOCK_N, num_stages = 128, (64 if BLOCK_D <= 128 else 32), (3 if BLOCK_D <= 64 else 2)
        if BLOCK_D > 128:
            BLOCK_M = 64
    BLOCK_M = min(BLOCK_M, max(16, triton.next_power_of_2(Lq)))
    small = dtype != torch.float32 and BLOCK_M <= 64 and BLOCK_D <= 64
    num_warps = 4 if small else 8
    return BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages


def attention(q, k, v, *, scale: float, causal: bool = False, key_mask=None) -> torch.Tensor:
    """Softmax attention (see module docstring). q [B, Lq, H, D]; k, v [B, Lk, H, D] with any strides
    and unit stride on D; key_mask bool [B, Lk] (True = attend) or None. Returns [B, Lq, H, D]."""
    _check_qkv(q, k, v, 4, "attention")
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
        mask = _check_mask(key_mask, (B, Lk), q.device, "attention")
        stride_mb, stride_ml = mask.stride()
    else:
        mask, stride_mb, stride_ml = q, 0, 0  # dummy pointer, never read
    BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _attention_config(Lq, D, q.dtype)
    grid = (triton.cdiv(Lq, BLOCK_M) * B * H,)
    _attn_fwd_kernel[grid](
        q, k, v, out, mask,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_mb, stride_ml,
        H, Lq, Lk, D,
        float(scale) * _LOG2E,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        IS_CAUSAL=bool(causal), HAS_MASK=key_mask is not None,
        EVEN_M=Lq % BLOCK_M == 0, EVEN_D=D == BLOCK_D,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _decode_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for the decode kernel: tiles of BLOCK_N keys x BLOCK_D with
    ~16 elements per thread (~128 registers on sm_90, so enough warps stay resident to keep a
    memory-bound loop fed) and 16-byte vector loads along D."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    return BLOCK_N, BLOCK_D, max(1, min(8, BLOCK_N * BLOCK_D // 512))


def _decode_splits(rows_heads: int, Lmax: int, block_n: int, device: torch.device) -> int:
    """Number of key splits: enough programs for ~2 waves, each split at least one key block.
    Depends on shapes only (never on seq_lens values), so it is CUDA-graph safe."""
    target = 2 * _sm_count(device)
    if rows_heads >= target // 2:
        return 1
    return max(1, min(triton.cdiv(target, rows_heads), triton.cdiv(Lmax, block_n), 64))


def decode_attention(q, k, v, *, scale: float, seq_lens, kv_index=None, key_mask=None,
                     num_splits: int | None = None) -> torch.Tensor:
    """One query per row over a cache (see module docstring). q [N, H, D]; k, v [Bk, Lmax, H, D];
    seq_lens int [N]; kv_index int [N] or None (None: row n uses k/v row n); key_mask bool [Bk, Lmax]
    or None. num_splits forces the number of key splits (None: chosen from N*H and Lmax).
    Returns [N, H, D] in q's dtype."""
    _check_qkv(q, k, v, 3, "decode_attention")
    N, H, D = q.shape
    Bk, Lmax = k.shape[0], k.shape[1]
    for t, nm in ((seq_lens, "seq_lens"), (kv_index, "kv_index")):
        if t is None and nm == "kv_index":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) \
                or tuple(t.shape) != (N,):
            raise ValueError(f"decode_attention: {nm} must be an int32/int64 tensor of shape ({N},), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device:
            raise ValueError(f"decode_attention: {nm} is on {t.device}, q on {q.device}")
    if kv_index is None and Bk != N:
        raise ValueError(f"decode_attention: k/v have {Bk} rows but q has {N}; pass kv_index to map them")
    if key_mask is not None:
        mask = _check_mask(key_mask, (Bk, Lmax), q.device, "decode_attention")
        stride_mb, stride_ml = mask.stride()
    else:
        mask, stride_mb, stride_ml = q, 0, 0
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lmax == 0:
        return out.zero_()

    BLOCK_N, BLOCK_D, num_warps = _decode_config(D)
    if num_splits is None:
        num_splits = _decode_splits(N * H, Lmax, BLOCK_N, q.device)
    if num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be >= 1, got {num_splits}")
    chunk = triton.cdiv(triton.cdiv(Lmax, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(Lmax, chunk)  # drop splits that would start past Lmax

    dest, part_m, part_l = out, out, out  # unsplit: write the output directly
    if num_splits > 1:
        dest = torch.empty((N, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_m, part_l = torch.empty((2, N, H, num_splits), dtype=torch.float32, device=q.device).unbind(0)
    _decode_kernel[(N * H, num_splits)](
        q, k, v, dest, part_m, part_l, seq_lens,
        kv_index if kv_index is not None else seq_lens, mask,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        stride_mb, stride_ml,
        H, Lmax, D, chunk, num_splits,
        float(scale) * _LOG2E,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IS_SPLIT=num_splits > 1,
        HAS_KV_INDEX=kv_index is not None, HAS_MASK=key_mask is not None, EVEN_D=D == BLOCK_D,
        num_warps=num_warps, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(N * H,)](
            dest, part_m, part_l, out, out.stride(0), out.stride(1), H, D, num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
            num_warps=1 if BLOCK_D <= 64 else 2,
        )
    return out
