"""A decode step's bookkeeping in one launch: token writes, eos detection, row progress, stop marks.

After the decoder and the token choice, a decode step (encdec_fast/decode/state.py) must, for every
row: substitute pad for finished rows, detect eos, write the token into the row's token buffer, advance
the row, mark where it stopped (eos, its length limit, or its beam request done), and count the step
and the step at which every busy row had stopped. In plain PyTorch that is ~25 tiny launches per step;
in a CUDA graph of a batch-1 step they cost about as much as a decoder layer. Here it is one program
over all rows (a decode state has at most a few thousand), every value loaded once.

Reference: ``encdec_fast.decode.ops.commit_tokens`` (plain PyTorch), element for element.

Limits: one program, so rows <= 16384; eos ids per row <= 64 (the table is padded with -1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16384
MAX_EOS = 64


@triton.jit
def _commit_kernel(
    tok_ptr,  # [N] int64 chosen tokens
    seq_ptr,  # [N, Lc] int64 token buffer (row stride stride_seq)
    t_ptr, limit_ptr, stop_ptr,  # [N] int64: tokens held, length limit, stop mark (0: running)
    alive_ptr, busy_ptr, beam_ptr, beam_done_ptr,  # [N] bool
    pad_ptr,  # [N] int64
    eos_ptr,  # [N, E] int64, -1 padded (row stride stride_eos)
    steps_ptr, all_ptr,  # [] int64 step counter, step at which every busy row had stopped (0: not yet)
    N, Lc, E, stride_seq, stride_eos,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_N)
    m = rows < N
    tok = tl.load(tok_ptr + rows, mask=m, other=0)
    t = tl.load(t_ptr + rows, mask=m, other=1)
    limit = tl.load(limit_ptr + rows, mask=m, other=1)
    stop = tl.load(stop_ptr + rows, mask=m, other=1)
    alive = tl.load(alive_ptr + rows, mask=m, other=0) != 0
    busy = tl.load(busy_ptr + rows, mask=m, other=0) != 0
    beam = tl.load(beam_ptr + rows, mask=m, other=0) != 0
    beam_done = tl.load(beam_done_ptr + rows, mask=m, other=0) != 0
    pad = tl.load(pad_ptr + rows, mask=m, other=0)

    room = busy & (t < limit)  # rows that take a token this step
    tok = tl.where(alive, tok, pad)
    cols = tl.arange(0, BLOCK_E)
    eos = tl.load(eos_ptr + rows[:, None].to(tl.int64) * stride_eos + cols[None, :],
                  mask=m[:, None] & (cols[None, :] < E), other=-1)
    hit = (tl.sum((eos == tok[:, None]).to(tl.int32), axis=1) > 0) & alive & room
    plain = room & ~beam
    at = tl.minimum(t, Lc - 1)
    tl.store(seq_ptr + rows.to(tl.int64) * stride_seq + at, tok, mask=m & plain)

    alive = alive & ~hit
    t = t + room.to(tl.int64)
    ended = busy & (stop == 0) & tl.where(beam, beam_done, ~alive | (t >= limit))
    stop = tl.where(ended, t, stop)
    tl.store(alive_ptr + rows, alive, mask=m)
    tl.store(t_ptr + rows, t, mask=m)
    tl.store(stop_ptr + rows, stop, mask=m)

    steps = tl.load(steps_ptr) + 1
    tl.store(steps_ptr, steps)
    waiting = tl.sum((m & busy & (stop == 0)).to(tl.int32), axis=0)  # busy rows still running
    before = tl.load(all_ptr)
    tl.store(all_ptr, tl.where((waiting == 0) & (before == 0), steps, before))


def commit_tokens(tokens, seq, t, limit, alive, busy, is_beam, beam_done, stop_t, pad, eos, steps, all_stopped_at):
    """decode/ops.py's commit_tokens in one launch (see the module docstring); every tensor is updated in place."""
    N, Lc = seq.shape
    E = eos.shape[1]
    if N == 0:
        return
    if N > MAX_ROWS or E > MAX_EOS:
        raise ValueError(f"commit_tokens: {N} rows and {E} eos ids per row exceed the kernel's "
                         f"{MAX_ROWS} rows / {MAX_EOS} ids")
    for name, x, dtype in (("tokens", tokens, torch.int64), ("t", t, torch.int64), ("limit", limit, torch.int64),
                           ("stop_t", stop_t, torch.int64), ("pad", pad, torch.int64), ("alive", alive, torch.bool),
                           ("busy", busy, torch.bool), ("is_beam", is_beam, torch.bool),
                           ("beam_done", beam_done, torch.bool)):
        if x.dtype != dtype or x.shape != (N,) or not x.is_contiguous():
            raise ValueError(f"commit_tokens: {name} must be a contiguous {dtype} tensor of shape ({N},), got "
                             f"{x.dtype} {tuple(x.shape)}")
    if seq.stride(1) != 1 or eos.stride(1) != 1 or seq.dtype != torch.int64 or eos.dtype != torch.int64:
        raise ValueError("commit_tokens: seq and eos must be int64 with unit stride along their last dim")
    _commit_kernel[(1,)](
        tokens, seq, t, limit, stop_t, alive, busy, is_beam, beam_done, pad, eos, steps, all_stopped_at,
        N, Lc, E, seq.stride(0), eos.stride(0),
        BLOCK_N=triton.next_power_of_2(N), BLOCK_E=max(2, triton.next_power_of_2(E)),
        num_warps=4 if N <= 1024 else 8,
    )
