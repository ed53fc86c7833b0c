"""The op table: every numeric op the model net uses, per backend.

Model code calls ``self.ops.<name>(...)`` on the table it was built with and never branches on the
backend. The plain-PyTorch versions below are the reference the Triton kernels are tested against.

Shape conventions (B batch, L length, H heads, D head dim, N decode rows):
  attention        q [B, Lq, H, D], k/v [B, Lk, H, D] (any strides, unit stride on D) -> [B, Lq, H, D]
  varlen_attention q/k/v [T, H, D] packed, cu_seqlens int32 [B+1] (row b = tokens cu[b]:cu[b+1]) -> [T, H, D]
  decode_attention q [N, H, D], k/v [Bk, Lmax, H, D], seq_lens int32 [N] -> [N, H, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")


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


def varlen_attention(q, k, v, *, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, causal: bool = False):
    """Self-attention within each of B packed sequences: q, k, v [T, H, D], sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b+1] (int32 [B+1]); max_seqlen is the kernel's grid size (unused here).
    Equal lengths run as one padded-free batch through ``attention``; otherwise one SDPA per
    sequence, unmasked (on the CPU that is PyTorch's flash kernel, and no padded token is computed)."""
    bounds = cu_seqlens.tolist()
    lens = [e - s for s, e in zip(bounds, bounds[1:])]
    if not lens or q.shape[0] == 0:
        return torch.empty_like(q)
    if min(lens) == max(lens):  # (T, H, D) -> (B, L, H, D): a view, no copy
        B, L = len(lens), lens[0]
        return attention(*(t.unflatten(0, (B, L)) for t in (q, k, v)), scale=scale, causal=causal).flatten(0, 1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for s, e in zip(bounds, bounds[1:]):
        if e > s:  # 4-D views: with 3-D inputs SDPA takes its slow math path on the CPU
            qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, L, D)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)  # (1, H, L, D)
            out[s:e] = o[0].transpose(0, 1)
    return out


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
# the switch
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpTable:
    """The ops of one backend; model code calls ``ops.<name>(...)`` and never asks which backend it is."""

    name: str
    layer_norm: Callable
    add_layer_norm: Callable
    bias_gelu: Callable
    linear: Callable
    attention: Callable
    varlen_attention: Callable
    decode_attention: Callable


_TORCH = OpTable(
    name="torch",
    layer_norm=layer_norm,
    add_layer_norm=add_layer_norm,
    bias_gelu=bias_gelu,
    linear=linear,
    attention=attention,
    varlen_attention=varlen_attention,
    decode_attention=decode_attention,
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

        return OpTable(
            name="triton",
            layer_norm=kln.layer_norm,
            add_layer_norm=kln.add_layer_norm,
            bias_gelu=kact.bias_gelu,
            linear=linear,  # cuBLAS; bias fused into neighbours where it pays
            attention=katt.attention,
            varlen_attention=katt.varlen_attention,
            decode_attention=kdec.decode_attention,
        )
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
