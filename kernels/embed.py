"""A decode step's embeddings in one launch: token gather, scale, token type, position, LayerNorm.

Each decode step feeds one token per row: row n's token is seq[n, t[n] - 1], at position t[n] - 1. In
plain PyTorch its embeddings take ~8 launches (the gather from the token buffer, the position rule,
two table lookups, the adds, the LayerNorm) plus two for the step's attention bookkeeping (each row's
key count and first cache row). Here one program per row does all of it: the token and its position
are read once, the rows of the word / position tables are loaded as one [E] vector each, the sum is
rounded to the table dtype after each addition (as the reference's separate ops round it), and the
LayerNorm (every family but GPT-2) is the same two-pass fp32 computation as kernels/layer_norm.py.

Reference: ``encdec_fast.ops.embed_step`` (plain PyTorch).

Limits: embedding width <= 16384 (one row in registers); the tables share one floating dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 16384


@triton.jit
def _embed_step_kernel(
    seq_ptr, t_ptr,  # [N, Lc] int64 token buffer (row stride stride_seq), [N] int64 tokens held
    word_ptr, pos_ptr, type_ptr,  # [V, E], [P, E] tables (row strides stride_word, stride_pos), [E] type-0 row
    lnw_ptr, lnb_ptr,  # [E] LayerNorm weight and bias (HAS_LN)
    x_ptr, lens_ptr, starts_ptr,  # out: [N, E] embeddings, [N] int32 key counts, [N] int64 first cache rows
    stride_seq, stride_word, stride_pos, stride_x,
    E, scale, offset, pad_id, eps, row_stride,
    BLOCK_E: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_TYPE: tl.constexpr, SKIP_PAD: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    n = tl.program_id(0)
    t = tl.load(t_ptr + n)
    pos = t - 1
    tok = tl.load(seq_ptr + n.to(tl.int64) * stride_seq + pos)
    if SKIP_PAD:
        p = tl.where(tok != pad_id, pos + offset, pad_id)
    else:
        p = pos + offset
    cols = tl.arange(0, BLOCK_E)
    m = cols < E
    x = tl.load(word_ptr + tok * stride_word + cols, mask=m, other=0.0)
    dt = x.dtype
    if HAS_SCALE:
        x = (x.to(tl.float32) * scale).to(dt)
    if HAS_TYPE:
        x = (x.to(tl.float32) + tl.load(type_ptr + cols, mask=m, other=0.0).to(tl.float32)).to(dt)
    x = (x.to(tl.float32) + tl.load(pos_ptr + p * stride_pos + cols, mask=m, other=0.0).to(tl.float32)).to(dt)
    if HAS_LN:
        xf = x.to(tl.float32)
        width = E.to(tl.float32)
        mean = tl.math.div_rn(tl.sum(xf, axis=0), width)
        xc = tl.where(m, xf - mean, 0.0)
        var = tl.math.div_rn(tl.sum(xc * xc, axis=0), width)
        y = xc * (1.0 / tl.sqrt(var + eps))
        y = y * tl.load(lnw_ptr + cols, mask=m, other=0.0).to(tl.float32)
        y = y + tl.load(lnb_ptr + cols, mask=m, other=0.0).to(tl.float32)
        x = y.to(dt)
    tl.store(x_ptr + n.to(tl.int64) * stride_x + cols, x, mask=m)
    tl.store(lens_ptr + n, t.to(tl.int32))
    tl.store(starts_ptr + n, n.to(tl.int64) * row_stride)


def embed_step(seq, t, word, position, type0, *, scale: float, offset: int, pad_id: int, skip_pad: bool, ln,
               row_stride: int):
    """ops.embed_step in one launch (see the module docstring)."""
    N, E = t.shape[0], word.shape[1]
    dev = word.device
    x = torch.empty(N, E, dtype=word.dtype, device=dev)
    lens = torch.empty(N, dtype=torch.int32, device=dev)
    starts = torch.empty(N, dtype=torch.int64, device=dev)
    if N == 0:
        return x, lens, starts
    if E > MAX_WIDTH:
        raise ValueError(f"embed_step: embedding width {E} exceeds the kernel's {MAX_WIDTH}")
    if seq.dtype != torch.int64 or t.dtype != torch.int64 or seq.stride(1) != 1 or not t.is_contiguous():
        raise ValueError("embed_step: seq and t must be int64, seq with unit stride along its last dim and t contiguous")
    if word.stride(1) != 1 or position.stride(1) != 1 or position.dtype != word.dtype:
        raise ValueError("embed_step: the word and position tables must share one dtype, with unit stride along E")
    type0 = type0 if type0 is not None else word  # a pointer the kernel does not read
    lnw, lnb, eps = ln if ln is not None else (word, word, 0.0)
    _embed_step_kernel[(N,)](
        seq, t, word, position, type0.contiguous(), lnw, lnb, x, lens, starts,
        seq.stride(0), word.stride(0), position.stride(0), x.stride(0),
        E, float(scale), int(offset), int(pad_id), float(eps), int(row_stride),
        BLOCK_E=max(16, triton.next_power_of_2(E)), HAS_SCALE=scale != 1.0, HAS_TYPE=type0 is not word,
        SKIP_PAD=bool(skip_pad), HAS_LN=ln is not None, num_warps=4 if E <= 2048 else 8,
    )
    return x, lens, starts
