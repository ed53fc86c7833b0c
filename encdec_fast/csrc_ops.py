"""The op-table entries backed by the csrc/ CUDA kernels: input checks, outputs, and the C-ABI call.

Each entry is the op of ops.py with the same name and takes the op it replaces as `fallback`: a call
the kernel does not cover (CPU tensors, more than 16 rows, a dtype, stride or alignment it does not
take, a processor it does not fuse) goes to the fallback unchanged, so model code never needs to know.
The kernels run on torch's current stream; outputs and scratch come from torch's allocator (graph-safe).

  linear / linear_gelu / linear_residual   csrc/gemv.cu, 1-16 rows (decode), bias / GELU / residual fused
  select_greedy                             csrc/select.cu, processors + argmax in one launch
  select_beam                               csrc/select.cu, log-softmax + processors + beam scores + top k

select_* take decode/select.py's Pipeline and turn it once into device tables (processor_tables):
repetition penalty, no-repeat n-gram, bad words and min length fuse; a pipeline holding anything else
(temperature, top-k, top-p: sampling) falls back.
"""

from __future__ import annotations

import functools
import weakref

import torch

from . import csrc
from .errors import CudaKernelError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EPILOGUES = {"none": 0, "bias": 1, "gelu_none": 2, "gelu_tanh": 3, "residual": 4}
MAX_ROWS = 16
MAX_VOCAB = 163840  # ENCDEC_SELECT_MAX_VOCAB
MAX_K = MAX_BEAMS = 32  # ENCDEC_BEAM_MAX_K, ENCDEC_BEAM_MAX_BEAMS


def _call(name: str, *args) -> None:
    lib = csrc.library()
    rc = getattr(lib.lib, name)(*args)
    if rc != 0:
        raise CudaKernelError(f"{name} failed with CUDA error {rc} ({lib.error_string(rc)}).")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


# ------------------------------------------------------------------------------------------------
# matrix-vector products
# ------------------------------------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def gemv_covers(x: torch.Tensor, w: torch.Tensor, *vectors) -> bool:
    """Whether gemv takes these operands: CUDA, one dtype, 1-16 rows, k % 8 == 0, 16-byte aligned rows."""
    if not (x.is_cuda and x.dtype in DTYPE_CODES and w.dtype == x.dtype and w.device == x.device and w.dim() == 2):
        return False
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if not (1 <= rows <= MAX_ROWS and K % 8 == 0 and w.shape[1] == K and w.is_contiguous() and _aligned(w)):
        return False
    x2 = x.reshape(rows, K)
    elems = 16 // x.element_size()
    if x2.stride(1) != 1 or not _aligned(x2) or (rows > 1 and x2.stride(0) % elems):
        return False
    return all(v is None or (v.dtype == x.dtype and v.device == x.device) for v in vectors)


