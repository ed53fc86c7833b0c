"""The decode-only ops: one look at a step's logits, token choice, and the step's bookkeeping, per backend.

decode/step.py and decode/beam.py call ``dops.<name>(...)`` on the table of the model's backend. The
plain-PyTorch versions below are the reference the Triton kernels (kernels/scan.py, kernels/commit.py),
the csrc/ CUDA kernels (select_greedy, select_beam; csrc_ops.py) and the CPU kernels' versions (cpu_scan_logits,
cpu_select_beam: the torch backend's on a CPU device) are tested against.

Shape conventions (N decode rows, V vocabulary, Lc token slots per row):
  scan_logits    logits [N, V]: flags running rows with NaN/inf in nonfinite [N] (in place); -> argmax
                 tokens long [N] (argmax=True) or None
  select_greedy  logits [N, V], seq [N, Lc], t [N], RowTables, Spec -> tokens long [N]
  select_beam    logits [N, V], seq, t, RowTables, Spec, running scores [R, nb], k
                 -> (scores float32, indices long) [R, k]; request r's beams are rows r*nb .. r*nb+nb-1
  commit_tokens  the chosen tokens and the state's per-row buffers, updated in place

The triton table takes select_greedy / select_beam from the csrc kernels where ENCDEC_CUDA says so (those
listed in CSRC_FASTER, or both with ENCDEC_CUDA=1).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..cpu import kernels as ck
from . import select as sel

# The ops for which the csrc/ CUDA kernel was measured faster than the triton table's own op, on a GPU
# (benchmarks/bench_kernels.py rows and W1 in benchmarks/gpu_report.py, ENCDEC_CUDA=1 vs 0). Empty
# until measured: no GPU has run them yet, so ENCDEC_CUDA=auto switches nothing on.
CSRC_FASTER: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------
# one look at a step's logits
# --------------------------------------------------------------------------------------------
def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) logits -> bool (N,): rows holding NaN or inf. One pass: a row's sum is finite iff all its
    entries are (fp32 sums of real logits cannot overflow)."""
    return ~torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))


def scan_logits(logits, busy, stop_t, nonfinite, *, argmax: bool):
    """One look at a step's logits [N, V]: running rows (busy, stop_t == 0) holding NaN or inf get
    nonfinite[n] = True (bool [N], in place; nonfinite_rows); with argmax, returns each row's
    argmax (first index among equal maxima; any index in range for a row holding NaN), else None."""
    nonfinite |= nonfinite_rows(logits) & busy & (stop_t == 0)
    return torch.argmax(logits, dim=-1) if argmax else None


# --------------------------------------------------------------------------------------------
# token selection (decode/step.py's commit and decode/beam.py's BeamGroup.step; the processors and
# their per-row tables are decode/select.py's)
# --------------------------------------------------------------------------------------------
def select_greedy(logits: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, tables: sel.RowTables,
                  spec: sel.Spec) -> torch.Tensor:
    """Greedy choice for rows n < N = len(logits) holding tokens seq[n, :t[n]]: argmax of the processed fp32
    logits (first index among equal maxima), or of the raw logits when spec runs no processor. seq, t and the
    tables may hold more rows (the decode state's buffers): row n reads row n of each."""
    if not spec.needs_scores:
        return sel.greedy(logits)
    N = logits.shape[0]
    return sel.greedy(sel.process(logits.float(), seq[:N], t[:N], tables, spec))


def select_beam(logits: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, tables: sel.RowTables, spec: sel.Spec,
                running_scores: torch.Tensor, k: int):
    """One beam-search step's candidates per request, as transformers' _beam_search takes them: the top k of
    process(log_softmax(logits)) + running_scores over beams x vocabulary (torch.topk), indices
    beam * V + token. running_scores [R, nb]: request r's beams are rows r*nb .. r*nb+nb-1 (decode/beam.py's
    layout); rows past R*nb (of the logits, seq, t and the tables) are not read."""
    return _top_candidates(_beam_log_probs(logits, seq, t, tables, spec, running_scores), running_scores, k)


def _beam_log_probs(logits, seq, t, tables, spec, running_scores) -> torch.Tensor:
    rows = running_scores.numel()
    return sel.process(F.log_softmax(logits[:rows].float(), dim=-1), seq[:rows], t[:rows], tables, spec)


def _top_candidates(log_probs: torch.Tensor, running_scores: torch.Tensor, k: int):
    R, nb = running_scores.shape
    V = log_probs.shape[-1]
    acc = (log_probs.view(R, nb, V) + running_scores[:, :, None]).view(R, nb * V)  # (R, nb * V)
    return torch.topk(acc, k=k)


