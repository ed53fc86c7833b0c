"""The decoder's self-attention KV cache: preallocated to the step budget, written in place.

One buffer holds every layer's K and V, shape (2, layers, rows, max_len, heads, head_dim), so that
beam search reorders the whole cache with one gather instead of 2 x layers of them. The per-layer
views handed to Decoder.step are fixed for the life of the cache (same storage, same strides), which
is what a captured CUDA graph needs.

Cross-attention K/V are not here: Decoder.cross_kv computes them once per request, per encoder row,
and beams/num_return_sequences share them through kv_index (an index, never a copy).
"""

from __future__ import annotations

import torch

from .config import HalfConfig


class KVCache:
    """Self-attention K/V for `rows` decode rows and up to `max_len` tokens."""

    def __init__(self, cfg: HalfConfig, rows: int, max_len: int, *, dtype: torch.dtype, device):
        H, D = cfg.num_heads, cfg.head_dim
        self.max_len = max_len
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
