"""The op table: every numeric op the model net uses, per backend.

Model code calls ``self.ops.<name>(...)`` on the table it was built with and never branches on the
backend. The plain-PyTorch versions below are the reference every other table is tested against: the
Triton kernels (kernels/), and the oneDNN calls on prepacked CPU weights (prepack.py's table). The
decode-only ops (token choice, a step's bookkeeping) have their own table, decode/ops.py.

Shape conventions (B batch, L length, H heads, D head dim, N decode rows, V vocabulary):
  attention        q [B, Lq, H, D], k/v [B, Lk, H, D] (any strides, unit stride on D) -> [B, Lq, H, D]
  varlen_attention q/k/v [T, H, D] packed, cu_seqlens int32 [B+1] (row b = tokens cu[b]:cu[b+1]) -> [T, H, D]
  decode_attention q [N, H, D], k/v [T, H, D] key rows, starts/lens int [N] (row n's window) -> [N, H, D]
  window_plan      starts/lens int [N], key rows T -> WindowPlan (the windows read once a step, CPU) or None
  fused_linear     x [M, K], weight [N, K] (nn.Linear layout) -> [M, N], LayerNorm/GELU/residual fused
  embed_step       seq [N, Lc], t [N] (row n feeds seq[n, t[n] - 1] at position t[n] - 1), the tables
                   -> (x [N, E], seq_lens int32 [N] = t, self_starts long [N] = n * row_stride)
"""

from __future__ import annotations

import dataclasses
import functools
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


def linear_gelu(x, weight, bias, approximate: str, *, gelu: Callable = bias_gelu) -> torch.Tensor:
    """gelu(x @ weight.T + bias): the MLP's first projection. The product is rounded to x's dtype before
    the bias is added (as a matmul without bias followed by bias_gelu rounds it); gelu: the bias + GELU
    op (the triton table's kernel)."""
    return gelu(F.linear(x, weight, None), bias, approximate)


def fused_linear_inputs(x, residual, x_ln, residual_ln):
    """fused_linear's prologues: (LN_x?(x), LN_r?(residual)), shared with the tables that replace the product."""
    if x_ln is not None:
        x = F.layer_norm(x, (x.shape[-1],), x_ln[0], x_ln[1], x_ln[2])
    if residual is not None and residual_ln is not None:
        residual = F.layer_norm(residual, (residual.shape[-1],), residual_ln[0], residual_ln[1], residual_ln[2])
    return x, residual


def fused_linear(x, weight, bias=None, *, x_ln=None, gelu=None, residual=None, residual_ln=None):
    """gelu?(LN_x?(x) @ weight.T + bias) + LN_r?(residual): a decode-step projection with its
    neighbours. x [..., K]; weight [N, K]; bias [N] or None; x_ln, residual_ln: (weight, bias, eps) of
    a LayerNorm over K / N or None; gelu: None, "none" (erf form) or "tanh"; residual [..., N] or None.
    GPT-2 (pre-LN) uses x_ln (+ gelu) and residual; BERT (post-LN) also residual_ln, the residual of a
    sublayer being the LayerNorm of the previous sum."""
    if gelu not in (None, "none", "tanh"):
        raise ValueError(f"fused_linear: gelu must be None, 'none' or 'tanh', got {gelu!r}")
    x, residual = fused_linear_inputs(x, residual, x_ln, residual_ln)
    y = F.linear(x, weight, bias)
    if gelu is not None:
        y = F.gelu(y, approximate=gelu)
    return y + residual if residual is not None else y


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


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """decode_attention's key windows as the host knows them: read once per decode step (window_plan) and
    shared by every layer's call, instead of each call reading lens and starts again. CPU only (on CUDA
    reading them would sync, and is impossible during CUDA-graph capture)."""

    width: int  # W: keys in the longest window, within the key rows
    full: bool  # every row sees W keys (no mask needed)
    step: int | None  # the windows lie `step` key rows apart from `first` (a strided view of k), else None
    first: int
    groups: tuple  # step None: ((start, length, rows), ...), rows a slice or an index tensor of the rows
    # that share the window (the beams of a request); () otherwise
    slots: torch.Tensor  # long (N,): starts + lens - 1, where a call's k_new / v_new go
    windows: tuple  # (starts, lens) as contiguous long tensors, lens cut to the key rows (a kernel's arguments)


