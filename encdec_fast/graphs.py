"""CUDA graphs for the decode step.

A decode step (every decoder layer + LM head, ~15 kernels per layer) is launch-bound at small
batch: captured once as a CUDA graph it replays with one launch. The graph bakes in the addresses
of everything it reads and writes, so a captured step owns static buffers: the input tokens, the
position counter, the self-attention cache, a copy of the cross-attention K/V, the encoder mask,
kv_index and enc_lens. A new request with the same shapes (rows, step budget, encoder batch and
length) reuses the graph: its cross K/V and masks are copied into the static buffers (one copy per
request) and the position counter is reset. Graphs are cached per model, a few at a time (LRU).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from .cache import KVCache


def _static_like(t):
    return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


class CapturedStep:
    """decoder.step(tokens, pos, cache, cross, enc_mask, kv_index, enc_lens) -> fp32 logits, captured."""

    def __init__(self, model, cross, enc_mask, kv_index, enc_lens, rows: int, cache_len: int):
        t0 = time.perf_counter()
        self.decoder, self.ops = model.graph.decoder, model.ops
        dev = model.device
        self.cache = KVCache(model.cfg.decoder, rows, cache_len, dtype=model.dtype, device=dev)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.cross = [(_static_like(k), _static_like(v)) for k, v in cross]
        self.enc_mask, self.kv_index, self.enc_lens = _static_like(enc_mask), _static_like(kv_index), _static_like(enc_lens)
        self.load(cross, enc_mask, kv_index, enc_lens)
        # warm up on a side stream (Triton compiles here), then capture
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
        self.capture_seconds = time.perf_counter() - t0

    def _step(self):
        return self.decoder.step(self.tokens, self.pos, self.cache.layers, self.cross, self.enc_mask, self.kv_index,
                                 self.enc_lens, self.ops).float()

    def load(self, cross, enc_mask, kv_index, enc_lens):
        """Point the captured step at a new request (same shapes)."""
        for (sk, sv), (k, v) in zip(self.cross, cross):
            sk.copy_(k)
            sv.copy_(v)
        for static, new in ((self.enc_mask, enc_mask), (self.kv_index, kv_index), (self.enc_lens, enc_lens)):
            if static is not None:
                static.copy_(new)
        self.pos.zero_()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (rows,) -> fp32 logits (rows, V), a static buffer overwritten by the next call."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def _key(model, cross, enc_mask, kv_index, rows, cache_len):
    k0 = cross[0][0] if cross else None
    return (rows, cache_len, None if k0 is None else tuple(k0.shape), enc_mask is None, kv_index is None,
            model.dtype, model.backend)


class GraphCache:
    """A few captured steps per model, least recently used evicted first."""

    def __init__(self, max_entries: int = 2):
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()
        self.captures = 0
        self.capture_seconds = 0.0

    def get(self, model, cross, enc_mask, kv_index, enc_lens, rows: int, cache_len: int) -> CapturedStep:
        key = _key(model, cross, enc_mask, kv_index, rows, cache_len)
        step = self.entries.pop(key, None)
        if step is None:
            while len(self.entries) >= self.max_entries:
                self.entries.popitem(last=False)
            torch.cuda.empty_cache()
            step = CapturedStep(model, cross, enc_mask, kv_index, enc_lens, rows, cache_len)
            self.captures += 1
            self.capture_seconds += step.capture_seconds
        else:
            step.load(cross, enc_mask, kv_index, enc_lens)
        self.entries[key] = step
        return step

    def clear(self):
        self.entries.clear()
