"""Flash-decoding: one query per row over a KV cache (Dao et al. 2023).

A program owns one (row, head) and a contiguous chunk of keys; when N*H programs cannot fill the GPU
the key range is split into num_splits chunks whose partial (m, l, acc) are merged by a second small kernel. Sequence
lengths and kv rows are read from device memory inside the kernel, and the number of splits depends
only on shapes (Lmax, N*H), so a decode step is CUDA-graph capturable.

Reference: ``encdec_fast.ops.decode_attention`` (plain PyTorch).

Limits: as attention.py (head dim 1..256, one dtype, unit stride on D). kv_index values must be valid
rows of k/v (they are not checked, as that would need a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, check_mask, check_qkv, sm_count


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
# launcher
# --------------------------------------------------------------------------------------------
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
    target = 2 * sm_count(device)
    if rows_heads >= target // 2:
        return 1
    return max(1, min(triton.cdiv(target, rows_heads), triton.cdiv(Lmax, block_n), 64))


def decode_attention(q, k, v, *, scale: float, seq_lens, kv_index=None, key_mask=None,
                     num_splits: int | None = None) -> torch.Tensor:
    """One query per row over a cache (see module docstring). q [N, H, D]; k, v [Bk, Lmax, H, D];
    seq_lens int [N]; kv_index int [N] or None (None: row n uses k/v row n); key_mask bool [Bk, Lmax]
    or None. num_splits forces the number of key splits (None: chosen from N*H and Lmax).
    Returns [N, H, D] in q's dtype."""
    check_qkv(q, k, v, 3, "decode_attention")
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
        mask = check_mask(key_mask, (Bk, Lmax), q.device, "decode_attention")
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
        float(scale) * LOG2E,
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