def window_plan(starts: torch.Tensor, lens: torch.Tensor, keys: int) -> WindowPlan | None:
    """The WindowPlan of windows k[starts[n] : starts[n] + lens[n]] over `keys` key rows, or None off the CPU."""
    if starts.device.type != "cpu":
        return None
    s, ln = starts.tolist(), lens.tolist()
    starts64 = starts.long().contiguous()
    slots = starts64 + lens.long() - 1
    windows = (starts64, torch.minimum(lens.long(), keys - starts64).clamp_(min=0))
    W = max(0, min(max(ln, default=0), keys))
    full = bool(ln) and min(ln) == W
    step = s[1] - s[0] if len(s) > 1 else 0
    if s and step >= 0 and s[0] >= 0 and s[-1] + W <= keys and all(b - a == step for a, b in zip(s, s[1:])):
        return WindowPlan(W, full, step, s[0], (), slots, windows)
    groups: dict[tuple[int, int], list[int]] = {}
    for n, (a, b) in enumerate(zip(s, ln)):
        groups.setdefault((a, b), []).append(n)
    rows = tuple((a, b, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else torch.tensor(r))
                 for (a, b), r in groups.items())
    return WindowPlan(W, full, None, 0, rows, slots, windows)


def decode_attention(q, k, v, *, scale: float, starts: torch.Tensor, lens: torch.Tensor, key_mask=None,
                     k_new=None, v_new=None, max_len: int | None = None, plan: WindowPlan | None = None):
    """Attention of one query token per row over a window of key rows (packed layout).

    q [N, H, D]; k, v [T, H, D]; starts, lens int [N]: row n attends k[starts[n] : starts[n] + lens[n]];
    key_mask bool [T] or None: keys with False are excluded; a row with no visible key gets zeros.
    k_new, v_new [N, H, D] or None: first written in place at k/v[starts + lens - 1] (every lens >= 1,
    slots distinct), so the new key takes part. max_len: an upper bound on lens known from shapes (the
    cache length, the encoder length); the key window is sized with it on CUDA, where reading lens on
    the host would sync (and is impossible during CUDA-graph capture). plan: window_plan(starts, lens, T),
    computed once for the layers that share the windows (CPU); without it, it is computed here (CPU), or
    on CUDA the windows are sized by max_len (lens.max() is read without it)."""
    N, H, D = q.shape
    T = k.shape[0]
    if plan is None:
        plan = window_plan(starts, lens, T)
    if k_new is not None:
        slot = plan.slots if plan is not None else starts.long() + lens.long() - 1  # (N,)
        k.index_copy_(0, slot, k_new.to(k.dtype))
        v.index_copy_(0, slot, v_new.to(v.dtype))
    W = plan.width if plan is not None else _window_len(lens, max_len, T)
    if N == 0 or W == 0:
        return torch.zeros_like(q)
    kw = vw = None
    if plan is not None and plan.step is not None:  # each (N, W, H, D), a strided view: no copy
        kw, vw = _window_view(k, plan, N), _window_view(v, plan, N)
    if key_mask is None and plan is not None:
        if kw is None:
            return _decode_attention_by_window(q, k, v, plan, scale)
        if plan.full:  # every row sees its whole window (rows of one length, or one row): no mask
            return F.scaled_dot_product_attention(q.float().unsqueeze(2), kw.float().transpose(1, 2),
                                                  vw.float().transpose(1, 2), scale=scale).squeeze(2).to(q.dtype)
    j = torch.arange(W, device=q.device)
    visible = j[None, :] < lens[:, None]  # (N, W)
    if kw is None or key_mask is not None:
        idx = (starts.long()[:, None] + j[None, :]).clamp_(0, T - 1)  # (N, W) key rows of each window
        if kw is None:
            kw, vw = k[idx], v[idx]
        if key_mask is not None:
            visible = visible & key_mask.bool()[idx]
    # SDPA on (N, H, 1|W, D) views; fp32 math
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), kw.float().transpose(1, 2),
                                         vw.float().transpose(1, 2), attn_mask=visible[:, None, None, :],
                                         scale=scale)  # (N, H, 1, D)
    return out.squeeze(2).nan_to_num(0.0).to(q.dtype)  # a row with no visible key -> zeros


def _decode_attention_by_window(q, k, v, plan: WindowPlan, scale: float):
    """decode_attention over windows that are not evenly spaced (a packed cross-attention arena: each request
    its own span), on the CPU where the plan holds them: the rows sharing one window (the beams of a request)
    are one SDPA over a view of its keys, so no key is copied (gathering every row's window copied
    N x W x H x D keys per layer, most of a beam-search step's time at batch 8)."""
    T = k.shape[0]
    out = torch.zeros_like(q)
    for s, ln, rows in plan.groups:
        ln = min(ln, T - s)
        if ln <= 0:  # no visible key: zeros
            continue
        qg, kg, vg = (x.float().transpose(0, 1).unsqueeze(0) for x in (q[rows], k[s:s + ln], v[s:s + ln]))  # (1, H, *, D)
        out[rows] = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)[0].transpose(0, 1).to(q.dtype)
    return out


def _window_len(lens: torch.Tensor, max_len: int | None, T: int) -> int:
    """Keys per window off the CPU: the bound max_len known from shapes (lens.max() without it, outside capture)."""
    if lens.numel() == 0:
        return 0
    if max_len is None:
        if lens.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("decode_attention: pass max_len (a bound on lens from shapes) when capturing "
                             "a CUDA graph with the torch backend; lens cannot be read on the host then")
        return max(0, min(int(lens.max()), T))
    return min(int(max_len), T)


