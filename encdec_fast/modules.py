"""The encoder and decoder nets, written against the op table (never against a backend).

Weights are buffers laid out for the fast path: fused QKV (BERT's query/key/value concatenated,
GPT-2's Conv1D c_attn transposed to nn.Linear's [out, in]), cross-attention K/V fused. weight_map.py
maps Hugging Face names onto these. The families differ only in StackConfig's options (embeddings,
position rows, pre- or post-LN layers, head), never in a branch on the family's name here.

Two decoder paths share the layer code:
  full(ids [B, L])        -> hidden [B, L, E]   (forward pass, no cache)
  step(ids [N], pos, ...) -> hidden [N, E]      (one token per row over the preallocated cache)
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig, StackConfig


def _buf(*shape):
    return torch.empty(*shape)


class Linear(nn.Module):
    def __init__(self, in_f: int, out_f: int, bias: bool = True):
        super().__init__()
        self.register_buffer("weight", _buf(out_f, in_f))  # [out, in]
        self.register_buffer("bias", _buf(out_f) if bias else None)

    def forward(self, x, ops):
        return ops.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", _buf(n))
        self.register_buffer("bias", _buf(n))

    def forward(self, x, ops):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add(self, x, residual, ops):
        """(LayerNorm(x + residual), x + residual)"""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class MLP(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.gelu = cfg.gelu

    def forward(self, x, ops):
        h = ops.linear_gelu(x, self.fc1.weight, self.fc1.bias, self.gelu)
        return self.fc2(h, ops)


class Embeddings(nn.Module):
    """Word (x embed_scale) + token type + position embeddings, then LayerNorm (all but GPT-2), then a
    projection to the hidden size (ELECTRA with narrower embeddings): transformers' order of additions."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.embed_dim
        self.register_buffer("word", _buf(cfg.vocab_size, E))
        self.register_buffer("position", _buf(cfg.max_positions, E))
        if cfg.type_vocab_size:
            self.register_buffer("token_type", _buf(cfg.type_vocab_size, E))
        if cfg.embed_ln:
            self.ln = LayerNorm(E, cfg.layer_norm_eps)
        if cfg.embedding_size:
            self.proj = Linear(E, cfg.hidden_size)

    def positions(self, ids: torch.Tensor, start) -> torch.Tensor:
        """Rows of the position table, as transformers computes them; start is the number of tokens
        before ids[:, 0]. ids (B, L) -> (B, L)."""
        cfg = self.cfg
        if cfg.positions_skip_pad:
            keep = (ids != cfg.pad_token_id).long()
            return (torch.cumsum(keep, dim=1) + start) * keep + cfg.pad_token_id
        L = ids.shape[1]
        return (torch.arange(L, device=ids.device) + (start + cfg.position_offset)).expand(ids.shape[0], L)

    def step_positions(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """positions() for one token per row: ids (N,), pos (N,) tokens already before it -> (N,)."""
        cfg = self.cfg
        if cfg.positions_skip_pad:
            return torch.where(ids != cfg.pad_token_id, pos + cfg.position_offset, cfg.pad_token_id)
        return pos + cfg.position_offset

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, ops, types: torch.Tensor | None = None):
        """ids, pos (and types, token type ids; None: type 0) (B, L) -> (B, L, hidden)."""
        x = self.word[ids]
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if self.cfg.type_vocab_size:
            x = x + (self.token_type[types] if types is not None else self.token_type[0])
        x = x + self.position[pos]
        if self.cfg.embed_ln:
            x = self.ln(x, ops)
        if self.cfg.embedding_size:
            x = self.proj(x, ops)
        return x


def _heads(t: torch.Tensor, parts: int, H: int):
    """[..., parts*H*D] -> `parts` views of [..., H, D] (no copy)."""
    t = t.unflatten(-1, (parts, H, -1))
    return [t[..., i, :, :] for i in range(parts)]