def pick_split(n_out: int, k: int, dtype: torch.dtype, device) -> int:
    """Warps sharing one output tile along k: enough warps in flight for narrow outputs, while every
    warp keeps at least two steps of k (a step: 32 elements on tensor cores, 128 in fp32)."""
    from .kernels.common import sm_count

    tiles, step = (n_out, 128) if dtype == torch.float32 else (-(-n_out // 8), 32)
    steps = -(-k // step)
    target = 16 * sm_count(torch.device(device))
    split = 1
    while split < 8 and tiles * split < target and steps >= 4 * split:
        split *= 2
    return split


def gemv(x, w, bias, residual, epilogue: str) -> torch.Tensor:
    """epilogue(x @ w.T) for operands gemv_covers; y has x's leading dims and w.shape[0] columns."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)  # (rows, K)
    rows = x2.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    y2 = y.view(rows, N)
    r2 = None
    if residual is not None:
        r2 = residual.reshape(rows, N)  # (rows, N)
        if r2.stride(1) != 1:
            r2 = r2.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    _call("encdec_gemv", x2.data_ptr(), x2.stride(0), w.data_ptr(), _ptr(bias), _ptr(r2),
          r2.stride(0) if r2 is not None else 0, y2.data_ptr(), y2.stride(0), rows, N, K, DTYPE_CODES[x.dtype],
          EPILOGUES[epilogue], pick_split(N, K, x.dtype, x.device), _stream(x))
    return y


def linear(x, weight, bias, *, fallback):
    if not gemv_covers(x, weight, bias):
        return fallback(x, weight, bias)
    return gemv(x, weight, bias, None, "bias" if bias is not None else "none")


def linear_gelu(x, weight, bias, approximate, *, fallback):
    if approximate not in ("none", "tanh") or not gemv_covers(x, weight, bias):
        return fallback(x, weight, bias, approximate)
    return gemv(x, weight, bias, None, f"gelu_{approximate}")


def linear_residual(x, weight, bias, residual, *, fallback):
    shape = (*x.shape[:-1], weight.shape[0])
    if residual.shape != shape or not gemv_covers(x, weight, bias, residual):
        return fallback(x, weight, bias, residual)
    return gemv(x, weight, bias, residual, "residual")


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------
class ProcessorTables:
    """A fusable Pipeline as device tensors (each per-row scalar is one value, read with stride 0)."""

    def __init__(self, device, *, penalty=1.0, ngram=0, min_len=0, eos=(), words=()):
        dev = torch.device(device)
        self.penalty = torch.tensor([penalty], dtype=torch.float32, device=dev)
        self.ngram = torch.tensor([ngram], dtype=torch.int32, device=dev)
        self.min_len = torch.tensor([min_len], dtype=torch.int64, device=dev)
        self.eos = torch.tensor(list(eos) or [0], dtype=torch.int64, device=dev)
        self.n_eos = len(eos)
        offsets = [0]
        for w in words:
            offsets.append(offsets[-1] + len(w))
        self.bad_offsets = torch.tensor(offsets, dtype=torch.int32, device=dev)
        self.bad_tokens = torch.tensor([t for w in words for t in w] or [0], dtype=torch.int64, device=dev)
        self.n_bad = len(words)

    def params(self, ids: torch.Tensor, *, lens: torch.Tensor | None = None, unfinished: torch.Tensor | None = None,
               pad: int = 0) -> csrc.SelectParams:
        """ids (rows, t) int64 with unit column stride: each row's sequence; lens (rows,) or (1,) int64:
        per-row lengths on the device (default: t for every row); unfinished (rows,) bool, updated in place."""
        return csrc.SelectParams(
            ids=ids.data_ptr(), ids_stride=ids.stride(0),
            lens=_ptr(lens), lens_stride=(lens.stride(0) if lens.shape[0] > 1 else 0) if lens is not None else 0,
            len=ids.shape[1],
            penalty=self.penalty.data_ptr(), penalty_stride=0, ngram=self.ngram.data_ptr(), ngram_stride=0,
            min_len=self.min_len.data_ptr(), min_len_stride=0,
            eos=self.eos.data_ptr(), n_eos=self.n_eos,
            n_bad=self.n_bad, bad_offsets=self.bad_offsets.data_ptr(), bad_tokens=self.bad_tokens.data_ptr(),
            unfinished=_ptr(unfinished.view(torch.uint8)) if unfinished is not None else None, pad=pad)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> {device: tables or None}


def processor_tables(pipeline, device) -> ProcessorTables | None:
    """The pipeline's device tables (built once per pipeline and device), or None if it does not fuse."""
    per_device = _TABLES.setdefault(pipeline, {})
    key = str(torch.device(device))
    if key not in per_device:
        per_device[key] = _build_tables(pipeline, device)
    return per_device[key]


def _build_tables(pipeline, device) -> ProcessorTables | None:
    from .decode import select as sel

    kw: dict = {}
    lengths, eos_sets = [], []
    for step in pipeline.steps:
        if isinstance(step, sel.RepetitionPenalty) and "penalty" not in kw:
            kw["penalty"] = step.penalty
        elif isinstance(step, sel.NoRepeatNGram) and "ngram" not in kw:
            kw["ngram"] = step.n
        elif isinstance(step, sel.BadWords) and "words" not in kw:
            words = [[t] for t in torch.nonzero(step.single).flatten().tolist()]
            for prefixes, last in step.multi:
                words += [p + [t] for p, t in zip(prefixes.tolist(), last.tolist())]
            kw["words"] = words
        elif isinstance(step, sel.MinLength):
            lengths.append(step.length)
            eos_sets.append(tuple(torch.nonzero(step.eos_mask).flatten().tolist()))
        else:  # sampling warpers, or a processor twice: not fused
            return None
    if eos_sets:
        if len(set(eos_sets)) > 1:
            return None
        kw["min_len"], kw["eos"] = max(lengths), eos_sets[0]
    return ProcessorTables(device, **kw)


def _select_covers(scores: torch.Tensor, ids: torch.Tensor) -> bool:
    return (scores.is_cuda and scores.dim() == 2 and scores.dtype in DTYPE_CODES and scores.stride(1) == 1
            and 1 <= scores.shape[1] <= MAX_VOCAB and ids.dtype == torch.int64 and ids.device == scores.device
            and ids.dim() == 2 and ids.shape[0] == scores.shape[0] and (ids.shape[1] <= 1 or ids.stride(1) == 1))


def select_greedy(scores, ids, procs, *, fallback):
    """argmax over the processed scores, as fallback (= procs then torch.argmax) computes it."""
    tables = processor_tables(procs, scores.device) if _select_covers(scores, ids) else None
    if tables is None:
        return fallback(scores, ids, procs)
    N, V = scores.shape
    out = torch.empty(N, dtype=torch.int64, device=scores.device)
    params = tables.params(ids)
    _call("encdec_select_greedy", scores.data_ptr(), scores.stride(0), N, V, DTYPE_CODES[scores.dtype],
          params, out.data_ptr(), _stream(scores))
    return out


def select_beam(logits, ids, procs, running_scores, k, *, fallback):
    """top k over beams x vocab of processed log-probabilities + running beam scores, per request."""
    B, nb = running_scores.shape
    ok = (_select_covers(logits, ids) and running_scores.dtype == torch.float32 and running_scores.is_contiguous()
          and running_scores.device == logits.device and logits.shape[0] == B * nb and nb <= MAX_BEAMS
          and 1 <= k <= MAX_K and nb * logits.shape[1] >= k)
    tables = processor_tables(procs, logits.device) if ok else None
    if tables is None:
        return fallback(logits, ids, procs, running_scores, k)
    V = logits.shape[1]
    dev = logits.device
    cand_scores = torch.empty(B * nb, k, dtype=torch.float32, device=dev)
    cand_index = torch.empty(B * nb, k, dtype=torch.int32, device=dev)
    top = torch.empty(B, k, dtype=torch.float32, device=dev)
    index = torch.empty(B, k, dtype=torch.int64, device=dev)
    _call("encdec_select_beam", logits.data_ptr(), logits.stride(0), B, nb, V, DTYPE_CODES[logits.dtype],
          tables.params(ids), running_scores.data_ptr(), k, cand_scores.data_ptr(), cand_index.data_ptr(),
          top.data_ptr(), index.data_ptr(), _stream(logits))
    return top, index


def bind(name: str, fallback):
    """The csrc version of op `name`, falling back to `fallback` (the table's own op) where it does not apply."""
    return functools.partial(globals()[name], fallback=fallback)
