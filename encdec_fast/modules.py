"""The encoder and decoder nets, written against the op table (never against a backend).

Weights are buffers laid out for the fast path: fused QKV (BERT's query/key/value concatenated,
GPT-2's Conv1D c_attn transposed to nn.Linear's [out, in]), cross-attention K/V fused. weight_map.py
maps Hugging Face names onto these. The families differ only in StackConfig's options (embeddings,
position rows, pre- or post-LN layers, head), never in a branch on the family's name here.

The encoder runs on packed tokens (packing.py): ids [T] -> hidden [T, E], T = the batch's real
tokens, self-attention within each sequence (ops.varlen_attention). Two decoder paths share the
layer code:
  full(ids [B, L])        -> hidden [B, L, E]   (forward pass, no cache)
  step(ids [N], pos, ...) -> hidden [N, E]      (one token per row over the preallocated cache)
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def step(self, seq: torch.Tensor, t: torch.Tensor, ops, row_stride: int):
        """A decode step's embeddings: row n feeds seq[n, t[n] - 1] at position t[n] - 1 (positions() for one
        token, token type 0). -> (x (N, hidden), seq_lens int32 (N,) = t, self_starts (N,) = n * row_stride):
        ops.embed_step, one launch on the triton table (the ELECTRA projection, when present, a second)."""
        cfg = self.cfg
        x, seq_lens, starts = ops.embed_step(
            seq, t, self.word, self.position, self.token_type[0] if cfg.type_vocab_size else None,
            scale=cfg.embed_scale, offset=cfg.position_offset, pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else -1,
            skip_pad=cfg.positions_skip_pad, ln=_ln(self.ln) if cfg.embed_ln else None, row_stride=row_stride)
        if cfg.embedding_size:
            x = self.proj(x, ops)
        return x, seq_lens, starts

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


def _ln(m: "LayerNorm") -> tuple:
    """A LayerNorm as fused_linear's (weight, bias, eps) prologue / residual argument."""
    return m.weight, m.bias, m.eps


@dataclass
class StepContext:
    """What every layer of one decode step shares, computed once per step (not once per layer)."""

    self_starts: torch.Tensor  # (N,) key row of row n's cache slot 0 in a layer's flat (rows*r, H, D) cache
    seq_lens: torch.Tensor  # (N,) int32 keys each row attends (the new token included)
    max_len: int  # cache slots per row: a bound on seq_lens
    cross_starts: torch.Tensor  # (N,) first encoder key of row n in the packed cross K/V
    enc_lens: torch.Tensor  # (N,) encoder keys row n attends
    enc_bound: int  # a bound on enc_lens known to the host
    self_plan: object = None  # ops.window_plan of the self-attention windows (CPU: read once a step), or None
    cross_plan: object = None  # the same for the cross-attention windows


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

    def step(self, x, ops, ctx: StepContext, k_cache, v_cache, *, x_ln=None):
        """x (N, E) (LayerNorm-ed first with x_ln) -> attention output (N, E), before the output projection.
        Row n's new K/V are written at slot seq_lens[n] - 1 of the (N, Lmax, H, D) caches by the
        attention kernel itself."""
        q, k, v = _heads(ops.fused_linear(x, self.qkv.weight, self.qkv.bias, x_ln=x_ln), 3, self.H)  # (N, H, D)
        a = ops.decode_attention(q, _key_rows(k_cache)[0], _key_rows(v_cache)[0], scale=self.scale,
                                 starts=ctx.self_starts, lens=ctx.seq_lens, k_new=k, v_new=v, max_len=ctx.max_len,
                                 plan=ctx.self_plan)
        return a.flatten(-2)


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

    def step(self, x, ops, ctx: StepContext, kv, *, x_ln=None):
        """x (N, E) (LayerNorm-ed first with x_ln); kv: packed K, V (T, H, D) -> attention output (N, E)
        over each row's span of encoder keys, before the output projection."""
        q = ops.fused_linear(x, self.q.weight, self.q.bias, x_ln=x_ln).unflatten(-1, (self.H, -1))  # (N, H, D)
        a = ops.decode_attention(q, kv[0], kv[1], scale=self.scale, starts=ctx.cross_starts, lens=ctx.enc_lens,
                                 max_len=ctx.enc_bound, plan=ctx.cross_plan)
        return a.flatten(-2)


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

    def full(self, x, ops, *, causal, key_mask, cross_kv=None, enc_mask=None, packing=None):
        x = self.ln1.add(self.attn.full(x, ops, causal=causal, key_mask=key_mask, packing=packing), x, ops)[0]
        if cross_kv is not None:
            x = self.ln_cross.add(self.cross.full(x, ops, kv=cross_kv, enc_mask=enc_mask), x, ops)[0]
        return self.ln2.add(self.mlp(x, ops), x, ops)[0]

    def step(self, s, ln_prev, ops, ctx: StepContext, k_cache, v_cache, cross_kv):
        """A decode step of the post-LN layer over (s, ln_prev): its input is ln_prev(s) (s itself when
        ln_prev is None), the LayerNorm fused into the projections that read it. Returns (s', ln2): the
        next layer's input is ln2(s'). Eight launches: 4 projections with their LayerNorm prologue or
        residual epilogue, 2 attentions, fc1 + gelu, fc2 + residual."""
        a = self.attn.step(s, ops, ctx, k_cache, v_cache, x_ln=ln_prev)
        s1 = ops.fused_linear(a, self.attn.o.weight, self.attn.o.bias, residual=s, residual_ln=ln_prev)
        c = self.cross.step(s1, ops, ctx, cross_kv, x_ln=_ln(self.ln1))
        s2 = ops.fused_linear(c, self.cross.o.weight, self.cross.o.bias, residual=s1, residual_ln=_ln(self.ln1))
        h = ops.fused_linear(s2, self.mlp.fc1.weight, self.mlp.fc1.bias, x_ln=_ln(self.ln_cross), gelu=self.mlp.gelu)
        s3 = ops.fused_linear(h, self.mlp.fc2.weight, self.mlp.fc2.bias, residual=s2, residual_ln=_ln(self.ln_cross))
        return s3, _ln(self.ln2)


