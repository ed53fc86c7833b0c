"""Decode state: every buffer a set of decode rows needs, preallocated on the device.

generate() (greedy, sampling, beam search) and the Engine's continuous batching both run their steps
(decode/step.py, through decode/runner.py) over one of these. A row serves one sequence of one request;
the rows of a request (beams, returned sequences) read the same span of the cross-attention arena:

  seq      (rows, seq_cap) long     each row's tokens (decoder start, prefix, generated)
  t        (rows,) long             tokens a row holds; the last one, seq[n, t-1], is fed next
  cache    (2, layers, rows, seq_cap, H, D)  self-attention K/V; slot j holds token j's K/V
  cross    per layer (K, V) (enc_slots * enc_cap, H, D): the packed encoder states' projections, each
           request's real tokens back to back (no padding); row n reads keys [cross_start[n], + enc_lens[n])
  tables   per-row selection settings and state (decode/select.py)
  groups   beam bookkeeping of requests searched with beams (decode/beam.py), one group per beam shape
  alive, limit, stop_t, busy     rows still generating, their max_length, the length at which they
                                 stopped (eos or max_length), rows in use
  nonfinite (rows,) bool         a running row got NaN/inf logits (float16 overflow...): its request
                                 fails with NumericalError instead of emitting junk

The host keeps what it knows without reading the device: which rows are busy, and how many tokens each
holds at most (`held`: a row that stopped early holds fewer; `filled`, the largest). A step never syncs; a caller looks
at the flags every few steps, and a
late look loses nothing because `stop_t` records where each row stopped.

Every buffer keeps its address between steps (a captured step replays on the addresses it was captured
with); `epoch` counts the reallocations (growth, a new beam group, a widened table), after which a
captured step must be captured again.
"""

from __future__ import annotations

import torch

from .. import validate
from ..config import StackConfig
from ..cpu import kernels as ck
from . import ops as decode_ops
from . import select as sel
from .beam import BeamGroup


def state_bytes(model, rows: int, seq_cap: int, enc_tokens: int) -> int:
    """About what a DecodeState of these sizes takes: the self-attention cache and the cross-K/V arena,
    the per-token buffers (tokens, beam hypotheses), and a step's logits and processed scores."""
    d = model.cfg.decoder
    elt = torch.empty((), dtype=model.dtype).element_size()
    per_key = 2 * d.num_layers * d.num_heads * d.head_dim * elt  # K and V of one token, every layer
    return rows * seq_cap * (per_key + 32) + enc_tokens * per_key + rows * d.vocab_size * 16


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

    def move(self, rows: torch.Tensor, parents: torch.Tensor, length: int | None) -> None:
        """Row rows[i] takes the cache of row parents[i] (beam search), for the filled prefix [:length]
        (None: every slot). Gathers into a temporary, so the per-layer views stay valid. On the CPU (no graph
        to keep in place) only the rows whose parent is another row are copied: a beam that stays on its own
        path keeps its cache where it is."""
        if rows.device.type == "cpu":
            moved = parents != rows
            if not bool(moved.any()):
                return
            rows, parents = rows[moved], parents[moved]
            if ck.has_int8():  # one staged copy per moved row and layer (torch's indexing: ~2x the time)
                ck.move_rows(self.buf.flatten(0, 1), rows, parents, length)
                return
        filled = self.buf if length is None else self.buf[:, :, :, :length]  # (2, layers, rows, length, H, D)
        filled[:, :, rows] = filled[:, :, parents]


