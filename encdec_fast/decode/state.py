"""Decode state: the self-attention KV cache and the CUDA-graph steps over static buffers.

KV cache
--------
The decoder's self-attention KV cache: preallocated to the step budget, written in place.

One buffer holds every layer's K and V, shape (2, layers, rows, max_len, heads, head_dim), so that
beam search reorders the whole cache with one gather instead of 2 x layers of them. The per-layer
views handed to Decoder.step are fixed for the life of the cache (same storage, same strides), which
is what a captured CUDA graph needs.

Cross-attention K/V are not here: Decoder.cross_kv computes them once per request, per encoder row,
and beams/num_return_sequences share them through kv_index (an index, never a copy).

CUDA graphs
-----------
CUDA graphs for the decode step, captured once per shape bucket.

A decode step (every decoder layer + LM head, ~190 kernels at bert-base size) is launch-bound at
small batch: captured as a CUDA graph it replays with one launch (W1 on an H100: 11.6 -> 1.0 ms per
token). A graph bakes in the addresses and shapes of everything it touches, so a captured step owns
static buffers: the input tokens, the position counter, the self-attention cache, a copy of the
cross-attention K/V, the encoder mask, kv_index and enc_lens.

Shapes are rounded up to buckets so that requests of nearby sizes share one graph:
  decode rows  -> next power of two (padding rows decode token 0 against encoder row 0 and are dropped)
  encoder rows -> next power of two
  encoder len  -> multiple of 64 (padding keys are masked out)
  step budget  -> multiple of 64 cache slots (slots past the position are never read)
A new request with the same buckets copies its cross K/V and masks into the static buffers (one copy
per request) and resets the position counter. Graphs are cached per model, a few at a time (LRU).

StaticStep(capture=False) runs the same padded, static-buffer step eagerly: the CPU tests use it to
check the bucket padding against transformers; only the capture itself is CUDA-only.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from ..config import StackConfig


class KVCache:
    """Self-attention K/V for `rows` decode rows and up to `max_len` tokens."""

    def __init__(self, cfg: StackConfig, rows: int, max_len: int, *, dtype: torch.dtype, device):
        H, D = cfg.num_heads, cfg.head_dim
        # zeros, not empty: slots past the written prefix are masked out of attention, but a masked
        # probability of 0 times a NaN left in uninitialised memory would still be NaN
        self.buf = torch.zeros(2, cfg.num_layers, rows, max_len, H, D, dtype=dtype, device=device)
        self.k = list(self.buf[0].unbind(0))  # per layer (rows, max_len, H, D)
        self.v = list(self.buf[1].unbind(0))

    @property
    def layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(k_list, v_list): the `cache` argument of Decoder.step."""
        return self.k, self.v

    def reorder(self, row_idx: torch.Tensor, length: int) -> None:
        """Row n takes the cache of row row_idx[n] (beam search), for the filled prefix [:length] only.

        Gathers into a temporary and copies back into the same buffer, so the per-layer views stay valid."""
        filled = self.buf[:, :, :, :length]  # (2, layers, rows, length, H, D)
        filled.copy_(filled.index_select(2, row_idx))


SEQ_BUCKET = 64


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def buckets(rows: int, enc_rows: int, enc_len: int, cache_len: int) -> tuple[int, int, int, int]:
    return _pow2(rows), _pow2(enc_rows), _round(enc_len, SEQ_BUCKET), _round(cache_len, SEQ_BUCKET)


class StaticStep:
    """decoder.step over static, bucket-sized buffers; captured as a CUDA graph when capture=True."""

    def __init__(self, model, key: tuple, capture: bool):
        t0 = time.perf_counter()
        self.decoder, self.ops = model.net.decoder, model.ops
        self.rows, self.enc_rows, self.enc_len, cache_len = key[:4]
        dcfg, dev = model.cfg.decoder, model.device
        self.dev = dev
        self.cache = KVCache(dcfg, self.rows, cache_len, dtype=model.dtype, device=dev)
        self.tokens = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        kv = torch.zeros(2, dcfg.num_layers, self.enc_rows, self.enc_len, dcfg.num_heads, dcfg.head_dim,
                         dtype=model.dtype, device=dev)
        self.cross = [(kv[0, i], kv[1, i]) for i in range(dcfg.num_layers)]
        self.enc_mask = torch.zeros(self.enc_rows, self.enc_len, dtype=torch.bool, device=dev)
        self.kv_index = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.enc_lens = torch.ones(self.rows, dtype=torch.int32, device=dev)
        self.graph = None
        if capture:
            # warm up on a side stream (Triton compiles here), then capture; the warm-up writes
            # cache slot 0, which every request overwrites at its first step
            s = torch.cuda.Stream(device=dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(dev).wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
            torch.cuda.synchronize(dev)
        self.setup_seconds = time.perf_counter() - t0

    def _step(self):
        return self.decoder.step(self.tokens, self.pos, self.cache.layers, self.cross, self.enc_mask, self.kv_index,
                                 self.enc_lens, self.ops).float()

    def load(self, cross, enc_mask, kv_index, enc_lens, rows: int):
        """Point the step at a new request: cross K/V (B, S, H, D) per layer, enc_mask (B, S) or None,
        kv_index (rows,) or None (row n reads encoder row n), enc_lens (rows,)."""
        B, S = cross[0][0].shape[:2] if cross else (self.enc_rows, self.enc_len)
        for (sk, sv), (k, v) in zip(self.cross, cross):
            sk[:B, :S].copy_(k)
            sv[:B, :S].copy_(v)
        self.enc_mask.zero_()
        if enc_mask is None:
            self.enc_mask[:B, :S] = True
        else:
            self.enc_mask[:B, :S].copy_(enc_mask)
        self.kv_index.zero_()  # padding rows read encoder row 0 ...
        self.kv_index[:rows].copy_(kv_index if kv_index is not None else torch.arange(rows, device=self.dev))
        self.enc_lens.fill_(1)  # ... and only its first key
        self.enc_lens[:rows].copy_(enc_lens)
        self.tokens.zero_()
        self.pos.zero_()
        self.n = rows

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (rows,) -> fp32 logits (rows, V); with a graph, a view of a static buffer that the
        next call overwrites."""
        self.tokens[:self.n].copy_(tokens)
        if self.graph is None:
            return self._step()[:self.n]
        self.graph.replay()
        return self.logits[:self.n]

    def reorder(self, row_idx: torch.Tensor, length: int):
        """Beam search: row n takes row row_idx[n]'s cache; padding rows keep theirs."""
        if row_idx.numel() < self.rows:
            pad = torch.arange(row_idx.numel(), self.rows, device=row_idx.device, dtype=row_idx.dtype)
            row_idx = torch.cat([row_idx, pad])
        self.cache.reorder(row_idx, length)


class GraphCache:
    """A few static steps per model, keyed by shape bucket; least recently used evicted first."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()
        self.captures = 0
        self.capture_seconds = 0.0

    def get(self, model, cross, enc_mask, kv_index, enc_lens, rows: int, cache_len: int, capture: bool) -> StaticStep:
        B, S = cross[0][0].shape[:2]
        key = (*buckets(rows, B, S, cache_len), model.dtype, model.backend, capture)
        step = self.entries.pop(key, None)
        if step is None:
            while len(self.entries) >= self.max_entries:
                self.entries.popitem(last=False)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            step = StaticStep(model, key, capture)
            self.captures += 1
            self.capture_seconds += step.setup_seconds
        step.load(cross, enc_mask, kv_index, enc_lens, rows)
        self.entries[key] = step
        return step