# --------------------------------------------------------------------------------------------
# the CPU kernels' versions (csrc/cpu_linear.cpp through cpu/kernels.py): the same answers, one pass over the logits
# (torch's sum, argmax and topk read ~1 ns a logit on the CPU); for fp32 CPU logits, else the reference above
# --------------------------------------------------------------------------------------------
def _kernel_logits(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape[-1] > 0


def cpu_scan_logits(logits, busy, stop_t, nonfinite, *, argmax: bool):
    """scan_logits in one pass: each row's argmax and finiteness (row_argmax)."""
    if not _kernel_logits(logits):
        return scan_logits(logits, busy, stop_t, nonfinite, argmax=argmax)
    best, bad = ck.row_argmax(logits)
    nonfinite |= bad & busy & (stop_t == 0)
    return best if argmax else None


def cpu_select_beam(logits, seq, t, tables, spec, running_scores, k: int):
    """select_beam ranking from each beam row's k + 1 best log-probs (row_topk), where that answer is provably
    torch.topk's (cpu_top_candidates); the reference's torch.topk over all candidates otherwise."""
    log_probs = _beam_log_probs(logits, seq, t, tables, spec, running_scores)
    fast = cpu_top_candidates(log_probs, running_scores, k) if _kernel_logits(log_probs) else None
    return fast if fast is not None else _top_candidates(log_probs, running_scores, k)


def cpu_top_candidates(log_probs: torch.Tensor, running_scores: torch.Tensor, k: int):
    """_top_candidates (torch.topk over (R, nb * V)) from each beam row's k + 1 best log-probs: adding a beam's running
    score keeps its row's order, so every candidate outside those lists is at most the (k + 1)-th best of its
    request. When the k + 1 best candidates are strictly decreasing, the top k is unique and equals torch.topk's;
    otherwise (a tie: which of tied candidates torch.topk ranks first is its own), with NaN, or with fewer than k + 1
    tokens: None."""
    R, nb = running_scores.shape
    V = log_probs.shape[-1]
    kk = k + 1
    got = ck.row_topk(log_probs, kk) if kk <= min(V, 256) else None
    if got is None:
        return None
    vals, idx = got
    cand = (vals.view(R, nb, kk) + running_scores[:, :, None]).view(R, nb * kk)  # the same fp32 adds as the full acc
    cidx = (idx.view(R, nb, kk) + torch.arange(nb)[None, :, None] * V).view(R, nb * kk)
    top, order = torch.topk(cand, k=kk)
    if not bool((top[:, :-1] > top[:, 1:]).all()):
        return None
    return top[:, :k], cidx.gather(1, order[:, :k])


# --------------------------------------------------------------------------------------------
# a decode step's bookkeeping
# --------------------------------------------------------------------------------------------
def commit_tokens(tokens, seq, t, limit, alive, busy, is_beam, beam_done, stop_t, pad, eos, steps, all_stopped_at):
    """After the token choice, in place: rows that are not alive emit their pad; a busy row below its limit
    takes its token (written at seq[n, t[n]] unless it is a beam row, whose tokens its beam group wrote)
    and advances; eos (any of the row's eos ids, (N, E) padded with -1) ends an alive row; a row's stop
    mark becomes its length when it stops (eos, its limit, or for a beam row beam_done); steps counts the
    step, and all_stopped_at takes it the first time no busy row is still running.
    tokens, t, limit, stop_t, pad int64 (N,); alive, busy, is_beam, beam_done bool (N,); seq int64 (N, Lc);
    steps, all_stopped_at int64 ()."""
    room = busy & (t < limit)  # rows that take a token this step
    tok = torch.where(alive, tokens, pad)
    hit = (tok[:, None] == eos).any(-1) & alive & room
    plain = room & ~is_beam
    at = t.clamp(max=seq.shape[1] - 1)[:, None]
    seq.scatter_(1, at, torch.where(plain, tok, seq.gather(1, at).squeeze(1))[:, None])
    alive &= ~hit
    t += room.long()
    ended = busy & (stop_t == 0) & torch.where(is_beam, beam_done, ~alive | (t >= limit))
    stop_t.copy_(torch.where(ended, t, stop_t))
    steps += 1
    everyone = torch.all((stop_t > 0) | ~busy)
    all_stopped_at.copy_(torch.where(everyone & (all_stopped_at == 0), steps, all_stopped_at))


def cpu_commit_tokens(*args):
    """commit_tokens row by row in one kernel call (cpu/kernels.py), where the arguments are what it reads."""
    if not ck.commit_tokens(*args):
        commit_tokens(*args)


# --------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecodeOps:
    """The decode-only ops of one backend."""

    name: str
    scan_logits: Callable
    select_greedy: Callable
    select_beam: Callable
    commit_tokens: Callable


_TORCH = DecodeOps(name="torch", scan_logits=scan_logits, select_greedy=select_greedy, select_beam=select_beam,
                   commit_tokens=commit_tokens)
_TORCH_CPU = dataclasses.replace(_TORCH, name="torch+cpu-kernels", scan_logits=cpu_scan_logits,
                                 select_beam=cpu_select_beam, commit_tokens=cpu_commit_tokens)


def table(backend: str, device: torch.device | str | None = None) -> DecodeOps:
    """The decode ops for a backend name ("torch" or "triton"); on a CPU device the torch backend's take the CPU
    kernels' versions where those run."""
    if backend == "torch":
        if device is not None and torch.device(device).type == "cpu":
            return _TORCH_CPU if ck.has_int8() else _TORCH
        return _TORCH
    if backend == "triton":
        from ..kernels import commit as kcommit
        from ..kernels import scan as kscan

        return with_csrc(dataclasses.replace(_TORCH, name="triton", scan_logits=kscan.scan_logits,
                                             commit_tokens=kcommit.commit_tokens))
    raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'triton'")


def with_csrc(t: DecodeOps) -> DecodeOps:
    """t with the ops that ENCDEC_CUDA and CSRC_FASTER give to the csrc kernels (each falls back to t's op
    where the kernel does not apply)."""
    from .. import csrc

    names = csrc.enabled_ops(CSRC_FASTER)
    if not names:
        return t
    from .. import csrc_ops

    return dataclasses.replace(t, **{n: csrc_ops.bind(n, getattr(t, n)) for n in names})
