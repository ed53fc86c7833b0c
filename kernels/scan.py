"""One pass over a decode step's logits: the NaN/inf check and, for greedy rows, the argmax.

Every decode step must notice a running row whose logits hold NaN or inf (float16 overflow: its request
fails with NumericalError), and a greedy step without logits processors then takes each row's argmax.
In plain PyTorch that is seven launches and two reads of the [N, V] logits (a row sum and its
finiteness, the running-row mask, the flag update; the argmax). Here one program per row streams its
logits once in blocks of BLOCK_V, keeping the best value and its first index (strictly greater
replaces: ties keep the earliest index, as torch.argmax) and whether any element was NaN or inf, and
ORs the flag into the row's entry of `nonfinite` when the row is running (busy, not stopped).

Reference: ``encdec_fast.decode.ops.scan_logits``. The two agree on the flags and on the argmax of every row
without NaN (a row with NaN gets some index in range: its request fails anyway). The reference's
row-sum test equals this element test unless an fp32 sum of finite logits overflows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_kernel(
    logits_ptr,  # [N, V] (row stride stride_l, unit column stride)
    busy_ptr, stop_ptr, bad_ptr,  # [N] bool, [N] int64 stop marks (0: running), [N] bool nonfinite (in/out)
    tok_ptr,  # [N] int64 out: argmax (ARGMAX)
    V, stride_l,
    BLOCK_V: tl.constexpr, ARGMAX: tl.constexpr,
):
    n = tl.program_id(0)
    row = logits_ptr + n.to(tl.int64) * stride_l
    cols = tl.arange(0, BLOCK_V)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    bad = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        m = idx < V
        x = tl.load(row + idx, mask=m, other=float("-inf")).to(tl.float32)
        bad = tl.maximum(bad, tl.max((((x != x) | (tl.abs(x) == float("inf"))) & m).to(tl.int32), axis=0))
        if ARGMAX:
            bm = tl.max(tl.where(x == x, x, float("-inf")), axis=0)  # this block's best (NaN ignored)
            bi = tl.min(tl.where(m & (x == bm), idx, V), axis=0)  # its first index
            take = bm > best
            best_i = tl.where(take, bi.to(tl.int64), best_i)
            best = tl.where(take, bm, best)
    running = (tl.load(busy_ptr + n) != 0) & (tl.load(stop_ptr + n) == 0)
    prev = tl.load(bad_ptr + n) != 0
    tl.store(bad_ptr + n, prev | ((bad != 0) & running))
    if ARGMAX:
        tl.store(tok_ptr + n, best_i)


def scan_logits(logits, busy, stop_t, nonfinite, *, argmax: bool):
    """decode/ops.py's scan_logits in one launch (see the module docstring); nonfinite is updated in place."""
    N, V = logits.shape
    tokens = torch.empty(N, dtype=torch.int64, device=logits.device) if argmax else None
    if N == 0:
        return tokens
    for name, x, dtype in (("busy", busy, torch.bool), ("stop_t", stop_t, torch.int64),
                           ("nonfinite", nonfinite, torch.bool)):
        if x.dtype != dtype or x.shape != (N,) or not x.is_contiguous():
            raise ValueError(f"scan_logits: {name} must be a contiguous {dtype} tensor of shape ({N},), got "
                             f"{x.dtype} {tuple(x.shape)}")
    if V and logits.stride(1) != 1:
        raise ValueError("scan_logits: logits need unit stride along the vocabulary")
    _scan_kernel[(N,)](
        logits, busy, stop_t, nonfinite, tokens if argmax else nonfinite, V, logits.stride(0),
        BLOCK_V=min(4096, max(16, triton.next_power_of_2(V))), ARGMAX=argmax, num_warps=8 if V >= 4096 else 4,
    )
    return tokens
