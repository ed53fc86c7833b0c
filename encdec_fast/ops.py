"""The op table: every numeric op the model net uses, per backend.

Model code calls ``self.ops.<name>(...)`` on the table it was built with and never branches on the
backend. The plain-PyTorch versions below are the reference the Triton kernels are tested against.

Shape conventions (B batch, L length, H heads, D head dim, N decode rows, V vocabulary):
  attention        q [B, Lq, H, D], k/v [B, Lk, H, D] (any strides, unit stride on D) -> [B, Lq, H, D]
  decode_attention q [N, H, D], k/v [Bk, Lmax, H, D], seq_lens int32 [N] -> [N, H, D]
  select_greedy    scores [N, V], ids [N, t] -> tokens long [N]
  select_beam      logits [B*nb, V], ids [B*nb, t], running scores [B, nb] -> (scores, indices) [B, k]

The triton table can take ops from the CUDA C++ kernels of csrc/ (csrc.py, csrc_ops.py): those listed
in CSRC_FASTER, or all of them with ENCDEC_CUDA=1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")

# The ops for which the csrc/ CUDA kernel was measured faster than the triton table's own op, on a GPU
# (benchmarks/bench_kernels.py rows and W1 in benchmarks/gpu_report.py, ENCDEC_CUDA=1 vs 0). Empty
# until measured: no GPU has run them yet (issue 10), so ENCDEC_CUDA=auto switches nothing on.
CSRC_FASTER: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------
# normalisation and activations
# --------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    """s = x + residual; returns (layer_norm(s), s). BERT's post-LN uses the first, GPT-2's pre-LN both."""
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """gelu(x + bias); approximate is "none" (erf form, BERT) or "tanh" (GPT-2's gelu_new)."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, weight [out, in] (nn.Linear layout)."""
    return F.linear(x, weight, bias)


def linear_gelu(x, weight, bias, approximate: str, *, gelu: Callable = bias_gelu) -> torch.Tensor:
    """gelu(x @ weight.T + bias): the MLP's first projection. The product is rounded to x's dtype before
    the bias is added (as a matmul without bias followed by the bias_gelu op rounds it)."""
    return gelu(linear(x, weight, None), bias, approximate)


def linear_residual(x, weight, bias, residual) -> torch.Tensor:
    """x @ weight.T + bias + residual (the linear's output rounded to x's dtype before the add)."""
    return linear(x, weight, bias) + residual


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def attention(q, k, v, *, scale: float, causal: bool = False, key_mask: torch.Tensor | None = None):
    """Softmax attention. key_mask bool [B, Lk], True = attend. causal: query i sees keys
    j <= i + (Lk - Lq) (bottom-right aligned, so prefill with Lq == Lk is plain causal).
    A query row with no visible key returns zeros."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    mask = None
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        mask = (j <= i + (Lk - Lq))[None, None]  # (1, 1, Lq, Lk)
    if key_mask is not None:
        km = key_mask[:, None, None, :].bool()  # (B, 1, 1, Lk)
        mask = km if mask is None else (mask & km)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    if mask is not None:  # a row with no visible key gives zeros (SDPA may give NaN there)
        empty = ~mask.any(dim=-1, keepdim=True)  # (B or 1, 1, Lq, 1)
        out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous()  # (B, Lq, H, D)


def decode_attention(q, k, v, *, scale: float, seq_lens: torch.Tensor, kv_index=None, key_mask=None):
    """Attention of one query token per row over a cache.

    q [N, H, D]; k, v [Bk, Lmax, H, D]; seq_lens int [N]: keys 0..seq_lens[n]-1 are visible to row n;
    kv_index int [N] or None: which k/v row serves query row n (None: row n itself, Bk == N);
    key_mask bool [Bk, Lmax] or None: further masks keys (encoder padding)."""
    N, H, D = q.shape
    Lmax = k.shape[1]
    if kv_index is not None:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        if key_mask is not None:
            key_mask = key_mask.index_select(0, kv_index)
    visible = torch.arange(Lmax, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # (N, Lmax)
    if key_mask is not None:
        visible = visible & key_mask.bool()
    # SDPA on (N, H, 1|Lmax, D) views of the cache layout (no permute copies); fp32 math
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float().transpose(1, 2), v.float().transpose(1, 2),
                                         attn_mask=visible[:, None, None, :], scale=scale)  # (N, H, 1, D)
    return out.squeeze(2).nan_to_num(0.0).to(q.dtype)  # a row with no visible key -> zeros


# --------------------------------------------------------------------------------------------
# token selection (decode/search.py; the processors are decode/select.py's Pipeline)
# --------------------------------------------------------------------------------------------
def select_greedy(scores: torch.Tensor, ids: torch.Tensor, procs) -> torch.Tensor:
    """Greedy choice: argmax of procs(ids, scores) per row (first index among equal maxima)."""
    return torch.argmax(procs(ids, scores), dim=-1)


def select_beam(logits: torch.Tensor, ids: torch.Tensor, procs, running_scores: torch.Tensor, k: int):
    """One beam-search step's candidates per request: the top k of procs(ids, log_softmax(logits)) +
    running_scores over beams x vocabulary, indices beam * V + token (torch.topk)."""
    B, nb = running_scores.shape
    log_probs = procs(ids, F.log_softmax(logits, dim=-1))  # (B*nb, V)
    V = log_probs.shape[-1]
    acc = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
    return torch.topk(acc, k=k)


# --------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpTable:
    """The ops of one backend; model code calls ``ops.<name>(...)`` and never asks which backend it is."""

    name: str
    layer_norm: Callable
    add_layer_norm: Callable
    bias_gelu: Callable
    linear: Callable
    linear_gelu: Callable
    linear_residual: Callable
    attention: Callable
    decode_attention: Callable
    select_greedy: Callable
    select_beam: Callable


_TORCH = OpTable(
    name="torch",
    layer_norm=layer_norm,
    add_layer_norm=add_layer_norm,
    bias_gelu=bias_gelu,
    linear=linear,
    linear_gelu=linear_gelu,
    linear_residual=linear_residual,
    attention=attention,
    decode_attention=decode_attention,
    select_greedy=select_greedy,
    select_beam=select_beam,
)


def table(backend: str) -> OpTable:
    """The op table for a backend name ("torch" or "triton")."""
    if backend == "torch":
        return _TORCH
    if backend == "triton":
        # encdec_fast.kernels is the top-level kernels/ folder, mapped by setup.py
        from .kernels import activation as kact
        from .kernels import attention as katt
        from .kernels import decode_attention as kdec
        from .kernels import layer_norm as kln

        return with_csrc(OpTable(
            name="triton",
            layer_norm=kln.layer_norm,
            add_layer_norm=kln.add_layer_norm,
            bias_gelu=kact.bias_gelu,
            linear=linear,  # cuBLAS; bias fused into neighbours where it pays
            linear_gelu=functools.partial(linear_gelu, gelu=kact.bias_gelu),
            linear_residual=linear_residual,
            attention=katt.attention,
            decode_attention=kdec.decode_attention,
            select_greedy=select_greedy,
            select_beam=select_beam,
        ))
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def with_csrc(t: OpTable) -> OpTable:
    """t with the ops that ENCDEC_CUDA and CSRC_FASTER give to the csrc kernels (each falls back to t's op
    where the kernel does not apply)."""
    from . import csrc

    names = csrc.enabled_ops(CSRC_FASTER)
    if not names:
        return t
    from . import csrc_ops

    return dataclasses.replace(t, **{n: csrc_ops.bind(n, getattr(t, n)) for n in names})