def _window_view(k: torch.Tensor, plan: WindowPlan, N: int) -> torch.Tensor:
    """The windows k[first + n * step : + W] as a strided (N, W, H, D) view (no copy)."""
    st = k.stride()
    return k.as_strided((N, plan.width, *k.shape[1:]), (plan.step * st[0], *st), k.storage_offset() + plan.first * st[0])


# --------------------------------------------------------------------------------------------
# a decode step's embeddings (modules.Embeddings.step)
# --------------------------------------------------------------------------------------------
def embed_step(seq, t, word, position, type0, *, scale: float, offset: int, pad_id: int, skip_pad: bool, ln,
               row_stride: int):
    """The embeddings of the token each row feeds in a decode step, as Embeddings.forward computes them for
    one token (word x scale + token type 0 + position, then the LayerNorm), and the step's attention
    bookkeeping: row n feeds seq[n, t[n] - 1] at position t[n] - 1 (table row: + offset; with skip_pad a
    pad token takes row pad_id). seq long [N, Lc], t long [N]; word [V, E], position [P, E], type0 [E] or
    None; ln (weight, bias, eps) or None. -> (x [N, E], seq_lens int32 [N] = t (the keys each row attends,
    the new one included), self_starts long [N] = n * row_stride (row n's first key in a layer's cache))."""
    pos = t - 1
    tok = seq.gather(1, pos[:, None]).squeeze(1)
    p = torch.where(tok != pad_id, pos + offset, pad_id) if skip_pad else pos + offset
    x = word[tok]
    if scale != 1.0:
        x = x * scale
    if type0 is not None:
        x = x + type0
    x = x + position[p]
    if ln is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], ln[2])
    N = t.shape[0]
    return x, t.to(torch.int32), torch.arange(0, N * row_stride, row_stride, device=t.device)


# --------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpTable:
    """The ops of one backend; model code calls ``ops.<name>(...)`` and never asks which backend it is."""

    name: str
    layer_norm: Callable
    add_layer_norm: Callable
    linear: Callable
    linear_gelu: Callable
    fused_linear: Callable
    attention: Callable
    varlen_attention: Callable
    decode_attention: Callable
    window_plan: Callable
    embed_step: Callable
    # the decoder's layers and LM head of a step in one call, or None: decoder_step(decoder, x, self_starts, seq_lens,
    # cache, cross_kv, cross_starts, enc_lens) -> logits, or None where it does not apply (cpu/step.py)
    decoder_step: Callable | None = None


TORCH = OpTable(
    name="torch",
    layer_norm=layer_norm,
    add_layer_norm=add_layer_norm,
    linear=linear,
    linear_gelu=linear_gelu,
    fused_linear=fused_linear,
    attention=attention,
    varlen_attention=varlen_attention,
    decode_attention=decode_attention,
    window_plan=window_plan,
    embed_step=embed_step,
)


def _without_plan(decode_attention: Callable) -> Callable:
    """A decode_attention that sizes its windows on the device: the plan argument (None there) is dropped."""
    def call(q, k, v, *, plan=None, **kw):
        return decode_attention(q, k, v, **kw)
    return call


def table(backend: str) -> OpTable:
    """The op table for a backend name ("torch" or "triton")."""
    if backend == "torch":
        return TORCH
    if backend == "triton":
        from .kernels import activation as kact
        from .kernels import attention as katt
        from .kernels import decode_attention as kdec
        from .kernels import embed as kembed
        from .kernels import layer_norm as kln
        from .kernels import linear as klin

        def triton_fused_linear(x, weight, bias=None, **kw):
            """The Triton GEMV for decode-sized inputs (<= klin.MAX_ROWS rows), cuBLAS beyond."""
            rows = x.numel() // max(1, x.shape[-1])
            if rows > klin.MAX_ROWS or x.shape[-1] == 0:
                return fused_linear(x, weight, bias, **kw)
            r = kw.get("residual")
            if r is not None:
                kw = kw | {"residual": r.reshape(rows, r.shape[-1])}
            y = klin.fused_linear(x.reshape(rows, x.shape[-1]), weight, bias, **kw)
            return y.view(*x.shape[:-1], weight.shape[0])

        return OpTable(
            name="triton",
            layer_norm=kln.layer_norm,
            add_layer_norm=kln.add_layer_norm,
            linear=linear,  # cuBLAS; bias fused into neighbours where it pays
            linear_gelu=functools.partial(linear_gelu, gelu=kact.bias_gelu),
            fused_linear=triton_fused_linear,
            attention=katt.attention,
            varlen_attention=katt.varlen_attention,
            decode_attention=_without_plan(kdec.decode_attention),
            window_plan=lambda starts, lens, keys: None,  # the kernel reads lens on the device
            embed_step=kembed.embed_step,
        )
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