def _key_rows(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L, H, D) K or V -> ((T, H, D) key-row view of the same memory, row stride r in keys):
    row b's key j is key b*r + j, the packed layout of decode_attention (no copy; a cut of a longer
    cache keeps its row stride r > L). Raises if the rows are not a whole number of keys apart."""
    B, L, H, D = kv.shape
    sb, sl, sh, sd = kv.stride()
    if L == 1:  # one key per row: the rows are the keys (a size-1 dim's stride says nothing)
        return kv.as_strided((B, H, D), (sb, sh, sd)), 1
    r = sb // sl if B > 1 else L
    if B > 1 and r * sl != sb:
        raise ValueError(f"decode step: K/V strides {kv.stride()} do not place rows a whole number of keys apart")
    T = (B - 1) * r + L if B else 0
    return kv.as_strided((T, H, D), (sl, sh, sd)), r


class SelfAttention(nn.Module):
    def __init__(self, cfg: StackConfig, layer: int):
        super().__init__()
        self.H = cfg.num_heads
        self.scale = cfg.attn_scale(layer)
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o = Linear(cfg.hidden_size, cfg.hidden_size)

    def full(self, x, ops, *, causal: bool, key_mask):
        q, k, v = _heads(self.qkv(x, ops), 3, self.H)  # each (B, L, H, D)
        a = ops.attention(q, k, v, scale=self.scale, causal=causal, key_mask=key_mask)
        return self.o(a.flatten(-2), ops)

    def step(self, x, ops, *, k_cache, v_cache, pos, seq_lens):
        """x (N, E); row n's K/V are written at slot pos[n] = seq_lens[n] - 1 of the (N, Lmax, H, D)
        caches by the attention kernel itself (k_new/v_new)."""
        q, k, v = _heads(self.qkv(x, ops), 3, self.H)  # each (N, H, D)
        (kf, r), (vf, _) = _key_rows(k_cache), _key_rows(v_cache)  # (N*r, H, D) key rows
        starts = torch.arange(0, x.shape[0] * r, r, device=x.device)  # row n's cache starts at key n*r
        a = ops.decode_attention(q, kf, vf, scale=self.scale, starts=starts, lens=seq_lens, k_new=k, v_new=v,
                                 max_len=k_cache.shape[1])
        return self.o(a.flatten(-2), ops)


class CrossAttention(nn.Module):
    def __init__(self, cfg: StackConfig, layer: int):
        super().__init__()
        self.H = cfg.num_heads
        self.scale = cfg.attn_scale(layer)
        self.q = Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.o = Linear(cfg.hidden_size, cfg.hidden_size)

    def project_kv(self, enc, ops):
        """enc (B, S, E) -> K, V each (B, S, H, D): computed once per request, reused every step."""
        return _heads(self.kv(enc, ops), 2, self.H)

    def full(self, x, ops, *, kv, enc_mask):
        q = self.q(x, ops).unflatten(-1, (self.H, -1))
        a = ops.attention(q, kv[0], kv[1], scale=self.scale, causal=False, key_mask=enc_mask)
        return self.o(a.flatten(-2), ops)

    def step(self, x, ops, *, kv, enc_mask, kv_index, enc_lens):
        """x (N, E); kv: K, V (B, S, H, D); row n reads encoder row kv_index[n] (None: row n), its first
        enc_lens[n] keys, minus enc_mask (B, S) False (None: all)."""
        q = self.q(x, ops).unflatten(-1, (self.H, -1))  # (N, H, D)
        (kf, r), (vf, _) = _key_rows(kv[0]), _key_rows(kv[1])  # (B*r, H, D) key rows
        S = kv[0].shape[1]
        if kv_index is None:
            starts = torch.arange(0, x.shape[0] * r, r, device=x.device)
        else:
            starts = kv_index * r
        key_mask = None
        if enc_mask is not None:  # (B, S) -> (B*r,) flat, like the key rows
            key_mask = (enc_mask if r == S else torch.nn.functional.pad(enc_mask, (0, r - S))).reshape(-1)
            key_mask = key_mask[:kf.shape[0]]
        a = ops.decode_attention(q, kf, vf, scale=self.scale, starts=starts, lens=enc_lens, key_mask=key_mask,
                                 max_len=S)
        return self.o(a.flatten(-2), ops)


# ------------------------------------------------------------------------------------------------
# post-LN layers: BERT, RoBERTa, bert-generation, ELECTRA, and BART's decoder layer
# ------------------------------------------------------------------------------------------------
class BertLayer(nn.Module):
    def __init__(self, cfg: StackConfig, layer: int):
        super().__init__()
        self.attn = SelfAttention(cfg, layer)
        self.ln1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        if cfg.cross_attention:
            self.cross = CrossAttention(cfg, layer)
            self.ln_cross = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.ln2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def full(self, x, ops, *, causal, key_mask, cross_kv=None, enc_mask=None):
        x = self.ln1.add(self.attn.full(x, ops, causal=causal, key_mask=key_mask), x, ops)[0]
        if cross_kv is not None:
            x = self.ln_cross.add(self.cross.full(x, ops, kv=cross_kv, enc_mask=enc_mask), x, ops)[0]
        return self.ln2.add(self.mlp(x, ops), x, ops)[0]

    def step(self, x, ops, *, k_cache, v_cache, pos, seq_lens, cross_kv, enc_mask, kv_index, enc_lens):
        x = self.ln1.add(self.attn.step(x, ops, k_cache=k_cache, v_cache=v_cache, pos=pos, seq_lens=seq_lens), x, ops)[0]
        c = self.cross.step(x, ops, kv=cross_kv, enc_mask=enc_mask, kv_index=kv_index, enc_lens=enc_lens)
        x = self.ln_cross.add(c, x, ops)[0]
        return self.ln2.add(self.mlp(x, ops), x, ops)[0]


class Encoder(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg, i) for i in range(cfg.num_layers))

    def forward(self, ids, key_mask, ops, types=None):
        """ids (B, S); key_mask bool (B, S) or None; types: token type ids (B, S) or None -> hidden (B, S, E)"""
        x = self.embed(ids, self.embed.positions(ids, 0), ops, types)
        for layer in self.layers:
            x = layer.full(x, ops, causal=False, key_mask=key_mask)
        return x


# ------------------------------------------------------------------------------------------------
# GPT-2 block (pre-LN); the LayerNorm that follows each residual add is fused with it
# ------------------------------------------------------------------------------------------------
class GPT2Block(nn.Module):
    def __init__(self, cfg: StackConfig, layer: int):
        super().__init__()
        self.ln1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg, layer)
        self.ln_cross = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.cross = CrossAttention(cfg, layer)
        self.ln2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    # x is the residual stream, n = ln1(x) already computed by the caller (fused with the previous add)
    def full(self, x, n, ops, *, causal, key_mask, cross_kv, enc_mask):
        n, x = self.ln_cross.add(self.attn.full(n, ops, causal=causal, key_mask=key_mask), x, ops)
        n, x = self.ln2.add(self.cross.full(n, ops, kv=cross_kv, enc_mask=enc_mask), x, ops)
        return self.mlp(n, ops), x  # caller adds (fused with the next LayerNorm)

    def step(self, x, n, ops, *, k_cache, v_cache, pos, seq_lens, cross_kv, enc_mask, kv_index, enc_lens):
        a = self.attn.step(n, ops, k_cache=k_cache, v_cache=v_cache, pos=pos, seq_lens=seq_lens)
        n, x = self.ln_cross.add(a, x, ops)
        c = self.cross.step(n, ops, kv=cross_kv, enc_mask=enc_mask, kv_index=kv_index, enc_lens=enc_lens)
        n, x = self.ln2.add(c, x, ops)
        return self.mlp(n, ops), x


class LMHead(nn.Module):
    """logits = t(h) @ weight.T (+ bias). t is the identity (GPT-2, BART, bert-generation) or, with
    head_transform (BERT, RoBERTa, ELECTRA), dense -> gelu -> LayerNorm, whose output has the embedding
    width (ELECTRA's may be narrower than the hidden size)."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.embed_dim if cfg.head_transform else cfg.hidden_size
        self.register_buffer("weight", _buf(cfg.vocab_size, width))  # tied to the word embeddings or its own
        if cfg.head_transform:
            self.dense = Linear(cfg.hidden_size, width)
            self.ln = LayerNorm(width, cfg.layer_norm_eps)
        self.register_buffer("bias", _buf(cfg.vocab_size) if cfg.head_bias else None)

    def forward(self, h, ops):
        if self.cfg.head_transform:
            t = ops.linear_gelu(h, self.dense.weight, self.dense.bias, self.cfg.head_gelu)
            h = self.ln(t, ops)
        return ops.linear(h, self.weight, self.bias)


class Decoder(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        block = GPT2Block if cfg.pre_ln else BertLayer
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        if cfg.pre_ln:
            self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.head = LMHead(cfg)

    def cross_kv(self, enc, ops):
        """Per-layer cross-attention (K, V), each (B, S, H, D)."""
        return [layer.cross.project_kv(enc, ops) for layer in self.layers]

    def full(self, ids, key_mask, cross_kv, enc_mask, ops):
        """ids (B, L) -> logits (B, L, V); causal self-attention, key_mask bool (B, L) or None."""
        x = self.embed(ids, self.embed.positions(ids, 0), ops)
        kw = dict(causal=True, key_mask=key_mask, enc_mask=enc_mask)
        return self.head(self._run(x, ops, lambda layer, i: kw | {"cross_kv": cross_kv[i]}, "full"), ops)

    def step(self, ids, pos, cache, cross_kv, enc_mask, kv_index, enc_lens, ops):
        """One token per row. ids (N,); pos long (1,) or (N,) = number of tokens already in each row's
        cache (the slot this token is written to; per row for continuous batching).
        cache: (k_caches, v_caches) lists of (N, Lmax, H, D). Returns logits (N, V)."""
        pos = pos.expand(ids.shape[0])
        p = self.embed.step_positions(ids, pos)
        x = self.embed(ids.unsqueeze(1), p.unsqueeze(1), ops).squeeze(1)  # (N, E)
        seq_lens = (pos + 1).to(torch.int32)
        ks, vs = cache

        def kw(layer, i):
            return dict(k_cache=ks[i], v_cache=vs[i], pos=pos, seq_lens=seq_lens, cross_kv=cross_kv[i],
                        enc_mask=enc_mask, kv_index=kv_index, enc_lens=enc_lens)

        return self.head(self._run(x, ops, kw, "step"), ops)

    def _run(self, x, ops, kwargs_for, mode):
        if not self.cfg.pre_ln:
            for i, layer in enumerate(self.layers):
                x = getattr(layer, mode)(x, ops, **kwargs_for(layer, i))
            return x
        n = self.layers[0].ln1(x, ops) if len(self.layers) else None
        for i, layer in enumerate(self.layers):
            m, x = getattr(layer, mode)(x, n, ops, **kwargs_for(layer, i))
            ln_next = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.ln_f
            n, x = ln_next.add(m, x, ops)
        return n if n is not None else self.ln_f(x, ops)


class EncoderDecoderNet(nn.Module):
    """The whole model's weights and modules; the public wrapper lives in model.py."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        self.decoder = Decoder(cfg.decoder)
        if cfg.has_enc_to_dec_proj:
            self.enc_to_dec_proj = Linear(cfg.encoder.hidden_size, cfg.decoder.hidden_size)

    def project(self, enc, ops):
        return self.enc_to_dec_proj(enc, ops) if self.cfg.has_enc_to_dec_proj else enc