class DecodeState:
    """Buffers for `rows` decode rows of up to `seq_cap` tokens each and a cross-K/V arena of
    `enc_slots` x `enc_cap` encoder tokens (generate(): one slot holding the whole packed batch; the
    Engine: one slot of enc_cap tokens per decode row, which grow() widens); see the module docstring."""

    def __init__(self, model, rows: int, seq_cap: int, enc_slots: int, enc_cap: int):
        validate.decode_memory(state_bytes(model, rows, seq_cap, enc_slots * enc_cap), model.device,
                               f"decoding {rows} rows of up to {seq_cap} tokens")
        self.model, self.decoder, self.ops = model, model.net.decoder, model.ops
        self.dops = decode_ops.table(model.backend, model.device)  # the decode-only ops (decode/ops.py)
        dcfg = model.cfg.decoder
        self.rows, self.seq_cap, self.enc_slots, self.enc_cap = rows, seq_cap, enc_slots, enc_cap
        self.device, self.dtype, self.vocab = model.device, model.dtype, dcfg.vocab_size
        i64 = dict(dtype=torch.long, device=self.device)
        flags = dict(dtype=torch.bool, device=self.device)
        self.seq = torch.zeros(rows, seq_cap, **i64)
        self.t = torch.ones(rows, **i64)
        self.limit = torch.full((rows,), seq_cap, **i64)
        self.stop_t = torch.zeros(rows, **i64)  # 0 while the row runs
        self.alive = torch.zeros(rows, **flags)
        self.busy = torch.zeros(rows, **flags)
        self.nonfinite = torch.zeros(rows, **flags)
        self.is_beam = torch.zeros(rows, **flags)
        self.no_beam_done = torch.zeros(rows, **flags)  # never written: what a step without beam groups passes on
        self.steps = torch.zeros((), **i64)  # steps taken since the last reset_clock()
        self.all_stopped_at = torch.zeros((), **i64)  # step at which every busy row had stopped (0: not yet)
        self.cache = KVCache(dcfg, rows, seq_cap, dtype=self.dtype, device=self.device)
        self._alloc_cross()
        self.cross_start = torch.zeros(rows, **i64)  # row n's encoder keys start at arena token cross_start[n]
        self.enc_lens = torch.ones(rows, dtype=torch.int32, device=self.device)
        self.enc_bound = enc_cap  # an upper bound on enc_lens known to the host (the torch reference's window)
        self.tables = sel.RowTables(rows, self.vocab, self.device)
        self.groups: dict[tuple[int, int], BeamGroup] = {}  # (num_beams, K) -> group
        self.busy_rows: set[int] = set()  # host copy of `busy`
        self.held = [1] * rows  # host bound on the tokens each row holds (its t, unless it stopped)
        self._limit = [seq_cap] * rows  # host copy of `limit`
        self._epoch = 0

    def _alloc_cross(self):
        dcfg = self.model.cfg.decoder
        kv = torch.zeros(2, dcfg.num_layers, self.enc_slots * self.enc_cap, dcfg.num_heads, dcfg.head_dim,
                         dtype=self.dtype, device=self.device)
        self.cross_buf = kv
        self.cross = [(kv[0, i], kv[1, i]) for i in range(dcfg.num_layers)]  # each (slots * enc_cap, H, D)

    @property
    def epoch(self) -> int:
        """Changes whenever a buffer a captured step reads was reallocated."""
        return self._epoch + self.tables.version

    # -- capacity ------------------------------------------------------------------------------------
    def grow(self, seq_cap: int, enc_cap: int):
        """More token slots per row / encoder positions per arena slot, content kept."""
        if seq_cap > self.seq_cap or enc_cap > self.enc_cap:  # both copies are alive while the content moves
            validate.decode_memory(state_bytes(self.model, self.rows, max(seq_cap, self.seq_cap),
                                               self.enc_slots * max(enc_cap, self.enc_cap)), self.device,
                                   f"decoding {self.rows} rows of up to {max(seq_cap, self.seq_cap)} tokens")
        if seq_cap > self.seq_cap:
            seq = self.seq.new_zeros(self.rows, seq_cap)
            seq[:, :self.seq_cap] = self.seq
            cache = KVCache(self.model.cfg.decoder, self.rows, seq_cap, dtype=self.dtype, device=self.device)
            cache.buf[:, :, :, :self.seq_cap] = self.cache.buf
            self.seq, self.cache, self.seq_cap = seq, cache, seq_cap
            for g in self.groups.values():  # beam buffers are per token slot too
                g.grow(seq_cap)
            self._epoch += 1
        if enc_cap > self.enc_cap:  # every slot keeps its tokens at its front: slot b moves from b*S to b*enc_cap
            old, S = self.cross_buf, self.enc_cap
            self.enc_cap = self.enc_bound = enc_cap
            self._alloc_cross()
            self.cross_buf.unflatten(2, (self.enc_slots, enc_cap))[:, :, :, :S] = old.unflatten(2, (self.enc_slots, S))
            self.cross_start.copy_(self.cross_start // S * enc_cap)
            self._epoch += 1

    @property
    def live_groups(self) -> list[BeamGroup]:
        """The beam groups with an active request (host-side knowledge: no sync)."""
        return [g for g in self.groups.values() if g.n_active]

    @property
    def filled(self) -> int:
        """A host bound on the tokens any busy row holds (1 when none is busy)."""
        return max((self.held[r] for r in self.busy_rows), default=1)

    @property
    def row_extent(self) -> int:
        """One past the highest busy row (host-side knowledge): rows beyond it are idle."""
        return max(self.busy_rows) + 1 if self.busy_rows else 0

    def beam_group(self, num_beams: int, n_eos: int, *, joint: bool) -> BeamGroup:
        """The group serving requests with num_beams beams and n_eos eos ids (created on first use)."""
        key = (num_beams, max(2, 1 + n_eos) * num_beams)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = BeamGroup(self.rows, num_beams, n_eos, self.seq_cap, self.device, joint=joint)
            self._epoch += 1
        return g

    # -- requests --------------------------------------------------------------------------------------
    def set_cross(self, dest: torch.Tensor, cross):
        """Packed cross K/V (per layer (K, V) each (T, H, D)) go to arena tokens dest (long (T,))."""
        for (sk, sv), (k, v) in zip(self.cross, cross):
            sk.index_copy_(0, dest, k)
            sv.index_copy_(0, dest, v)

    def join(self, rows: list[int], prefix: torch.Tensor, cfg: sel.RowConfig, *, enc_start, enc_len, limit: int,
             fill: int, beam=None):
        """Rows `rows` start sequences holding `prefix` (n, P) tokens, reading the enc_len cross-K/V arena
        tokens from enc_start (ints or (n,) tensors), until they hold `limit` tokens. fill: the token beyond
        the prefix (what transformers' buffers hold there). beam: None, or (group, slot, start kwargs) for a
        beam-search request."""
        P = prefix.shape[1]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.seq[idx] = fill
        self.seq[idx, :P] = prefix
        self.t[idx] = P
        self.limit[idx] = limit
        self.stop_t[idx] = 0
        self.nonfinite[idx] = False
        self.alive[idx] = True
        self.busy[idx] = True
        self.cross_start[idx] = enc_start
        self.enc_lens[idx] = enc_len
        self.tables.assign(idx, cfg, prefix)
        self.is_beam[idx] = beam is not None
        self.busy_rows.update(rows)
        for r in rows:
            self.held[r], self._limit[r] = P, limit
        if beam is not None:
            group, slot, kw = beam
            group.start(slot, self.seq[idx], prompt=P, max_length=limit, **kw)

    def stop_rows(self, rows: list[int], lengths: list[int], *, pad: bool):
        """Stopping criteria checked on the host fired: row rows[i] stops at lengths[i] tokens (its stop mark;
        a row that had stopped earlier keeps its own). pad: from there it holds and emits its padding id, as
        an eos stops it (tokens it took past lengths[i] are overwritten); else it keeps generating with its
        mark set (transformers pads finished rows only when an eos criterion is present). Between steps."""
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        at = torch.tensor(lengths, dtype=torch.long, device=self.device)
        mark = self.stop_t[idx]
        new = self.busy[idx] & ((mark == 0) | (mark > at))
        self.stop_t[idx] = torch.where(new, at, mark)
        if pad:
            self.alive[idx] &= ~new
            past = torch.arange(self.seq_cap, device=self.device)[None, :] >= at[:, None]  # (n, seq_cap)
            self.seq[idx] = torch.where(new[:, None] & past, self.tables.pad[idx, None], self.seq[idx])
        everyone = torch.all((self.stop_t > 0) | ~self.busy)
        self.all_stopped_at.copy_(torch.where(everyone & (self.all_stopped_at == 0), self.steps, self.all_stopped_at))

    def prefill(self, P: int):
        """Feeds prefix tokens 0 .. P-2 of every row (their K/V go to the cache; no choice is made)."""
        for j in range(P - 1):
            self.decoder.step(self.seq, torch.full_like(self.t, j + 1), self.cache.layers, self.cross, self.cross_start,
                              self.enc_lens, self.enc_bound, self.ops)

    def leave(self, rows: list[int]):
        """Rows stop serving their request (their slots may be reused)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.busy[idx] = False
        self.alive[idx] = False
        self.is_beam[idx] = False
        self.t[idx] = 1
        self.cross_start[idx] = 0
        self.enc_lens[idx] = 1
        self.tables.release(idx)
        self.busy_rows.difference_update(rows)
        for r in rows:
            self.held[r] = 1

    def clear(self):
        """Every row idle, every beam group empty, the clock reset (a state reused by another generate())."""
        self.leave(list(range(self.rows)))
        for g in self.groups.values():
            g.clear()
        self.reset_clock()

    def reset_clock(self):
        self.steps.zero_()
        self.all_stopped_at.zero_()

    def advanced(self):
        """The host's bounds after a step: every busy row below its limit holds at most one token more."""
        for r in self.busy_rows:
            self.held[r] = min(self.held[r] + 1, self._limit[r])