class Encoder(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg, i) for i in range(cfg.num_layers))

    def forward(self, ids, pos, packing, ops, types=None):
        """Packed tokens: ids, pos (and types: token type ids, or None for type 0) long (T,) (positions as
        Embeddings.positions gives them on the padded batch), packing: their Packing -> hidden (T, E)"""
        x = self.embed(ids, pos, ops, types)
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

    def step(self, x, ops, ctx: StepContext, k_cache, v_cache, cross_kv):
        """A decode step of the pre-LN block over the residual stream x (N, E): eight launches, each
        LayerNorm fused into the projection that reads it, each residual add into the one that ends
        its sublayer."""
        a = self.attn.step(x, ops, ctx, k_cache, v_cache, x_ln=_ln(self.ln1))
        x = ops.fused_linear(a, self.attn.o.weight, self.attn.o.bias, residual=x)
        c = self.cross.step(x, ops, ctx, cross_kv, x_ln=_ln(self.ln_cross))
        x = ops.fused_linear(c, self.cross.o.weight, self.cross.o.bias, residual=x)
        h = ops.fused_linear(x, self.mlp.fc1.weight, self.mlp.fc1.bias, x_ln=_ln(self.ln2), gelu=self.mlp.gelu)
        return ops.fused_linear(h, self.mlp.fc2.weight, self.mlp.fc2.bias, residual=x)


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

    def step(self, h, ops, *, x_ln=None):
        """forward() of a decode step's x_ln(h) (N, E), the LayerNorm fused into the first projection."""
        if self.cfg.head_transform:
            t = ops.fused_linear(h, self.dense.weight, self.dense.bias, x_ln=x_ln, gelu=self.cfg.head_gelu)
            return ops.fused_linear(t, self.weight, self.bias, x_ln=_ln(self.ln))
        return ops.fused_linear(h, self.weight, self.bias, x_ln=x_ln)


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
        """Per-layer cross-attention (K, V), each (B, S, H, D) from padded enc (B, S, E), or each
        (T, H, D) from packed enc (T, E) (EncDecModel.encode_packed): K/V of real tokens only, in the
        embeddings' dtype (the decode state's; a table computing in fp32 over bf16 storage returns fp32)."""
        dtype = self.embed.word.dtype
        return [tuple(t.to(dtype) for t in layer.cross.project_kv(enc, ops)) for layer in self.layers]

    def full(self, ids, key_mask, cross_kv, enc_mask, ops):
        """ids (B, L) -> logits (B, L, V); causal self-attention, key_mask bool (B, L) or None."""
        x = self.embed(ids, self.embed.positions(ids, 0), ops)
        kw = dict(causal=True, key_mask=key_mask, enc_mask=enc_mask)
        return self.head(self._run(x, ops, lambda layer, i: kw | {"cross_kv": cross_kv[i]}, "full"), ops)

    def step(self, seq, t, cache, cross_kv, cross_starts, enc_lens, enc_bound: int, ops):
        """One token per row: row n feeds seq[n, t[n] - 1] (seq long (N, Lc), t long (N,)), whose K/V go
        to slot t[n] - 1 of the row's cache (per row, for continuous batching).
        cache: (k_caches, v_caches) lists of (N, Lmax, H, D); cross_kv: per layer packed (K, V) each
        (T, H, D), row n attending keys cross_starts[n] .. + enc_lens[n] (<= enc_bound).
        Returns logits (N, V)."""
        ks, vs = cache
        keys, r = _key_rows(ks[0])  # every layer's cache has layer 0's layout
        x, seq_lens, self_starts = self.embed.step(seq, t, ops, r)  # (N, E)
        if ops.decoder_step is not None:  # the layers and the head in one call, where the table has one
            logits = ops.decoder_step(self, x, self_starts, seq_lens, cache, cross_kv, cross_starts, enc_lens)
            if logits is not None:
                return logits
        ctx = StepContext(self_starts, seq_lens, ks[0].shape[1], cross_starts, enc_lens, enc_bound,
                          ops.window_plan(self_starts, seq_lens, keys.shape[0]),
                          ops.window_plan(cross_starts, enc_lens, cross_kv[0][0].shape[0]) if cross_kv else None)
        if self.cfg.pre_ln:
            for i, layer in enumerate(self.layers):
                x = layer.step(x, ops, ctx, ks[i], vs[i], cross_kv[i])
            return self.head.step(x, ops, x_ln=_ln(self.ln_f))
        ln = None
        for i, layer in enumerate(self.layers):
            x, ln = layer.step(x, ln, ops, ctx, ks[i], vs[i], cross_kv[i])
        return self.head.step(x, ops, x_ln=ln)

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

    def tie_head(self):
        """One tensor for the decoder's word embeddings and an LM head stored equal to them (memory, not
        numbers); a head in another layout (prepack.py) or storage (quantize.py's int8) stays apart."""
        dec = self.decoder
        w, h = dec.embed.word, dec.head.weight
        if w is not h and type(h) is torch.Tensor and h.layout == torch.strided and w.shape == h.shape and torch.equal(w, h):
            dec.head._buffers["weight"] = w
