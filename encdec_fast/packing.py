"""Packed token layout: a padded batch without its padding.

A batch of B rows of width S with an attention mask holds T = mask.sum() real tokens. Packed, they
sit back to back in one run of T tokens: row b owns tokens cu_seqlens[b]:cu_seqlens[b+1], in the
order they appear in the row (the mask may have holes anywhere: right or left padding alike). Every
per-token op (embeddings, linears, LayerNorms, the MLP) then runs on T tokens instead of B x S, and
attention runs within each row (ops.varlen_attention). Positions are computed on the padded batch,
as transformers computes them, and packed like the ids, so nothing downstream needs the padding.

    packing = Packing.from_mask(mask, B, S, device)
    x = packing.pack(ids)            # (B, S) -> (T,)
    y = packing.unpack(hidden)       # (T, E) -> (B, S, E), zeros at padding positions
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (B, S) batch go once packed (see the module docstring)."""

    batch: int  # B
    width: int  # S
    lengths: tuple[int, ...]  # real tokens of each row (host ints)
    cu_seqlens: torch.Tensor  # int32 (B + 1,) on the device: row b = packed tokens cu[b]:cu[b+1]
    mask: torch.Tensor | None  # bool (B, S) (True = real token), or None when no row is padded
    index: torch.Tensor | None  # long (T,): flat position b * S + j of each packed token; None with mask

    @classmethod
    def from_mask(cls, mask: torch.Tensor | None, batch: int, width: int, device) -> "Packing":
        """mask bool (B, S) or None (every position real). One host sync (the row lengths)."""
        if mask is None:
            lengths = (width,) * batch
            counts = torch.full((batch,), width, dtype=torch.int32, device=device)
            index = None
        else:
            counts = mask.sum(dim=1, dtype=torch.int32)  # (B,)
            lengths = tuple(counts.tolist())
            index = mask.flatten().nonzero().squeeze(1)  # (T,) ascending: row by row, in row order
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        torch.cumsum(counts, dim=0, out=cu[1:])
        return cls(batch, width, lengths, cu, mask, index)

    @property
    def total(self) -> int:
        """T: real tokens in the batch."""
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...): the real positions, row by row (a view when nothing is padded)."""
        flat = x.flatten(0, 1)  # (B * S, ...)
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...), zeros at padding positions (a view when nothing is padded)."""
        if self.index is None:
            return x.unflatten(0, (self.batch, self.width))
        out = x.new_zeros((self.batch * self.width, *x.shape[1:]))
        return out.index_copy_(0, self.index, x).unflatten(0, (self.batch, self.width))

    def rows_and_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, offset) long (T,) each: packed token t is token offset[t] of row row[t] once the row's
        padding is dropped (where it goes in a store that keeps each row's tokens at its front)."""
        dev = self.cu_seqlens.device
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=dev)
        row = torch.repeat_interleave(torch.arange(self.batch, device=dev), lengths, output_size=self.total)  # (T,)
        offset = torch.arange(self.total, device=dev) - self.cu_seqlens.long()[row]
        return row, offset
