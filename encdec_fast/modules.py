"""The encoder and decoder nets, written against the op table (never against a backend).

Weights are buffers laid out for the fast path: fused QKV (BERT's query/key/value concatenated,
GPT-2's Conv1D c_attn transposed to nn.Linear's [out, in]), cross-attention K/V fused. weight_map.py
maps Hugging Face names onto these.

The encoder runs on packed tokens (packing.py): ids [T] -> hidden [T, E], T = the batch's real
tokens, self-attention within each sequence (ops.varlen_attention). Two decoder paths share the
layer code:
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
        h = ops.bias_gelu(ops.linear(x, self.fc1.weight, None), self.fc1.bias, self.gelu)
        return self.fc2(h, ops)


class Embeddings(nn.Module):
    """Word + position (+ token type 0) embeddings; BERT/RoBERTa add a LayerNorm."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("word", _buf(cfg.vocab_size, cfg.hidden_size))
        self.register_buffer("position", _buf(cfg.max_positions, cfg.hidden_size))
        if cfg.family != "gpt2":
            self.register_buffer("type0", _buf(cfg.hidden_size))  # row 0 of token_type_embeddings
            self.ln = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def positions(self, ids: torch.Tensor, start) -> torch.Tensor:
        """Position ids as transformers computes them; start is the number of tokens before ids[:, 0]."""
        cfg = self.cfg
        if cfg.family == "roberta":
            keep = (ids != cfg.pad_token_id).long()
            return (torch.cumsum(keep, dim=1) + start) * keep + cfg.pad_token_id
        L = ids.shape[1]
        return (torch.arange(L, device=ids.device) + start).expand(ids.shape[0], L)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, ops):
        x = self.word[ids] + self.position[pos]
        if self.cfg.family == "gpt2":
            return x
        return self.ln(x + self.type0, ops)


def _heads(t: torch.Tensor, parts: int, H: int):
    """[..., parts*H*D] -> `parts` views of [..., H, D] (no copy)."""
    t = t.unflatten(-1, (parts, H, -1))
    return [t[..., i, :, :] for i in range(parts)]


class SelfAttention(nn.Module):
    def __init__(self, cfg: StackConfig, layer: int):
        super().__init__()
        self.H = cfg.num_heads
        self.scale = cfg.attn_scale(layer)
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o = Linear(cfg.hidden_size, cfg.hidden_size)

    def full(self, x, ops, *, causal: bool, key_mask, packing=None):
        """x (B, L, E) padded, key_mask bool (B, L) or None; or x (T, E) packed as `packing` says."""
        q, k, v = _heads(self.qkv(x, ops), 3, self.H)  # each (B, L, H, D), or (T, H, D) packed
        if packing is not None:
            a = ops.varlen_attention(q, k, v, cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen,
                                     scale=self.scale, causal=causal)
        else:
            a = ops.attention(q, k, v, scale=self.scale, causal=causal, key_mask=key_mask)
        return self.o(a.flatten(-2), ops)

    def step(self, x, ops, *, k_cache, v_cache, pos, seq_lens):
        """x (N, E); writes row n's K/V at slot pos[n] of the (N, Lmax, H, D) caches."""
        q, k, v = _heads(self.qkv(x, ops), 3, self.H)  # each (N, H, D)
        rows = torch.arange(x.shape[0], device=x.device)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
        a = ops.decode_attention(q, k_cache, v_cache, scale=self.scale, seq_lens=seq_lens)
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
        """enc (B, S, E) -> K, V each (B, S, H, D), or packed enc (T, E) -> K, V each (T, H, D):
        computed once per request, reused every step."""
        return _heads(self.kv(enc, ops), 2, self.H)

    def full(self, x, ops, *, kv, enc_mask):
        q = self.q(x, ops).unflatten(-1, (self.H, -1))
        a = ops.attention(q, kv[0], kv[1], scale=self.scale, causal=False, key_mask=enc_mask)
        return self.o(a.flatten(-2), ops)

    def step(self, x, ops, *, kv, enc_mask, kv_index, enc_lens):
        q = self.q(x, ops).unflatten(-1, (self.H, -1))  # (N, H, D)
        a = ops.decode_attention(q, kv[0], kv[1], scale=self.scale, seq_lens=enc_lens,
                                 kv_index=kv_index, key_mask=enc_mask)
        return self.o(a.flatten(-2), ops)


# ------------------------------------------------------------------------------------------------
# BERT / RoBERTa layers (post-LN)
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

    def full(self, x, ops, *, causal, key_mask, cross_kv=None, enc_mask=None, packing=None):
        x = self.ln1.add(self.attn.full(x, ops, causal=causal, key_mask=key_mask, packing=packing), x, ops)[0]
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

    def forward(self, ids, pos, packing, ops):
        """Packed tokens: ids, pos long (T,) (positions as Embeddings.positions gives them on the
        padded batch), packing: their Packing -> hidden (T, E)"""
        x = self.embed(ids, pos, ops)
        for layer in self.layers:
            x = layer.full(x, ops, causal=False, key_mask=None, packing=packing)
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
    """GPT-2: logits = h @ wte.T. BERT/RoBERTa: dense -> gelu -> LayerNorm -> @ word.T + bias."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("weight", _buf(cfg.vocab_size, cfg.hidden_size))  # tied or own
        if cfg.family != "gpt2":
            self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
            self.ln = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
            self.register_buffer("bias", _buf(cfg.vocab_size))

    def forward(self, h, ops):
        if self.cfg.family == "gpt2":
            return ops.linear(h, self.weight, None)
        t = ops.bias_gelu(ops.linear(h, self.dense.weight, None), self.dense.bias, self.cfg.head_gelu)
        return ops.linear(self.ln(t, ops), self.weight, self.bias)


class Decoder(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        block = GPT2Block if cfg.family == "gpt2" else BertLayer
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        if cfg.family == "gpt2":
            self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.head = LMHead(cfg)

    def cross_kv(self, enc, ops):
        """Per-layer cross-attention (K, V), each (B, S, H, D) from padded enc (B, S, E), or each
        (T, H, D) from packed enc (T, E) (EncDecModel.encode_packed): K/V of real tokens only."""
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
        cfg = self.cfg
        pos = pos.expand(ids.shape[0])
        if cfg.family == "roberta":
            p = torch.where(ids != cfg.pad_token_id, pos + cfg.pad_token_id + 1, cfg.pad_token_id)
        else:
            p = pos
        x = self.embed(ids.unsqueeze(1), p.unsqueeze(1), ops).squeeze(1)  # (N, E)
        seq_lens = (pos + 1).to(torch.int32)
        ks, vs = cache

        def kw(layer, i):
            return dict(k_cache=ks[i], v_cache=vs[i], pos=pos, seq_lens=seq_lens, cross_kv=cross_kv[i],
                        enc_mask=enc_mask, kv_index=kv_index, enc_lens=enc_lens)

        return self.head(self._run(x, ops, kw, "step"), ops)

    def _run(self, x, ops, kwargs_for, mode):
        if self.cfg.family != "gpt2":
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
