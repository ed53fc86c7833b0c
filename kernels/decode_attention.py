"""Packed decode attention: one query per row over a window of key rows, the KV-cache write fused in.

Layout: k, v are [T, H, D] key rows (any strides, unit stride on D). Row n of q [N, H, D] attends
the keys starts[n] .. starts[n] + lens[n] - 1, minus those whose key_mask is False; a row with no
visible key outputs zeros. One API serves every decode attention of the model:
  self-attention  a layer's (rows, Lmax, H, D) cache viewed as (rows*Lmax, H, D), starts = row*Lmax,
                  lens = pos + 1, k_new/v_new = this step's K/V (written by the kernel, see 3.)
  cross-attention padded K/V viewed flat (starts = kv_row*S, key_mask = the encoder mask flattened)
                  or K/V packed per request (starts = its offset, lens = its length, no mask); the
                  beams/rows of one request share one window through equal starts.

Algorithm (flash-decoding, Dao et al. 2023; shared windows read once, as FlashInfer's cascade does):
  A program owns a group of BLOCK_M = 16 consecutive rows, one head, and one of num_splits splits.
  1. Work list, on the device: the union of the group's windows as disjoint segments [lo_g, end_g)
     (a window already covered by earlier rows' windows, like a second beam's, adds nothing),
     concatenated; split s takes one equal, tile-aligned slice of it. Should two windows overlap
     partially in another order, the group falls back to one segment per row (correct, no sharing).
  2. The slice in tiles of BLOCK_N keys: K/V rows gathered (each key's D elements contiguous, 16-byte
     loads), scores of all rows of the group with one tl.dot ([BLOCK_M, D] x [D, BLOCK_N], tensor
     cores), a per-row visibility mask, online softmax (m_i, l_i, acc) in fp32, acc += P @ V.
     Rows that share a window (beams) read each K/V tile once.
  3. k_new/v_new: split 0 stores them at slot starts + lens - 1 and adds that key from registers; the
     loop masks the slot out, so no split reads it before it is written (the slot must lie in no
     other row's window, and the rows' slots must be distinct: true of a self-attention cache).
  4. num_splits > 1: each split stores its partial (m, l, acc) in fp32; the last split of a
     (group, head) to finish (an atomic counter) merges them and writes the output, then zeroes the
     counter again: one launch per call, no second reduce kernel.
  num_splits depends on shapes only (N, H, T; split-K only when N*H/16 programs cannot fill the GPU)
  and starts/lens are read on the device only, so a decode step with this kernel is CUDA-graph safe.

Reference: ``encdec_fast.ops.decode_attention`` (plain PyTorch).

Limits: head dim 1..256; q, k, v (and k_new, v_new) share one dtype (fp16, bf16, fp32) and device.
starts/lens are not range-checked (that would need a host read): windows are clamped to [0, T).
Concurrent launches on different streams must not share a device (the split counters are shared).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, check_mask, check_qkv, sm_count

BLOCK_M = 16  # rows per program: tl.dot's smallest M
PROGRAMS_PER_SM = 4  # split until about this many programs per SM (one wave at ~48 KB smem each)
MAX_SPLITS = 16


@triton.jit
def _decode_kernel(
    q_ptr,  # [N, H, D]
    k_ptr, v_ptr,  # [T, H, D] key rows
    o_ptr,  # [N, H, D] out
    starts_ptr, lens_ptr,  # int [N]: row n's window k[starts[n] : starts[n] + lens[n]]
    mask_ptr,  # uint8 [T], 0 = key excluded (HAS_MASK)
    k_new_ptr, v_new_ptr,  # [N, H, D]: written at slot starts + lens - 1 (HAS_NEW)
    part_o_ptr,  # fp32 [N, H, NUM_SPLITS, BLOCK_D] partial (unnormalised) acc (NUM_SPLITS > 1)
    part_m_ptr, part_l_ptr,  # fp32 [N, H, NUM_SPLITS] partial row max / row sum
    counter_ptr,  # int32 [groups * H], zero between launches (NUM_SPLITS > 1)
    stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_on, stride_oh,
    stride_kn_n, stride_kn_h, stride_vn_n, stride_vn_h,
    N, H, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_NEW: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    pid_g = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = pid_g * BLOCK_M + offs_m  # [BLOCK_M]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)

    # -- 1. the group's windows, clamped to [0, T); rows past N get empty windows
    start = tl.load(starts_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    ln = tl.load(lens_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    slot = start + ln - 1  # the new key's position (HAS_NEW)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.minimum(tl.maximum(start + tl.maximum(ln, 0), start), T)

    # -- work list: segment g = [lo_g, end_g); lo_g skips the part covered by an earlier window that
    #    starts no later (so a window equal to an earlier one is empty). [BLOCK_M, BLOCK_M] masks:
    #    row i (axis 0) against earlier rows j (axis 1).
    before = offs_m[None, :] < offs_m[:, None]
    s_j, e_j = start[None, :], end[None, :]
    live_j = before & (e_j > s_j)
    cover = tl.max(tl.where(live_j & (s_j <= start[:, None]), e_j, 0), 1)  # [BLOCK_M]
    lo_shared = tl.maximum(start, cover)
    len_shared = tl.maximum(end - lo_shared, 0)
    overlap = live_j & (s_j < end[:, None]) & (e_j > lo_shared[:, None]) & (len_shared[:, None] > 0)
    shared = tl.max(tl.max(overlap.to(tl.int32), 1), 0) == 0  # segments disjoint, union covered
    lo = tl.where(shared, lo_shared, start)
    seg_len = tl.where(shared, len_shared, end - start)
    seg_off = tl.sum(tl.where(before, seg_len[None, :], 0), 1)  # exclusive prefix sum [BLOCK_M]
    total = tl.sum(seg_len, 0)
    chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
    c_lo = split * chunk
    c_hi = tl.minimum(c_lo + chunk, total)
    seg_end = seg_off + seg_len
    seg_shift = lo - seg_off  # key index = concatenated position + seg_shift[g]

    # -- the group's queries (dead rows are zeros)
    q = tl.load(q_ptr + rows64[:, None] * stride_qn + h64 * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = k_ptr + h64 * stride_kh
    v_head = v_ptr + h64 * stride_vh

    # -- 2. this split's slice of the work list, BLOCK_N keys at a time
    for c0 in range(c_lo, c_hi, BLOCK_N):
        c = c0 + offs_n  # [BLOCK_N] concatenated positions
        c_ok = c < c_hi
        in_seg = (c[None, :] >= seg_off[:, None]) & (c[None, :] < seg_end[:, None])  # [BLOCK_M, BLOCK_N]
        t = c + tl.sum(tl.where(in_seg, seg_shift[:, None], 0), 0)  # [BLOCK_N] key index
        in_win = (t[None, :] >= start[:, None]) & (t[None, :] < end[:, None])
        vis = tl.where(shared, in_win, in_seg) & c_ok[None, :]  # row sees key
        if HAS_MASK:
            km = tl.load(mask_ptr + t, mask=c_ok, other=0)
            vis = vis & (km != 0)[None, :]
        if HAS_NEW:
            vis = vis & (t[None, :] != slot[:, None])  # the slot's key comes from registers (3.)
        needed = tl.max(vis.to(tl.int32), 0) > 0  # [BLOCK_N]: masked keys are never read
        t64 = t.to(tl.int64)
        kv_mask = needed[:, None] & d_ok[None, :]
        k = tl.load(k_head + t64[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(vis, s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 domain
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + t64[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_ij

    # -- 3. the new key: split 0 writes it to the cache and attends to it from registers
    if HAS_NEW:
        first = (offs_m * 0 + split) == 0  # split 0, as a vector (the interpreter rejects scalar & vector)
        new_ok = row_ok & (ln >= 1) & (slot >= 0) & (slot < T) & first
        slot64 = slot.to(tl.int64)
        nd_mask = new_ok[:, None] & d_ok[None, :]
        kn = tl.load(k_new_ptr + rows64[:, None] * stride_kn_n + h64 * stride_kn_h + offs_d[None, :],
                     mask=nd_mask, other=0.0)
        vn = tl.load(v_new_ptr + rows64[:, None] * stride_vn_n + h64 * stride_vn_h + offs_d[None, :],
                     mask=nd_mask, other=0.0)
        tl.store(k_head + slot64[:, None] * stride_kt + offs_d[None, :], kn, mask=nd_mask)
        tl.store(v_head + slot64[:, None] * stride_vt + offs_d[None, :], vn, mask=nd_mask)
        new_vis = new_ok
        if HAS_MASK:
            new_vis = new_vis & (tl.load(mask_ptr + slot, mask=new_ok, other=0) != 0)
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale  # [BLOCK_M]
        s_new = tl.where(new_vis, s_new, float("-inf"))
        m_ij = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p_new = tl.math.exp2(s_new - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)
        m_i = m_ij

    o_mask = row_ok[:, None] & d_ok[None, :]
    o_ptrs = o_ptr + rows64[:, None] * stride_on + h64 * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key -> zeros
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        # -- 4. partials out; the last split of this (group, head) merges them
        part = (rows64 * H + h64) * NUM_SPLITS  # [BLOCK_M] first partial of each row
        tl.store(part_m_ptr + part + split, m_i, mask=row_ok)
        tl.store(part_l_ptr + part + split, l_i, mask=row_ok)
        tl.store(part_o_ptr + (part + split)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.debug_barrier()  # every thread's partials stored before the release below
        ticket = tl.atomic_add(counter_ptr + pid_g * H + h, 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_SPLITS - 1:
            tl.store(counter_ptr + pid_g * H + h, 0)  # ready for the next launch (or graph replay)
            offs_s = tl.arange(0, SPLITS_P2)
            s_mask = row_ok[:, None] & (offs_s < NUM_SPLITS)[None, :]
            m_all = tl.load(part_m_ptr + part[:, None] + offs_s[None, :], mask=s_mask, other=float("-inf"),
                            cache_modifier=".cg")  # [BLOCK_M, S]
            l_all = tl.load(part_l_ptr + part[:, None] + offs_s[None, :], mask=s_mask, other=0.0,
                            cache_modifier=".cg")
            m_max = tl.max(m_all, 1)
            m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
            l_sum = tl.sum(tl.math.exp2(m_all - m_safe[:, None]) * l_all, 1)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for s_i in tl.static_range(NUM_SPLITS):
                m_s = tl.load(part_m_ptr + part + s_i, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                a_s = tl.load(part_o_ptr + (part + s_i)[:, None] * BLOCK_D + offs_d[None, :],
                              mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                acc += tl.math.exp2(m_s - m_safe)[:, None] * a_s  # empty split: weight 0, a_s 0
            out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros [>= n] that the kernel leaves zeroed: kept per device, so a launch (and a captured
    graph) needs no memset. Grown outside graph capture; during one, a too-small buffer is replaced by
    a fresh zeros tensor that the graph itself zeroes (a memset node)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        fresh = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        buf = _COUNTERS[device] = fresh
    return buf


def _config(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps, num_stages): K and V tiles of BLOCK_N keys x BLOCK_D, each key a
    contiguous run of D elements (16-byte vector loads); 3 pipeline stages (~48 KB of shared memory
    at D=64 in fp16, so 4 programs fit on an SM), 2 for fp32 or the widest heads."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    stages = 2 if dtype == torch.float32 or BLOCK_D > 128 else 3
    return BLOCK_N, BLOCK_D, 4, stages


def decode_splits(rows: int, heads: int, keys: int, block_n: int, device: torch.device) -> int:
    """Key splits per (row group, head): 1 when the groups x heads programs already fill the GPU
    (PROGRAMS_PER_SM per SM), else enough to fill it, at most one per BLOCK_N keys of a group's share
    of the keys and at most MAX_SPLITS. Shapes only (never starts/lens values): CUDA-graph safe."""
    groups = triton.cdiv(rows, BLOCK_M)
    target = PROGRAMS_PER_SM * sm_count(device)
    if groups * heads >= target:
        return 1
    keys_per_group = triton.cdiv(keys, groups)
    return max(1, min(triton.cdiv(target, groups * heads), triton.cdiv(keys_per_group, block_n), MAX_SPLITS))


def _check_index(t, name: str, N: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (N,):
        raise ValueError(f"decode_attention: {name} must be an int32/int64 tensor of shape ({N},), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"decode_attention: {name} is on {t.device}, q on {device}")


def _check_new(k_new, v_new, q, k) -> None:
    if (k_new is None) != (v_new is None):
        raise ValueError("decode_attention: pass k_new and v_new together (or neither)")
    if k_new is None:
        return
    for t, nm in ((k_new, "k_new"), (v_new, "v_new")):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"decode_attention: {nm} must have q's shape {tuple(q.shape)}, got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.dtype != k.dtype or t.device != k.device:
            raise ValueError(f"decode_attention: {nm} is {t.dtype} on {t.device}; k is {k.dtype} on {k.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {nm} needs unit stride on the head dim (got strides "
                             f"{t.stride()}); call .contiguous() first")


def decode_attention(q, k, v, *, scale: float, starts, lens, key_mask=None, k_new=None, v_new=None,
                     max_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One query per row over a window of key rows (see the module docstring).

    q [N, H, D]; k, v [T, H, D]; starts, lens int32/int64 [N]: row n attends k[starts[n] :
    starts[n] + lens[n]]; key_mask bool [T] or None (False = excluded); k_new, v_new [N, H, D] or None:
    written at starts + lens - 1 (in place, in k and v) and attended to. max_len: a bound on lens for
    the torch reference (this kernel needs none). num_splits forces the key splits (None: from shapes).
    Returns [N, H, D] in q's dtype."""
    check_qkv(q, k, v, 3, "decode_attention", kv_dims=3)
    N, H, D = q.shape
    T = k.shape[0]
    _check_index(starts, "starts", N, q.device)
    _check_index(lens, "lens", N, q.device)
    _check_new(k_new, v_new, q, k)
    if key_mask is not None:
        mask = check_mask(key_mask, (T,), q.device, "decode_attention")
    else:
        mask = q  # dummy, never read
    if max_len is not None and (not isinstance(max_len, int) or max_len < 0):
        raise ValueError(f"decode_attention: max_len must be a non-negative int or None, got {max_len!r}")
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()

    BLOCK_N, BLOCK_D, num_warps, num_stages = _config(D, q.dtype)
    if num_splits is None:
        num_splits = decode_splits(N, H, T, BLOCK_N, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be an int >= 1, got {num_splits!r}")
    groups = triton.cdiv(N, BLOCK_M)
    if num_splits > 1:
        part_o = torch.empty((N, H, num_splits, BLOCK_D), dtype=torch.float32, device=q.device)
        part_m, part_l = torch.empty((2, N, H, num_splits), dtype=torch.float32, device=q.device).unbind(0)
        counters = _split_counters(q.device, groups * H)
    else:
        part_o = part_m = part_l = counters = out  # dummies, never touched
    kn, vn = (k_new, v_new) if k_new is not None else (q, q)
    _decode_kernel[(groups, H, num_splits)](
        q, k, v, out, starts, lens, mask, kn, vn, part_o, part_m, part_l, counters,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        N, H, T, float(scale) * LOG2E,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
        HAS_MASK=key_mask is not None, HAS_NEW=k_new is not None, DOT_IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
