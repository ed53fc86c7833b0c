"""The op-table entries backed by the csrc/ CUDA kernels: input checks, outputs, and the C-ABI call.

Each entry is the op of decode/ops.py with the same name and takes the op it replaces as `fallback`: a call
the kernel does not cover (CPU tensors, a dtype, stride or size it does not take, a processor it does
not fuse) goes to the fallback unchanged, so model code never needs to know. The kernels run on
torch's current stream; outputs and scratch come from torch's allocator (graph-safe).

  select_greedy   csrc/select.cu, processors + argmax in one launch
  select_beam     csrc/select.cu, log-softmax + processors + beam scores + top k

Both read decode/select.py's per-row device tables (RowTables) in place, through the pointers and
strides of one encdec_select_params (select_params): repetition penalty (the `seen` table), no-repeat
n-gram, bad words (the `ban` table, multi-token words with their owner mask) and min length fuse; a Spec
with sampling warpers (temperature, top-k, top-p) falls back.
"""

from __future__ import annotations

import functools

import torch

from . import csrc
from .errors import CudaKernelError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_VOCAB = 163840  # ENCDEC_SELECT_MAX_VOCAB
MAX_K = MAX_BEAMS = 32  # ENCDEC_BEAM_MAX_K, ENCDEC_BEAM_MAX_BEAMS
MAX_NGRAM = 63  # encdec_select_params.ngram_sizes: one bit per size


def _call(name: str, *args) -> None:
    lib = csrc.library()
    rc = getattr(lib.lib, name)(*args)
    if rc != 0:
        raise CudaKernelError(f"{name} failed with CUDA error {rc} ({lib.error_string(rc)}).")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0


def select_params(seq: torch.Tensor, t: torch.Tensor, tables, spec) -> csrc.SelectParams | None:
    """The kernels' view of process(scores, seq, t, tables, spec) for rows 0 .. len(t)-1: pointers into the
    tables (nothing is copied: a captured step reads them as they change), NULL where spec leaves a
    processor off. None where the kernels do not fuse the spec (sampling warpers, an n-gram size past 63)
    or the tables are not laid out as they expect."""
    if spec.temperature or spec.top_k or spec.top_p or any(not 1 <= n <= MAX_NGRAM for n in spec.ngram_sizes):
        return None
    dev = seq.device
    i64 = [seq, t, tables.ngram, tables.min_len, tables.eos, tables.bad_prefix, tables.bad_plen, tables.bad_last]
    masks = [m for m in (tables.seen, tables.ban, tables.bad_owner) if m is not None]
    if (any(x.dtype != torch.int64 or x.device != dev for x in i64) or tables.penalty.dtype != torch.float32
            or any(m.dtype != torch.bool or m.device != dev or (m.shape[1] > 1 and m.stride(1) != 1) for m in masks)
            or seq.dim() != 2 or (seq.shape[1] > 1 and seq.stride(1) != 1) or t.shape[0] > seq.shape[0]
            or tables.eos.stride(1) != 1 or tables.bad_prefix.stride(1) != 1
            or not (tables.bad_plen.is_contiguous() and tables.bad_last.is_contiguous())):
        return None
    p = csrc.SelectParams(ids=seq.data_ptr(), ids_stride=seq.stride(0), lens=t.data_ptr(), lens_stride=_row_stride(t))
    if spec.penalty:
        p.penalty, p.penalty_stride = tables.penalty.data_ptr(), _row_stride(tables.penalty)
        p.seen, p.seen_stride = tables.seen.data_ptr(), tables.seen.stride(0)
    if spec.ngram_sizes:
        p.ngram, p.ngram_stride = tables.ngram.data_ptr(), _row_stride(tables.ngram)
        p.ngram_sizes = sum(1 << n for n in spec.ngram_sizes)
    if spec.bad_single:
        p.ban, p.ban_stride = tables.ban.data_ptr(), tables.ban.stride(0)
    if spec.min_len:
        p.min_len, p.min_len_stride = tables.min_len.data_ptr(), _row_stride(tables.min_len)
        p.eos, p.eos_stride, p.n_eos = tables.eos.data_ptr(), tables.eos.stride(0), tables.eos.shape[1]
    G = tables.bad_prefix.shape[0]
    if spec.bad_multi and G:
        p.n_bad = G
        p.bad_prefix, p.bad_prefix_stride = tables.bad_prefix.data_ptr(), tables.bad_prefix.stride(0)
        p.bad_plen, p.bad_last = tables.bad_plen.data_ptr(), tables.bad_last.data_ptr()
        p.bad_owner, p.bad_owner_stride = tables.bad_owner.data_ptr(), tables.bad_owner.stride(0)
    return p


def _select_covers(logits: torch.Tensor, seq: torch.Tensor, t: torch.Tensor) -> bool:
    return (logits.is_cuda and logits.dim() == 2 and logits.dtype in DTYPE_CODES and logits.stride(1) == 1
            and 1 <= logits.shape[1] <= MAX_VOCAB and seq.device == logits.device and t.dim() == 1
            and seq.shape[0] >= logits.shape[0] and t.shape[0] >= logits.shape[0])


def select_greedy(logits, seq, t, tables, spec, *, fallback):
    """argmax over the processed logits, as fallback (decode/ops.py's select_greedy) computes it, in one launch."""
    N, V = logits.shape
    params = select_params(seq[:N], t[:N], tables, spec) if _select_covers(logits, seq, t) else None
    if params is None:
        return fallback(logits, seq, t, tables, spec)
    out = torch.empty(N, dtype=torch.int64, device=logits.device)
    _call("encdec_select_greedy", logits.data_ptr(), logits.stride(0), N, V, DTYPE_CODES[logits.dtype], params,
          out.data_ptr(), _stream(logits))
    return out


def select_beam(logits, seq, t, tables, spec, running_scores, k, *, fallback):
    """top k over beams x vocab of processed log-probabilities + running beam scores, per request (rows
    r*nb .. r*nb+nb-1 of request r), as fallback (decode/ops.py's select_beam) computes it."""
    R, nb = running_scores.shape
    rows, V = R * nb, logits.shape[1]
    ok = (_select_covers(logits, seq, t) and running_scores.dtype == torch.float32 and running_scores.is_contiguous()
          and running_scores.device == logits.device and 1 <= rows <= logits.shape[0] and nb <= MAX_BEAMS
          and 1 <= k <= MAX_K and nb * V >= k)
    params = select_params(seq[:rows], t[:rows], tables, spec) if ok else None
    if params is None:
        return fallback(logits, seq, t, tables, spec, running_scores, k)
    dev = logits.device
    cand_scores = torch.empty(rows, k, dtype=torch.float32, device=dev)
    cand_index = torch.empty(rows, k, dtype=torch.int32, device=dev)
    top = torch.empty(R, k, dtype=torch.float32, device=dev)
    index = torch.empty(R, k, dtype=torch.int64, device=dev)
    _call("encdec_select_beam", logits.data_ptr(), logits.stride(0), R, nb, V, DTYPE_CODES[logits.dtype], params,
          running_scores.data_ptr(), k, cand_scores.data_ptr(), cand_index.data_ptr(), top.data_ptr(),
          index.data_ptr(), _stream(logits))
    return top, index


def bind(name: str, fallback):
    """The csrc version of op `name`, falling back to `fallback` (the table's own op) where it does not apply."""
    return functools.partial(globals()[name], fallback=fallback)
